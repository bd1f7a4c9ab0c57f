"""Bi-level Descent Aggregation (BDA): pure functions and learnable coefficients.

Liu, Mu, Yuan, Zeng and Zhang (2020), "A Generic First-Order Algorithmic Framework for Bi-Level
Programming Beyond Lower-Level Singleton" (ICML; arXiv 2006.04045), eq. (5)-(6): each lower
step descends an aggregation of the lower loss ``f`` and the upper loss ``F``::

    y_{k+1} = y_k - η · d_k,    d_k = (1-α_k)·t·∇_y f(x, y_k) + α_k·s·∇_y F(x, y_k)

with ``α_k ∈ [0, 1]`` (the paper's theory takes ``α_k → 0``), ``t`` the lower-gradient scale
(the paper's ``s_l``), ``s`` the upper-gradient scale (``s_u``) and ``η`` the lower optimizer's
learning rate. ``d_k`` is the gradient with respect to ``y`` of the scalar objective
``(1-α_k)·t·f + α_k·s·F`` (:func:`bda_objective`), which is how a lower problem implements BDA
(see :mod:`mlopt.dynamics.problem`).

α schedules (``k = 1, 2, ...`` counts the steps of the current unroll window):

- ``"harmonic"``: ``α_k = α / k`` (BOML's ``alpha / t_tensor``).
- ``"geometric"``: ``α_k = α · γ^(k-1)`` (the decay of the BDA authors' code).
- ``"constant"``: ``α_k = α``.

``α`` may be a number, a 0-d tensor, or a 1-d tensor holding one value per step (then
``α_k = α[k-1] · factor_k``); tensors may be upper parameters, so ``α``, ``s`` and ``t`` can be
learned by the hypergradient.

BOML (``boml/lower_iter/aggr.py``) uses the same convention: ``(1 - α/k)·t·∇f + (α/k)·s·∇F``,
i.e. ``schedule="harmonic"``.

Example:
    >>> import torch
    >>> alpha_at(0.5, 2, "harmonic"), alpha_at(0.5, 3, "geometric", gamma=0.5)
    (0.25, 0.125)
    >>> g_f, g_F = (torch.tensor([1.0]),), (torch.tensor([3.0]),)
    >>> bda_direction(g_f, g_F, alpha=0.25, s=1.0, t=2.0)
    (tensor([2.2500]),)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlopt.errors import ConfigError

__all__ = [
    "SCHEDULES",
    "Scalar",
    "alpha_at",
    "schedule_factor",
    "bda_direction",
    "bda_objective",
    "BDAParameters",
]

Scalar = float | Tensor
Vec = tuple[Tensor, ...]
SCHEDULES = ("harmonic", "geometric", "constant")


def _check_step(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"BDA: the step index k counts from 1, got {k!r}")


def schedule_factor(k: int, schedule: str = "harmonic", gamma: float = 0.9) -> float:
    """The multiplier of ``α`` at step ``k`` (1-based) of a window.

    Example:
        >>> [schedule_factor(k, "harmonic") for k in (1, 2, 4)]
        [1.0, 0.5, 0.25]
    """
    _check_step(k)
    if schedule == "harmonic":
        return 1.0 / k
    if schedule == "geometric":
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ConfigError(f"BDA: gamma must be a number > 0, got {gamma!r}")
        return float(gamma) ** (k - 1)
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"BDA: unknown α schedule {schedule!r}; use one of {list(SCHEDULES)}")


def alpha_at(alpha: Scalar, k: int, schedule: str = "harmonic", gamma: float = 0.9) -> Scalar:
    """``α_k``: the aggregation weight of the upper gradient at step ``k`` (1-based).

    Args:
        alpha: a number, a 0-d tensor, or a 1-d tensor with one value per step of the window.
        k: the step within the unroll window, from 1.
        schedule: ``"harmonic"`` (``α/k``), ``"geometric"`` (``α·γ^(k-1)``) or ``"constant"``.
        gamma: decay of the geometric schedule.

    Returns:
        A float for a float ``alpha``, otherwise a 0-d tensor (differentiable in ``alpha``).

    Example:
        >>> import torch
        >>> alpha_at(torch.tensor([0.4, 0.2, 0.1]), 2, "constant")
        tensor(0.2000)
    """
    factor = schedule_factor(k, schedule, gamma)
    if isinstance(alpha, Tensor):
        if alpha.dim() == 0:
            return alpha * factor
        if alpha.dim() != 1:
            raise ConfigError(
                f"BDA: alpha must be a number, a 0-d tensor or a 1-d tensor (one per step), got "
                f"shape {tuple(alpha.shape)}"
            )
        if k > alpha.shape[0]:
            raise ConfigError(
                f"BDA: alpha has {alpha.shape[0]} per-step values but step {k} was requested; "
                "give one value per step of the unroll window (Config(unroll_steps=...))"
            )
        return alpha[k - 1] * factor
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"BDA: alpha must be a finite number or a tensor, got {alpha!r}")
    return float(alpha) * factor


def bda_direction(grad_lower: Vec, grad_upper: Vec, alpha: Scalar, s: Scalar, t: Scalar) -> Vec:
    """The BDA descent direction ``(1-α)·t·∇_y f + α·s·∇_y F`` (Liu et al. 2020, eq. 6).

    Args:
        grad_lower: ``∇_y f``, one tensor per lower parameter.
        grad_upper: ``∇_y F``, same shapes.
        alpha: ``α_k`` for this step.
        s: scale of the upper gradient.
        t: scale of the lower gradient.

    Example:
        >>> import torch
        >>> bda_direction((torch.ones(2),), (torch.zeros(2),), alpha=0.0, s=5.0, t=1.0)
        (tensor([1., 1.]),)
    """
    if len(grad_lower) != len(grad_upper):
        raise ConfigError(
            f"bda_direction: {len(grad_lower)} lower gradients but {len(grad_upper)} upper ones"
        )
    return tuple((1 - alpha) * t * gf + alpha * s * gF for gf, gF in zip(grad_lower, grad_upper))


def bda_objective(lower_loss: Tensor, upper_loss: Tensor, alpha: Scalar, s: Scalar, t: Scalar):
    """The scalar ``(1-α)·t·f + α·s·F`` whose gradient in ``y`` is :func:`bda_direction`.

    Example:
        >>> import torch
        >>> bda_objective(torch.tensor(2.0), torch.tensor(10.0), alpha=0.5, s=1.0, t=1.0)
        tensor(6.)
    """
    return (1 - alpha) * t * lower_loss + alpha * s * upper_loss


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ConfigError(f"BDAParameters: a constrained alpha must lie in (0, 1), got {p!r}")
    return math.log(p / (1.0 - p))


class BDAParameters(nn.Module):
    """Learnable ``α`` (one, or one per step), ``s`` and ``t``, to hold in an upper problem.

    Put it in the upper problem's module (e.g. as a submodule ``bda``) and point the lower at it
    with ``BDA(params="<upper>.bda")``; the hypergradient then trains the coefficients with the
    upper's other parameters.

    Args:
        alpha: initial ``α``.
        s: initial upper-gradient scale.
        t: initial lower-gradient scale.
        steps: None for one ``α``; an integer K for one ``α`` per step of the window.
        learn: which of ``"alpha"``, ``"s"``, ``"t"`` are trainable (the others are buffers).
        constrained: store ``logit(α)``, ``log s`` and ``log t`` (so ``α ∈ (0,1)``, ``s, t > 0``);
            False stores the raw values.
        dtype: floating dtype of the tensors (None: torch's default). Build them in the dtype
            you train in: converting later rounds the initial values.

    Example:
        >>> p = BDAParameters(alpha=0.5, s=2.0, t=1.0, steps=3)
        >>> [round(float(v.detach()), 4) for v in p(2)]
        [0.5, 2.0, 1.0]
    """

    def __init__(
        self,
        alpha: float = 0.5,
        s: float = 1.0,
        t: float = 1.0,
        *,
        steps: int | None = None,
        learn: Sequence[str] = ("alpha", "s", "t"),
        constrained: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        unknown = set(learn) - {"alpha", "s", "t"}
        if unknown:
            raise ConfigError(f"BDAParameters: learn names {sorted(unknown)}; use alpha, s, t")
        bad_steps = isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        if steps is not None and bad_steps:
            raise ConfigError(f"BDAParameters: steps must be None or an int >= 1, got {steps!r}")
        if constrained and (s <= 0 or t <= 0):
            raise ConfigError(f"BDAParameters: constrained s and t must be > 0, got {s}, {t}")
        self.constrained = constrained
        self.steps = steps
        shape = () if steps is None else (steps,)
        raw = {
            "alpha": _logit(alpha) if constrained else alpha,
            "s": math.log(s) if constrained else s,
            "t": math.log(t) if constrained else t,
        }
        for key, value in raw.items():
            tensor = torch.full(shape if key == "alpha" else (), float(value), dtype=dtype)
            if key in learn:
                self.register_parameter(f"raw_{key}", nn.Parameter(tensor))
            else:
                self.register_buffer(f"raw_{key}", tensor)

    def forward(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(α_k, s, t)`` at step ``k`` of the window (1-based; before any schedule factor)."""
        _check_step(k)
        raw_a = self.raw_alpha
        if raw_a.dim() == 1:
            if k > raw_a.shape[0]:
                raise ConfigError(
                    f"BDAParameters holds {raw_a.shape[0]} per-step alphas; step {k} requested: "
                    "make steps equal the lower's unroll_steps"
                )
            raw_a = raw_a[k - 1]
        if self.constrained:
            return torch.sigmoid(raw_a), self.raw_s.exp(), self.raw_t.exp()
        return raw_a, self.raw_s, self.raw_t
