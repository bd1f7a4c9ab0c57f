"""What the iterative solvers share: option checks, the divergence monitor and :class:`SolverInfo`.

Private module: the public names are re-exported by :mod:`mlopt.linalg`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.linalg.vec import Vec, add, check_same_shapes, dot

__all__ = [
    "SolverInfo",
    "DIVERGENCE_FACTOR",
    "Monitor",
    "check_iterations",
    "check_nonnegative",
    "detached_norm",
    "damped",
]

DIVERGENCE_FACTOR = 1e6
"""A solver stops with an error when its residual exceeds this factor times its initial value."""


@dataclass(frozen=True)
class SolverInfo:
    """What an iterative solver did (returned with ``return_info=True``).

    Attributes:
        solver: ``"cg"``, ``"neumann"`` or ``"fixed_point"``.
        iterations: how many operator products (``matvec`` calls) the iterations used.
        residual: norm of the final residual (see each solver for its exact definition).
        initial_residual: norm of the residual at the starting point.
        converged: True when the tolerance was reached (always False without a tolerance).
        negative_curvature: CG met a direction with ``p^T A p < 0`` (A is not positive
            semi-definite, e.g. the Hessian of a non-convex loss); the result is then not the
            minimiser of any quadratic and may be inaccurate.
    """

    solver: str
    iterations: int
    residual: float
    initial_residual: float
    converged: bool
    negative_curvature: bool = False


def check_iterations(solver: str, iterations: int) -> None:
    """Raise :class:`ConfigError` unless ``iterations`` is an int >= 0."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f"{solver}: iterations must be an int >= 0, got {iterations!r}")


def check_nonnegative(solver: str, name: str, value: float | torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number >= 0."""
    number = float(value.detach()) if isinstance(value, torch.Tensor) else value
    if not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        raise ConfigError(f"{solver}: {name} must be a finite number >= 0, got {value!r}")


def damped(matvec: Callable[[Vec], Vec], damping: float | torch.Tensor) -> Callable[[Vec], Vec]:
    """``v -> matvec(v) + damping * v`` (``matvec`` itself for a damping of 0)."""
    if not isinstance(damping, torch.Tensor) and damping == 0.0:
        return matvec
    return lambda v: add(matvec(v), v, damping)


def detached_norm(v: Vec) -> torch.Tensor:
    """Euclidean norm of ``v`` outside autograd."""
    with torch.no_grad():
        return torch.sqrt(dot(v, v))


class Monitor:
    """Watches a solver's residual: non-finite iterates and divergence raise HypergradientError.

    Args:
        solver: the solver's name, used in messages.
        hint: what to change when the solver diverges (appended to the message).
        check: when False the monitor never synchronises with the device and never raises
            (``torch.func``-compatible mode); :meth:`observe` then returns ``None``.
    """

    def __init__(self, solver: str, hint: str, check: bool = True) -> None:
        self.solver = solver
        self.hint = hint
        self.check = check
        self.initial: float | None = None
        self.last: float | None = None

    def first_output(self, b: Vec, out: Vec) -> None:
        """Check that the operator maps ``b``-shaped vectors to ``b``-shaped vectors."""
        if self.check:
            check_same_shapes(b, out, f"{self.solver}: matvec output vs right-hand side b")

    def start(self, residual: Vec) -> float | None:
        """Record the initial residual; raise if it is not finite."""
        if not self.check:
            return None
        value = float(detached_norm(residual))
        if not math.isfinite(value):
            raise HypergradientError(
                f"{self.solver}: the initial residual (right-hand side b or starting point) is "
                "not finite (NaN/Inf); check the upper loss and its gradient"
            )
        self.initial = self.last = value
        return value

    def observe(self, iteration: int, residual: Vec, iterate: Vec) -> float | None:
        """Return the residual norm after ``iteration``; raise on NaN/Inf or divergence."""
        if not self.check:
            return None
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(t).all() for t in iterate]).all()
            r = detached_norm(residual)
            value, ok = torch.stack([r, finite.to(r.dtype)]).tolist()
        if not (ok and math.isfinite(value)):
            raise HypergradientError(
                f"{self.solver}: the iterate became non-finite (NaN/Inf) at iteration {iteration}; "
                f"{self.hint}"
            )
        initial = self.initial if self.initial is not None else 0.0
        if initial > 0 and value > DIVERGENCE_FACTOR * initial:
            raise HypergradientError(
                f"{self.solver} diverged at iteration {iteration}: the residual norm {value:.3e} "
                f"is more than {DIVERGENCE_FACTOR:.0e} times its initial value {initial:.3e}; "
                f"{self.hint}"
            )
        self.last = value
        return value

    def final(self, residual: Vec) -> float:
        """Residual norm for :class:`SolverInfo` (computed now if the monitor was off)."""
        if self.check and self.last is not None:
            return self.last
        return float(detached_norm(residual))
