"""Pure, differentiable per-tensor update rules of ``torch.optim.SGD``, ``Adam`` and ``AdamW``.

Each rule maps ``(param, grad, state)`` to ``(new_param, new_state)`` without modifying any input,
so autograd (and ``torch.func``) can differentiate the update with respect to the parameter, the
gradient, every state tensor and every hyperparameter given as a tensor. ``lr`` in particular may
be a tensor of the parameter's shape: a learned per-element learning rate as in Meta-SGD
(Li et al., 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

The numbers are those of torch 2.x's optimizers (any of the for-loop, ``foreach`` and ``fused``
implementations), and the state dicts use torch's keys (``momentum_buffer``, ``step``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so a state can move between a rule and a
``torch.optim`` optimizer in both directions. Keys a rule does not use are carried over unchanged.

One difference in gradients (not in values): torch's SGD stores ``grad.detach()`` as the first
momentum buffer; here the first buffer keeps its graph, so the unroll is fully differentiable.

Example:
    >>> import torch
    >>> p, g = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    >>> p1, s1 = sgd(p, g, {}, lr=0.1, momentum=0.9)
    >>> p1
    tensor([0.9500, 2.1000])
    >>> sorted(s1)
    ['momentum_buffer']
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["safe_sqrt", "sgd", "adam", "adamw", "scalar_dtype"]

Scalar = float | Tensor
State = dict[str, object]


def scalar_dtype(fused: bool | None = None) -> torch.dtype:
    """The dtype torch uses for Adam's ``step`` counter.

    Float32 for fused optimizers, otherwise float64 if the default dtype is float64, else float32.

    Example:
        >>> scalar_dtype(fused=True)
        torch.float32
    """
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose value is exact and whose gradient is 0 where ``x <= 0``.

    ``torch.sqrt`` has an infinite derivative at 0, so a second-moment estimate that is exactly
    zero (a zero gradient) makes backward produce ``inf * 0 = nan``. Here both the value and all
    derivatives (first and higher order) are finite everywhere. Negative inputs, which a second
    moment never has, give 0.

    Example:
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> y = safe_sqrt(x)
        >>> y.sum().backward()
        >>> y.detach(), x.grad
        (tensor([0., 2.]), tensor([0.0000, 0.2500]))
    """
    positive = x > 0
    inner = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, torch.sqrt(inner), torch.zeros_like(x))


def _is_zero(value: Scalar) -> bool:
    """True only for a plain number equal to 0 (a tensor hyperparameter is always applied)."""
    return not isinstance(value, Tensor) and value == 0


def _lerp(start: Tensor, end: Tensor, weight: Scalar) -> Tensor:
    """``start + weight * (end - start)``, with torch's lerp kernel for a number weight."""
    if isinstance(weight, Tensor):
        return start + weight * (end - start)
    return torch.lerp(start, end, weight)


def _next_step(step: object) -> tuple[Tensor | float, Tensor | float]:
    """Return ``(new_step, t)``: the incremented counter and its value as float64 / float."""
    if step is None:
        new_step: Tensor | float = torch.tensor(1.0, dtype=scalar_dtype())
    elif isinstance(step, Tensor):
        new_step = step.detach() + 1
    else:
        new_step = float(step) + 1.0
    t = new_step.to(torch.float64) if isinstance(new_step, Tensor) else new_step
    return new_step, t


