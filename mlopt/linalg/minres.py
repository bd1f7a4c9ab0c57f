"""MINRES for symmetric, possibly indefinite ``(A + damping I) x = b`` with a matrix-free A.

Paige and Saunders (1975), "Solution of sparse indefinite systems of linear equations". Where CG
needs a positive definite matrix (it minimises a quadratic), MINRES minimises the residual norm
``||b - (A + damping I) x||`` over the Krylov space, so it is well posed for the Hessian of a
non-convex lower loss at a saddle or a non-convex meta-initialization (iMAML on a Conv4), and its
residual never increases. Like :func:`mlopt.linalg.cg` it works on tuples of tensors, the
iterations are plain torch operations (differentiable when ``matvec`` and ``b`` carry a graph),
and with ``check=False`` it runs exactly ``iterations`` iterations without host synchronisation.

Example:
    >>> import torch
    >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)  # indefinite
    >>> (x,) = minres(lambda v: (A @ v[0],), (torch.tensor([3.0, 1.0], dtype=torch.float64),),
    ...               iterations=2)
    >>> [round(float(t), 12) for t in x]
    [1.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mlopt.errors import HypergradientError
from mlopt.linalg._monitor import (
    DIVERGENCE_FACTOR,
    SolverInfo,
    check_iterations,
    check_nonnegative,
    damped,
)
from mlopt.linalg.vec import Vec, add, as_vec, check_same_shapes, dot, scale, sub, zeros_like

__all__ = ["minres"]


def _lanczos_step(
    op: Callable[[Vec], Vec], r1: Vec, r2: Vec, beta: torch.Tensor, oldb: torch.Tensor, first: bool
) -> tuple[Vec, Vec, torch.Tensor, torch.Tensor]:
    """One Lanczos step: the new basis vector ``v``, the next ``r2``, ``alpha`` and ``beta``."""
    v = scale(r2, 1.0 / beta)
    y = op(v)
    if not first:
        y = add(y, r1, -beta / oldb)
    alpha = dot(v, y)
    y = add(y, r2, -alpha / beta)
    return v, y, alpha, torch.sqrt(dot(y, y))


def minres(
    matvec: Callable[[Vec], Vec],
    b: Vec,
    *,
    iterations: int = 10,
    tol: float = 1e-10,
    damping: float | torch.Tensor = 0.0,
    check: bool = True,
    return_info: bool = False,
) -> Vec | tuple[Vec, SolverInfo]:
    """Solve ``(A + damping I) x = b`` for a symmetric (not necessarily definite) ``A``.

    Args:
        matvec: ``v -> A v`` (A symmetric), e.g. a Hessian-vector product.
        b: right-hand side, a tuple of tensors.
        iterations: maximum number of iterations (one ``matvec`` each; ``len(x)`` suffice in
            exact arithmetic).
        tol: stop when the residual norm (MINRES's recurrence, exact in exact arithmetic) is at
            most ``tol * ||b||``.
        damping: ``damping * I`` is added to ``A``.
        check: stop at ``tol`` or when the Krylov space is exhausted, and raise on NaN/Inf;
            with ``check=False`` exactly ``iterations`` iterations run with no host
            synchronisation.
        return_info: also return a :class:`~mlopt.linalg.SolverInfo`.

    Returns:
        ``x``, or ``(x, info)`` with ``return_info=True``.

    Raises:
        HypergradientError: a non-finite right-hand side or iterate.
        ConfigError: invalid ``iterations``, ``tol`` or ``damping``.
    """
    check_iterations("minres", iterations)
    check_nonnegative("minres", "tol", tol)
    check_nonnegative("minres", "damping", damping)
    b = as_vec(b, "b")
    op = damped(matvec, damping)
    x = zeros_like(b)
    beta1 = torch.sqrt(dot(b, b))
    b_norm = float(beta1.detach()) if check else None
    if check and not math.isfinite(b_norm):
        raise HypergradientError("minres: the right-hand side b is not finite (NaN/Inf)")
    if check and b_norm == 0.0:
        info = SolverInfo("minres", 0, 0.0, 0.0, True)
        return (x, info) if return_info else x
    zero = torch.zeros_like(beta1)
    r1, r2, beta, oldb = b, b, beta1, zero
    dbar, epsln, phibar, cs, sn = zero, zero, beta1, -torch.ones_like(beta1), zero
    w, w2 = zeros_like(b), zeros_like(b)
    done, converged, residual = 0, False, b_norm
    while done < iterations:
        v, y, alpha, new_beta = _lanczos_step(op, r1, r2, beta, oldb, done == 0)
        if done == 0 and check:
            check_same_shapes(b, y, "minres: matvec output vs right-hand side b")
        r1, r2, oldb, beta = r2, y, beta, new_beta
        oldeps = epsln  # the previous plane rotation, applied to the new column
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln, dbar = sn * beta, -cs * beta
        gamma = torch.sqrt(gbar * gbar + beta * beta).clamp_min(torch.finfo(beta.dtype).tiny)
        cs, sn = gbar / gamma, beta / gamma  # the next rotation
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = scale(sub(sub(v, scale(w1, oldeps)), scale(w2, delta)), 1.0 / gamma)
        x = add(x, w, phi)
        done += 1
        if check:
            residual, size = (float(t) for t in torch.stack([phibar, beta]).detach().tolist())
            if not (math.isfinite(residual) and all(torch.isfinite(t).all() for t in x)):
                raise HypergradientError(
                    f"minres: the iterate became non-finite (NaN/Inf) at iteration {done}"
                )
            if residual > DIVERGENCE_FACTOR * b_norm:  # (cannot happen in exact arithmetic)
                raise HypergradientError(f"minres: residual {residual:.3e} blew up at {done}")
            if residual <= tol * b_norm or size <= 1e-14 * b_norm:  # solved, or space exhausted
                converged = residual <= tol * b_norm or size <= 1e-14 * b_norm
                break
    if not return_info:
        return x
    if residual is None:
        residual = float(phibar.detach())
    return x, SolverInfo("minres", done, residual, float(beta1.detach()), bool(converged and check))
