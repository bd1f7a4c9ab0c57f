"""DARTS's second-order hypergradient approximation by central finite differences.

Liu, Simonyan and Yang (2019), "DARTS: Differentiable Architecture Search", eq. 7-8. After one
lower step ``θ' = θ - ξ ∇_θ f(θ, φ)`` the upper loss ``F(θ', φ)`` has the gradient
``∇_φ F(θ', φ) - ξ (∂²f/∂φ∂θ)(θ, φ) ∇_θ' F(θ', φ)``. The mixed second-derivative product is
approximated with two first-order gradients::

    (∂²f/∂φ∂θ) v  ≈  (∇_φ f(θ⁺, φ) - ∇_φ f(θ⁻, φ)) / (2ε),   θ± = θ ± ε v,   ε = epsilon / ||v||

where ``θ`` are the lower's parameters BEFORE its last step and ``v = ∇_θ' F`` the upper loss's
gradient AFTER it. :func:`darts_vjp` returns the second term, ``-ξ`` times that estimate; the
direct term ``∇_φ F`` is the caller's. It is exact whenever ``∇_φ f`` is affine in ``θ`` (e.g. a
loss quadratic in θ with a bilinear coupling), and otherwise accurate to ``O(ε²)``.

Differences with other implementations, for users comparing numbers:

- Betty (``betty/hypergradient/darts.py``) returns ``(∇_φ f(θ⁻) - ∇_φ f(θ⁺)) / (2ε)`` without the
  learning-rate factor ``ξ``, so its second-order term is ``1/ξ`` times DARTS's; it also
  perturbs the parameters after the step instead of before it.
- BOML (``boml/upper_iter/darts.py``) stores ``0.01 / ||v||`` in one attribute
  (``self.epsilon``) but perturbs with another (``self.Epsilon``) and divides by
  ``2 * self.epsilon``, so the divisor is not the step that was taken.

Example:
    >>> import torch
    >>> phi = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    >>> loss_fn = lambda th: phi * (th[0] ** 2).sum() / 2  # (∂²f/∂φ∂θ) v = <θ, v>
    >>> theta = (torch.tensor([1.0, 3.0], dtype=torch.float64),)
    >>> v = (torch.tensor([1.0, 1.0], dtype=torch.float64),)
    >>> darts_vjp(loss_fn, theta, (phi,), v, lr=0.1)
    (tensor(-0.4000, dtype=torch.float64),)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mlopt.autodiff import finite_difference_mixed_vjp
from mlopt.errors import ConfigError, HypergradientError
from mlopt.linalg.vec import Vec, all_finite, as_vec, check_same_shapes

__all__ = ["darts_vjp"]

LearningRate = float | torch.Tensor | Sequence[float | torch.Tensor]


def _per_tensor(lr: LearningRate, n: int) -> tuple[float | torch.Tensor, ...]:
    """One learning rate per parameter tensor (a scalar is shared)."""
    if isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.dim() == 0):
        lrs = (lr,) * n
    elif isinstance(lr, torch.Tensor):
        raise ConfigError(
            f"darts_vjp: lr must be a float or one value per parameter tensor, got a tensor of "
            f"shape {tuple(lr.shape)}"
        )
    else:
        lrs = tuple(lr)
        if len(lrs) != n:
            raise ConfigError(
                f"darts_vjp: got {len(lrs)} learning rates for {n} parameter tensors; pass a "
                "float or one learning rate per parameter tensor"
            )
    out = []
    for value in lrs:
        if isinstance(value, torch.Tensor):  # (counted: also for a sharded DTensor)
            number = math.nan if float((~torch.isfinite(value.detach())).sum()) else 0.0
        else:
            number = value
        if isinstance(value, torch.Tensor):
            value = value.detach()
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ConfigError(f"darts_vjp: learning rates must be finite numbers, got {lr!r}")
        out.append(value)
    return tuple(out)


def darts_vjp(
    loss_fn: Callable[[Vec], torch.Tensor],
    params_before: Vec,
    uppers: Vec,
    cotangent: Vec,
    lr: LearningRate,
    *,
    epsilon: float = 0.01,
) -> Vec:
    """DARTS second-order term ``-ξ (∇_φ f(θ⁺, φ) - ∇_φ f(θ⁻, φ)) / (2ε)``.

    Args:
        loss_fn: ``loss_fn(θ) -> scalar``: the lower loss ``f(θ, φ)`` on the batch of its last
            step, with ``uppers`` captured in the closure.
        params_before: ``θ``, the lower's parameters before its last step (not modified).
        uppers: ``φ``, the tensors to differentiate with respect to.
        cotangent: ``v``, the upper loss's gradient at the parameters after the step.
        lr: ``ξ``, the lower's learning rate: a float, or one value per parameter tensor (each
            a float or a tensor broadcastable to that parameter). With per-tensor rates the
            product is ``(∂²f/∂φ∂θ)(ξ ⊙ v)``, estimated along the direction ``ξ ⊙ v``; with one
            rate this is exactly ``ξ`` times the estimate along ``v``.
        epsilon: norm of the perturbation (``ε = epsilon / ||ξ ⊙ v||`` along ``ξ ⊙ v``, which
            is the same perturbation as ``epsilon / ||v||`` along ``v`` for a scalar ``ξ``).

    Returns:
        One tensor per upper (zeros for uppers the loss does not use, and for ``v = 0``).

    Raises:
        ConfigError: invalid ``lr`` or ``epsilon``.
        HypergradientError: non-finite cotangent or result.

    Example:
        >>> import torch
        >>> phi = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss_fn = lambda th: (phi * th[0]).sum()  # ∇_φ f = θ: (∂²f/∂φ∂θ) v = v
        >>> theta = (torch.zeros(2, dtype=torch.float64),)
        >>> darts_vjp(loss_fn, theta, (phi,), (torch.tensor([1.0, -2.0], dtype=torch.float64),),
        ...           lr=0.5)
        (tensor([-0.5000,  1.0000], dtype=torch.float64),)
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ConfigError(f"darts_vjp: epsilon must be a number > 0, got {epsilon!r}")
    params_before = as_vec(params_before, "params_before")
    uppers = as_vec(uppers, "uppers")
    cotangent = as_vec(cotangent, "cotangent")
    check_same_shapes(params_before, cotangent, "darts_vjp: cotangent vs params_before")
    if not all_finite(cotangent):
        raise HypergradientError(
            "darts_vjp: the cotangent (upper loss gradient) is not finite (NaN/Inf)"
        )
    lrs = _per_tensor(lr, len(params_before))
    direction = tuple(xi * c.detach() for xi, c in zip(lrs, cotangent, strict=False))
    estimate = finite_difference_mixed_vjp(loss_fn, params_before, uppers, direction, epsilon)
    result = tuple(-e for e in estimate)
    if not all_finite(result):
        raise HypergradientError(
            "darts_vjp: the hypergradient is not finite (NaN/Inf): the lower loss is not finite "
            "at θ ± ε v; try a smaller epsilon"
        )
    return result