def sgd(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """One step of ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize).

    With ``d = ±grad + weight_decay * param``, the momentum buffer is ``b = d`` on the first step
    and ``b = momentum * b + (1 - dampening) * d`` afterwards; the direction is ``b``, or
    ``d + momentum * b`` with Nesterov momentum (Sutskever et al., 2013), and
    ``new_param = param - lr * direction``. With ``momentum == 0`` no buffer is stored, as torch.

    Args:
        param: current parameter.
        grad: gradient of the loss at ``param``.
        state: previous state (``{}`` before the first step); not modified.
        lr: learning rate: a number, a 0-dim tensor, or a tensor broadcastable to ``param``.
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty coefficient.
        nesterov: use Nesterov momentum.
        maximize: ascend instead of descend.

    Returns:
        ``(new_param, new_state)``.

    Example:
        >>> p, g = torch.tensor([1.0]), torch.tensor([2.0])
        >>> sgd(p, g, {}, lr=0.5)[0]
        tensor([0.])
    """
    d = -grad if maximize else grad
    if not _is_zero(weight_decay):
        d = d + weight_decay * param
    new_state = dict(state)
    if not _is_zero(momentum):
        buf = state.get("momentum_buffer")
        buf = d if buf is None else momentum * buf + (1 - dampening) * d
        new_state["momentum_buffer"] = buf
        d = d + momentum * buf if nesterov else buf
    return param - lr * d, new_state


def _adam_update(
    param: Tensor,
    grad: Tensor,
    state: State,
    lr: Scalar,
    betas: tuple[Scalar, Scalar],
    eps: float,
    weight_decay: Scalar,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> tuple[Tensor, State]:
    """Shared body of :func:`adam` and :func:`adamw`."""
    beta1, beta2 = betas
    d = -grad if maximize else grad
    if not _is_zero(weight_decay):
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            d = d + weight_decay * param
    new_step, t = _next_step(state.get("step"))
    exp_avg = state.get("exp_avg")
    exp_avg_sq = state.get("exp_avg_sq")
    exp_avg = _lerp(torch.zeros_like(param) if exp_avg is None else exp_avg, d, 1 - beta1)
    exp_avg_sq = torch.zeros_like(param) if exp_avg_sq is None else exp_avg_sq
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * (d * d)
    new_state = dict(state)
    new_state.update(step=new_step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    second = exp_avg_sq
    if amsgrad:
        previous = state.get("max_exp_avg_sq")
        second = exp_avg_sq if previous is None else torch.maximum(previous, exp_avg_sq)
        new_state["max_exp_avg_sq"] = second
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    denom = safe_sqrt(second) / bias_correction2_sqrt + eps
    return param - (lr / bias_correction1) * (exp_avg / denom), new_state


def adam(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """One step of ``torch.optim.Adam`` (Kingma & Ba, 2015), optionally AMSGrad (Reddi et al.,
    2018), with L2 weight decay added to the gradient.

    ``m = lerp(m, d, 1 - beta1)``, ``v = beta2 * v + (1 - beta2) * d²``,
    ``new_param = param - lr / (1 - beta1^t) * m / (sqrt(v̂) / sqrt(1 - beta2^t) + eps)``, where
    ``v̂`` is ``v`` or, with AMSGrad, the running maximum of ``v``, and ``t`` the incremented
    ``step``. The square root is :func:`safe_sqrt`, so a zero gradient gives finite derivatives.

    Args:
        param: current parameter.
        grad: gradient of the loss at ``param``.
        state: previous state (``{}`` before the first step); ``step`` may be a tensor or a
            number; not modified.
        lr: learning rate: a number, a 0-dim tensor, or a tensor broadcastable to ``param``.
        betas: moment decay rates (numbers or 0-dim tensors).
        eps: added to the denominator.
        weight_decay: L2 penalty coefficient (coupled: added to the gradient).
        amsgrad: use AMSGrad's running maximum of the second moment.
        maximize: ascend instead of descend.

    Returns:
        ``(new_param, new_state)``; ``new_state["step"]`` is a detached tensor (or a float if the
        given step was a number).

    Example:
        >>> p1, s1 = adam(torch.tensor([1.0]), torch.tensor([3.0]), {}, lr=0.1)
        >>> p1, s1["step"]
        (tensor([0.9000]), tensor(1.))
    """
    return _adam_update(
        param, grad, state, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=False
    )


def adamw(
    param: Tensor,
    grad: Tensor,
    state: State,
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, State]:
    """One step of ``torch.optim.AdamW``: Adam with decoupled weight decay (Loshchilov & Hutter,
    2019, "Decoupled Weight Decay Regularization").

    The parameter is first shrunk, ``param * (1 - lr * weight_decay)``, then takes the Adam step of
    :func:`adam` (without L2 term in the gradient). Arguments and return value as :func:`adam`.

    Example:
        >>> p1, _ = adamw(torch.tensor([1.0]), torch.tensor([0.0]), {}, lr=0.1, weight_decay=0.5)
        >>> p1
        tensor([0.9500])
    """
    return _adam_update(
        param, grad, state, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=True
    )
