"""Functional inner loops for the MAML family, written with ``torch.func`` so they can be vmapped.

:func:`adapt` runs ``steps`` gradient-descent updates of a dict of parameters on a support loss
(Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks"), with a
scalar learning rate or learned per-element rates (Meta-SGD, Li et al. 2017), optionally only on
some parameters (ANIL, Raghu et al. 2020) and optionally first-order (FOMAML: the inner gradient
is treated as a constant). :func:`maml_task_loss` builds the per-task meta-loss that
:func:`mlopt.meta.meta_gradients` differentiates; :func:`reptile_task_gradient` gives Reptile's
``θ - θ_adapted`` (Nichol et al. 2018); :func:`proximal_term` is iMAML's regularizer
(Rajeswaran et al. 2019).

Example:
    >>> import torch
    >>> p = {"w": torch.tensor([1.0])}
    >>> adapt(lambda q: (q["w"] ** 2).sum(), p, steps=1, lr=0.25)["w"]   # w - 0.25 * 2w
    tensor([0.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlopt.errors import ConfigError
from mlopt.functional import call_with

__all__ = [
    "adapt",
    "maml_task_loss",
    "reptile_task_gradient",
    "proximal_term",
    "accuracy",
]

Params = dict[str, torch.Tensor]
LR = float | torch.Tensor | Mapping[str, float | torch.Tensor]


def _lr_for(lr: LR, name: str) -> float | torch.Tensor:
    if isinstance(lr, Mapping):
        if name not in lr:
            raise ConfigError(
                f"adapt: no learning rate for parameter {name!r}; give one per adapted parameter "
                f"(got {sorted(lr)[:4]}...)"
            )
        return lr[name]
    return lr


def adapt(
    loss_fn: Callable[[Params], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    steps: int,
    lr: LR,
    *,
    first_order: bool = False,
    adapted: Collection[str] | None = None,
) -> Params:
    """``steps`` updates ``θ ← θ - lr ⊙ ∇_θ loss_fn(θ)`` on the parameters named in ``adapted``.

    The update is differentiable with respect to ``params`` and ``lr`` (second-order MAML,
    Meta-SGD) unless ``first_order=True``, where each inner gradient is detached (FOMAML). Works
    under ``torch.func.grad`` and ``vmap``.

    Args:
        loss_fn: support loss of the full parameter dict.
        params: name -> tensor, all parameters ``loss_fn`` needs.
        steps: number of inner updates (0 returns ``params``).
        lr: a number, a tensor, or a dict name -> number/tensor (per-element rates of the
            parameter's shape for Meta-SGD, or rates times masks for MT-net).
        first_order: treat the inner gradients as constants.
        adapted: names of the parameters to update (None: all); the others stay fixed (ANIL
            adapts the head only).

    Returns:
        The adapted parameter dict (fixed entries are the given tensors).

    Example:
        >>> p = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
        >>> out = adapt(lambda q: q["a"] * q["b"], p, steps=1, lr=1.0, adapted=["a"])
        >>> out["a"], out["b"]
        (tensor(-1.), tensor(3.))
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"adapt: steps must be an integer >= 0, got {steps!r}")
    params = dict(params)
    names = list(params) if adapted is None else [n for n in params if n in set(adapted)]
    if adapted is not None and len(names) != len(set(adapted)):
        missing = sorted(set(adapted) - set(params))
        raise ConfigError(f"adapt: adapted names {missing} are not in params {sorted(params)}")
    for _ in range(steps):
        fast = {n: params[n] for n in names}
        fixed = {n: v for n, v in params.items() if n not in fast}
        grads = torch.func.grad(lambda f, fixed=fixed: loss_fn({**fixed, **f}))(fast)
        for n in names:
            g = grads[n].detach() if first_order else grads[n]
            params[n] = params[n] - _lr_for(lr, n) * g
    return params


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(logits) == labels`` as a float tensor (no gradient).

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    return (logits.detach().argmax(-1) == labels).to(logits.dtype).mean()


