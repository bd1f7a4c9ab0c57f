"""SAMA: the scalable meta-learning hypergradient (Choe et al. 2023, "Making Scalable Meta
Learning Practical", NeurIPS).

SAMA replaces the inverse Hessian of the implicit hypergradient by the lower optimizer's own
update Jacobian: with ``θ' = θ + u(g)`` the lower's last update from its gradient
``g = ∇_θ f(θ, φ)``, the best response is approximated by ``dθ'/dφ ≈ (∂u/∂g)(∂²f/∂θ∂φ)``, so::

    hypergradient = ∇_φ F  -  (∂²f/∂φ∂θ) P ∇_θ F,        P = -∂u/∂g  (diagonal)

For SGD ``P = lr``; for Adam and AdamW ``P`` is the exact derivative of torch's update with
respect to the latest gradient (bias corrections and ``eps`` included), which is SAMA's
"algorithmic adaptation" for adaptive optimizers. The mixed product is taken by central
differences of first-order gradients (no second-order autograd)::

    (∂²f/∂φ∂θ) v ≈ (∇_φ f(θ + εv) - ∇_φ f(θ - εv)) / 2ε,    ε = radius / ||v||,   v = P ∇_θ F

It is exact (up to rounding) for one lower step when ``∇_φ f`` is affine in ``θ``: it then equals
reverse-mode differentiation through that step (tested against it on quadratics, with SGD,
momentum and Adam). Betty's implementation (``betty/hypergradient/sama.py``, ``utils.py``)
takes Adam's derivative without bias correction; mlopt's matches torch's update exactly.

Example:
    >>> import torch
    >>> phi = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    >>> loss_fn = lambda th: phi * (th[0] ** 2).sum() / 2  # (∂²f/∂φ∂θ) v = <θ, v>
    >>> theta = (torch.tensor([1.0, 3.0], dtype=torch.float64),)
    >>> cot = (torch.tensor([1.0, 1.0], dtype=torch.float64),)
    >>> sama_vjp(loss_fn, theta, (phi,), cot, (torch.tensor(0.1, dtype=torch.float64),))
    (tensor(-0.4000, dtype=torch.float64),)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.hypergrad.base import LowerContext, Method, register_method
from mlopt.hypergrad.finite_difference import darts_vjp
from mlopt.linalg.vec import Vec, as_vec

__all__ = ["SAMA", "sama_vjp", "sgd_preconditioner", "adam_preconditioner", "preconditioner"]


def sgd_preconditioner(lr: float, momentum: float, dampening: float, nesterov: bool) -> float:
    """``-∂u/∂g`` of torch's SGD step (after its first step, for a momentum buffer)."""
    if momentum == 0.0:
        return lr
    new = 1.0 - dampening
    return lr * (1.0 + momentum * new if nesterov else new)


def adam_preconditioner(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    """``-∂u/∂g``, elementwise, of torch's Adam/AdamW step that produced ``exp_avg`` and
    ``exp_avg_sq`` (the moments after the step) from the gradient ``grad`` (after Adam's L2
    weight decay, which does not change the derivative; AdamW's decoupled decay does not
    depend on ``g``)."""
    b1, b2 = betas
    bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
    s = exp_avg_sq.sqrt()
    d = s / bc2**0.5 + eps
    second = torch.where(
        s > 0, exp_avg * (1.0 - b2) * grad / (s.clamp_min(1e-300) * bc2**0.5 * d * d), 0.0
    )
    return (lr / bc1) * ((1.0 - b1) / d - second)


def preconditioner(
    optimizer: Any, leaves: Sequence[torch.Tensor], grads: Vec, before: Vec | None = None
) -> Vec:
    """``P`` per parameter tensor from the lower's optimizer after its last step, the step's
    gradient ``grads`` and the parameters ``before`` it (for Adam's L2 weight decay).

    Raises:
        ConfigError: an optimizer other than SGD, Adam or AdamW, or AMSGrad.
    """
    groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    kind = type(optimizer)
    out = []
    for i, leaf in enumerate(leaves):
        group, state = groups[id(leaf)], optimizer.state.get(leaf, {})
        if kind is torch.optim.SGD:
            p = sgd_preconditioner(
                group["lr"], group["momentum"], group["dampening"], group["nesterov"]
            )
            out.append(torch.full_like(leaf, p))
        elif kind in (torch.optim.Adam, torch.optim.AdamW):
            if group.get("amsgrad"):
                raise ConfigError("SAMA: Adam(amsgrad=True) is not supported; use amsgrad=False")
            g = grads[i]
            if kind is torch.optim.Adam and group["weight_decay"]:
                g = g + group["weight_decay"] * (leaf if before is None else before[i]).detach()
            out.append(
                adam_preconditioner(
                    g,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    int(state["step"]),
                    group["lr"],
                    group["betas"],
                    group["eps"],
                )
            )
        else:
            raise ConfigError(
                f"SAMA: optimizer {kind.__name__} has no update Jacobian here; use SGD, Adam or "
                "AdamW for the lower, or type='finite_difference'"
            )
    return tuple(out)


def sama_vjp(
    loss_fn: Callable[[Vec], torch.Tensor],
    params: Vec,
    uppers: Vec,
    cotangent: Vec,
    precond: Vec,
    *,
    radius: float = 1.0,
) -> Vec:
    """SAMA's second term ``-(∂²f/∂φ∂θ) P v`` by central differences (``v`` the cotangent):
    DARTS's finite-difference term (:func:`~mlopt.hypergrad.finite_difference.darts_vjp`) with the
    elementwise preconditioner ``P`` in place of the learning rate, taken at ``params``.

    Raises:
        HypergradientError: a non-finite cotangent or result.
    """
    return darts_vjp(loss_fn, params, uppers, cotangent, as_vec(precond, "precond"), epsilon=radius)


@dataclass(repr=False)
class SAMA(Method):
    """SAMA (Choe et al. 2023): the lower optimizer's update Jacobian in place of the inverse
    Hessian, mixed derivative by central differences; no second-order autograd.

    Args:
        radius: norm of the finite-difference perturbation (Betty's ``sama_adam_alpha``).
    """

    radius: float = 1.0

    name = "sama"
    needs_last_gradient = True
    needs_params_before = True  # (Adam's L2 weight decay adds them to the gradient)

    def __post_init__(self) -> None:
        ok = isinstance(self.radius, (int, float)) and not isinstance(self.radius, bool)
        if not ok or not (0 < self.radius < float("inf")):
            raise ConfigError(f"SAMA: radius must be a finite number > 0, got {self.radius!r}")

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        optimizer, grads = ctx.extra.get("optimizer"), ctx.extra.get("grad")
        if optimizer is None or grads is None:
            raise HypergradientError(
                f"sama: problem {ctx.name!r} has not taken an optimizer step yet (or has no "
                "optimizer); SAMA needs the last update"
            )
        precond = preconditioner(optimizer, ctx.extra["leaves"], grads, ctx.params_before)
        return sama_vjp(ctx.loss_fn, ctx.params, ctx.uppers, cotangent, precond, radius=self.radius)


register_method("sama", SAMA)
