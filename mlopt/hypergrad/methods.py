"""Method objects for the implicit, finite-difference and forward-mode hypergradients.

Each class only binds options and calls a pure function: ``mlopt.hypergrad.implicit``
(``implicit_vjp``, ``fixed_point_vjp``), ``mlopt.hypergrad.finite_difference`` (``darts_vjp``)
and ``mlopt.hypergrad.forward`` (``forward_unroll``/``forward_vjp``), with the linear solvers of
``mlopt.linalg`` injected.

Example:
    >>> from mlopt import Config
    >>> Config(type=CG(iterations=20, damping=1e-3)).type.iterations
    20
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mlopt.errors import ConfigError
from mlopt.hypergrad.base import (
    LowerContext,
    Method,
    Transition,
    Vec,
    create_graph_requested,
    register_method,
)
from mlopt.hypergrad.finite_difference import darts_vjp
from mlopt.hypergrad.forward import forward_unroll, forward_vjp
from mlopt.hypergrad.implicit import fixed_point_vjp, implicit_vjp
from mlopt.linalg import cg, minres, neumann

__all__ = [
    "CG",
    "MINRES",
    "Neumann",
    "FixedPoint",
    "FiniteDifference",
    "Forward",
    "implicit_method_vjp",
]


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


def _nonneg(owner: str, name: str, value: Any, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (strict and value == 0):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")


def implicit_method_vjp(ctx: LowerContext, cotangent: Vec, solve: Any) -> Vec:
    """The implicit-function-theorem vjp at the lower's parameters, with ``solve`` injected
    (``solve(matvec, b) -> x`` for the lower Hessian): the body of every implicit method's
    ``vjp``, for a custom method with its own solver (a closed form, a logged Krylov solve).

    Example::

        class Exact(mlopt.hypergrad.Method):
            def vjp(self, ctx, cotangent):
                return implicit_method_vjp(ctx, cotangent, lambda mv, b: my_solve(b))
    """
    return implicit_vjp(
        ctx.grad_fn,
        ctx.params,
        ctx.uppers,
        cotangent,
        solve,
        create_graph=create_graph_requested(),
    )


def _check_krylov(owner: str, method: Any) -> None:
    _positive_int(owner, "iterations", method.iterations)
    if method.tol is not None:
        _nonneg(owner, "tol", method.tol)
    _nonneg(owner, "damping", method.damping)


def _krylov_solve(solver: Callable, method: Any) -> Callable:
    """``solver`` (cg, minres) bound to the method's options; ``tol=None``: exactly
    ``iterations`` iterations without monitoring (no host synchronisation)."""
    exact = method.tol is None
    return functools.partial(
        solver,
        iterations=method.iterations,
        tol=0.0 if exact else method.tol,
        damping=method.damping,
        check=not exact,
    )


@dataclass(repr=False)
class CG(Method):
    """Implicit differentiation, ``H w = v`` solved by conjugate gradient (HOAG, iMAML).

    Args:
        iterations: maximum CG iterations.
        tol: stop when the residual norm is below ``tol * ||v||``; ``None`` runs exactly
            ``iterations`` iterations with no host synchronisation (no residual monitoring:
            only the result is checked for NaN/Inf).
        damping: solve ``(H + damping I) w = v`` (iMAML's proximal term adds it to H).

    Example:
        >>> CG(iterations=10, tol=None).tol is None  # exactly 10 iterations, sync-free
        True
    """

    iterations: int = 10
    tol: float | None = 1e-10
    damping: float = 0.0

    name = "cg"

    def __post_init__(self) -> None:
        _check_krylov("CG", self)

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        return implicit_method_vjp(ctx, cotangent, _krylov_solve(cg, self))


@dataclass(repr=False)
class MINRES(Method):
    """Implicit differentiation, ``(H + damping I) w = v`` solved by MINRES (Paige and Saunders
    1975): well posed when ``H`` is indefinite (a non-convex lower loss), where CG is not.

    Args:
        iterations: maximum MINRES iterations.
        tol: stop when the residual norm is below ``tol * ||v||``; ``None`` runs exactly
            ``iterations`` iterations with no host synchronisation.
        damping: solve ``(H + damping I) w = v``.

    Example:
        >>> MINRES(iterations=20, damping=2.0).name
        'minres'
    """

    iterations: int = 10
    tol: float | None = 1e-10
    damping: float = 0.0

    name = "minres"

    def __post_init__(self) -> None:
        _check_krylov("MINRES", self)

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        return implicit_method_vjp(ctx, cotangent, _krylov_solve(minres, self))


@dataclass(repr=False)
class Neumann(Method):
    """Implicit differentiation with a truncated Neumann series for ``H^{-1}`` (Lorraine 2020).

    Args:
        iterations: terms of the series.
        alpha: step of the series; it converges when ``alpha < 2 / λ_max(H)``.
    """

    iterations: int = 10
    alpha: float = 1.0

    name = "neumann"

    def __post_init__(self) -> None:
        _positive_int("Neumann", "iterations", self.iterations)
        _nonneg("Neumann", "alpha", self.alpha, strict=True)

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        solve = functools.partial(neumann, iterations=self.iterations, alpha=self.alpha)
        return implicit_method_vjp(ctx, cotangent, solve)


@dataclass(repr=False)
class FixedPoint(Method):
    """Implicit differentiation by iterating the lower's update map (Grazzi et al. 2020).

    The map is gradient descent with the lower's current learning rate,
    ``Φ(θ) = θ - lr ∇_θ f(θ, φ)``; it converges when ``lr < 2 / λ_max(H)``.
    """

    iterations: int = 10
    tol: float = 1e-10

    name = "fixed_point"

    def __post_init__(self) -> None:
        _positive_int("FixedPoint", "iterations", self.iterations)
        _nonneg("FixedPoint", "tol", self.tol)

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        return fixed_point_vjp(
            ctx.step_fn,
            ctx.params,
            ctx.uppers,
            cotangent,
            iterations=self.iterations,
            tol=self.tol,
            create_graph=create_graph_requested(),
        )


@dataclass(repr=False)
class FiniteDifference(Method):
    """DARTS's second-order approximation by central differences (Liu et al. 2019, eq. 7-8).

    ``-ξ (∇_φ f(θ⁺, φ) - ∇_φ f(θ⁻, φ)) / 2ε`` with ``θ± = θ ± ε v``, ``ε = epsilon / ||v||``, θ the
    lower's parameters before its last update and ξ its learning rate.
    """

    epsilon: float = 0.01

    name = "finite_difference"
    needs_params_before = True

    def __post_init__(self) -> None:
        _nonneg("FiniteDifference", "epsilon", self.epsilon, strict=True)

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        before = ctx.params_before if ctx.params_before is not None else ctx.params
        return darts_vjp(ctx.loss_fn, before, ctx.uppers, cotangent, ctx.lr, epsilon=self.epsilon)


@dataclass(repr=False)
class Forward(Method):
    """Forward-mode hypergradient (Franceschi et al. 2017): tangents ``dθ_t/dφ`` carried along the
    unroll with ``torch.func.jvp``; memory does not grow with the unroll length, cost grows with
    the number of upper parameters.

    Args:
        chunk_size: upper coordinates pushed forward at once (None: all, vectorized).
    """

    chunk_size: int | None = None

    name = "forward"
    differentiable_unroll = False
    tracks_dynamics = True

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            _positive_int("Forward", "chunk_size", self.chunk_size)

    def begin_window(self) -> Any:
        return None

    def after_step(self, memory: Any, transition: Transition) -> Any:
        tangent0 = memory
        _, tangents = forward_unroll(
            transition.step_fn,
            transition.state,
            transition.uppers,
            1,
            tangent0=tangent0,
            init=transition.init,
            chunk_size=self.chunk_size,
        )
        return tangents

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        if ctx.memory is None:
            return tuple(torch.zeros_like(u) for u in ctx.uppers)
        n = len(ctx.params)
        return forward_vjp(ctx.memory, cotangent, n_params=n)


register_method("cg", CG)
register_method("minres", MINRES)
register_method("neumann", Neumann)
register_method("fixed_point", FixedPoint)
register_method("finite_difference", FiniteDifference)
register_method("darts", FiniteDifference)
register_method("forward", Forward)