def maml_task_loss(
    model: nn.Module,
    steps: int,
    lr: LR | Callable[[Params], LR],
    *,
    first_order: bool = False,
    adapted: Collection[str] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    forward: Callable[[Params, torch.Tensor], torch.Tensor] | None = None,
    model_keys: Sequence[str] | None = None,
) -> Callable[[Params, Any], tuple[torch.Tensor, torch.Tensor]]:
    """The per-task MAML meta-loss ``L_query(adapt(θ, support))``, with the query accuracy.

    Args:
        model: the network, run with ``torch.func.functional_call``.
        steps: inner steps.
        lr: inner learning rate(s) (see :func:`adapt`), or a function of the meta-parameter dict
            returning them (Meta-SGD: learned rates stored among the meta-parameters).
        first_order: FOMAML.
        adapted: parameter names updated in the inner loop (None: all model parameters).
        loss: ``loss(logits, labels)``.
        forward: ``forward(params, x) -> logits`` (default: the model with ``params``).
        model_keys: which entries of the meta-parameter dict are the model's (default: all
            entries whose name is a parameter of ``model``); the others (learned rates...) are
            only given to ``lr``.

    Returns:
        ``task_loss(params, task) -> (query_loss, query_accuracy)`` for
        :func:`mlopt.meta.meta_gradients` with ``has_aux=True``; ``task`` is a
        ``(support_x, support_y, query_x, query_y)`` tuple (``mlopt.data.Task``).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> fn = maml_task_loss(net, steps=1, lr=0.1)
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        >>> loss, acc = fn(dict(net.named_parameters()), (x, y, x, y))
        >>> loss.shape, acc.shape
        (torch.Size([]), torch.Size([]))
    """
    names = set(model_keys) if model_keys is not None else {n for n, _ in model.named_parameters()}
    run = forward if forward is not None else (lambda p, x: call_with(model, p, x))

    def task_loss(params: Params, task: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sx, sy, qx, qy = task
        weights = {n: v for n, v in params.items() if n in names}
        rates = lr(params) if callable(lr) else lr
        fast = adapt(
            lambda p: loss(run(p, sx), sy),
            weights,
            steps,
            rates,
            first_order=first_order,
            adapted=adapted,
        )
        logits = run(fast, qx)
        return loss(logits, qy), accuracy(logits, qy)

    return task_loss


def reptile_task_gradient(
    model: nn.Module,
    steps: int,
    lr: LR,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    use_query: bool = True,
) -> Callable[[Params, Any], tuple[Params, torch.Tensor]]:
    """Reptile's per-task meta-gradient ``θ - θ_adapted`` (Nichol et al. 2018), for
    :func:`mlopt.meta.map_tasks`.

    Args:
        model: the network.
        steps: inner SGD steps.
        lr: inner learning rate.
        loss: ``loss(logits, labels)``.
        use_query: adapt on support and query examples together (Reptile has no query set; the
            whole task is its training data).

    Returns:
        ``fn(params, task) -> (gradient dict, loss at the adapted weights on the query set)``.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        >>> g, _ = reptile_task_gradient(net, 2, 0.1)(dict(net.named_parameters()), (x, y, x, y))
        >>> sorted(g)
        ['bias', 'weight']
    """

    def fn(params: Params, task: Any) -> tuple[Params, torch.Tensor]:
        sx, sy, qx, qy = task
        if use_query:
            sx, sy = torch.cat([sx, qx]), torch.cat([sy, qy])
        start = {k: v.detach() for k, v in params.items()}
        fast = adapt(
            lambda p: loss(call_with(model, p, sx), sy), start, steps, lr, first_order=True
        )
        grads = {k: start[k] - fast[k].detach() for k in start}
        with torch.no_grad():
            q = loss(call_with(model, fast, qx), qy)
        return grads, q

    return fn


def proximal_term(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], strength: float
) -> torch.Tensor:
    """iMAML's proximal regularizer ``(λ/2) Σ ||θ - θ_init||²`` (Rajeswaran et al. 2019, eq. 4).

    Added to the lower (task) loss with ``θ_init`` the upper problem's parameters, it makes the
    adapted weights depend on the meta-initialization through the loss itself, so an implicit
    method applies: with ``f = L_support + (λ/2)||θ - φ||²``, ``∂²f/∂θ² = H + λI`` and
    ``∂²f/∂φ∂θ = -λI``, hence ``dL/dφ = λ (H + λI)^{-1} ∇_θ L_query``: exactly what
    ``Config(type=CG(...))`` computes from this loss (no extra damping needed).

    Example:
        >>> proximal_term([torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 0.0])], 2.0)
        tensor(5.)
    """
    if len(params) != len(anchors):
        raise ConfigError(
            f"proximal_term: {len(params)} parameters but {len(anchors)} anchors; pass the "
            "lower's parameters and the matching upper parameters"
        )
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    return 0.5 * strength * total
