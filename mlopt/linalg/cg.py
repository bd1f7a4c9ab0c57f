"""Conjugate gradient for ``(A + damping I) x = b`` with a matrix-free, possibly differentiable A.

Hestenes and Stiefel (1952); used for hypergradients by HOAG (Pedregosa 2016, "Hyperparameter
optimization with approximate gradient") and iMAML (Rajeswaran et al. 2019, "Meta-Learning with
Implicit Gradients"), where ``A`` is the Hessian of the lower loss and ``matvec`` a
Hessian-vector product.

Example:
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> (x,) = cg(lambda v: (A @ v[0],), (torch.tensor([1.0, 2.0], dtype=torch.float64),),
    ...           iterations=2)
    >>> x
    tensor([0.0909, 0.6364], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlopt.errors import HypergradientError
from mlopt.linalg._monitor import (
    Monitor,
    SolverInfo,
    check_iterations,
    check_nonnegative,
    damped,
)
from mlopt.linalg.vec import Vec, add, as_vec, check_same_shapes, dot, sub, zeros_like

__all__ = ["cg"]

_HINT = (
    "A + damping*I is probably not positive definite (e.g. the Hessian of a non-convex lower "
    "loss) or badly conditioned: increase damping (e.g. damping=1e-3 relative to the Hessian's "
    "scale), or use neumann with a small alpha"
)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 0 where ``den == 0`` (no data-dependent Python control flow)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1.0, den))


def cg(
    matvec: Callable[[Vec], Vec],
    b: Vec,
    *,
    iterations: int = 10,
    tol: float = 1e-10,
    damping: float | torch.Tensor = 0.0,
    x0: Vec | None = None,
    check: bool = True,
    return_info: bool = False,
) -> Vec | tuple[Vec, SolverInfo]:
    """Solve ``(A + damping I) x = b`` for a symmetric positive (semi-)definite ``A``.

    ``A`` is given only through ``matvec(v) = A v`` on tuples of tensors (one per parameter
    tensor), e.g. a Hessian-vector product. The iterations are plain torch operations: when
    ``matvec`` and ``b`` carry an autograd graph (``create_graph=True``), the returned ``x`` is
    differentiable through every iteration actually performed.

    Args:
        matvec: ``v -> A v`` (A symmetric).
        b: right-hand side, a tuple of tensors.
        iterations: maximum number of iterations (one ``matvec`` each; at most ``len(x)`` are
            needed in exact arithmetic).
        tol: stop when ``||r|| <= tol * ||b||`` (``r = b - (A + damping I) x``); ``0`` runs
            every iteration unless the residual is exactly zero.
        damping: ``damping * I`` is added to ``A`` (Tikhonov / proximal term, as in iMAML).
        x0: starting point (warm start); zeros by default.
        check: monitor the residual: stop at ``tol``, raise on NaN/Inf and divergence. With
            ``check=False`` exactly ``iterations`` iterations run with no device
            synchronisation and no data-dependent Python control flow (usable inside
            ``torch.func.vmap`` or ``torch.compile``).
        return_info: also return a :class:`SolverInfo`.

    Returns:
        ``x``, or ``(x, info)`` with ``return_info=True``.

    Raises:
        HypergradientError: an iterate became NaN/Inf, the residual grew more than 1e6-fold
            (divergence), or ``p^T (A + damping I) p = 0`` with a nonzero residual (breakdown:
            the matrix is singular along the search direction).
        ConfigError: invalid ``iterations``, ``tol`` or ``damping``.

    Example:
        >>> import functools
        >>> solve = functools.partial(cg, iterations=20, tol=1e-10)
        >>> solve(lambda v: (2.0 * v[0],), (torch.ones(3),))
        (tensor([0.5000, 0.5000, 0.5000]),)
    """
    check_iterations("cg", iterations)
    check_nonnegative("cg", "tol", tol)
    check_nonnegative("cg", "damping", damping)
    b = as_vec(b, "b")
    op = damped(matvec, damping)
    monitor = Monitor("cg", _HINT, check)

    if x0 is None:
        x, r = zeros_like(b), b
    else:
        x = as_vec(x0, "x0")
        check_same_shapes(b, x, "cg: x0 vs b")
        ax = op(x)
        monitor.first_output(b, ax)
        r = sub(b, ax)
    r_start = r
    initial = monitor.start(r)
    threshold = None
    if check:
        with torch.no_grad():
            threshold = tol * float(torch.sqrt(dot(b, b)))
    p = r
    rs = dot(r, r)
    done = 0
    converged = check and initial <= threshold
    negative = False
    while done < iterations and not converged:
        ap = op(p)
        if done == 0:
            monitor.first_output(b, ap)
        pap = dot(p, ap)
        if check:
            curvature = float(pap.detach())
            if curvature == 0.0:
                raise HypergradientError(
                    f"cg broke down at iteration {done + 1}: p^T (A + damping*I) p = 0 with a "
                    f"nonzero residual {monitor.last:.3e}, so the matrix is singular along the "
                    "search direction; add damping (e.g. damping=1e-3)"
                )
            negative = negative or curvature < 0.0
        alpha = _safe_div(rs, pap)
        x = add(x, p, alpha)
        r = add(r, ap, -alpha)
        rs_new = dot(r, r)
        done += 1
        value = monitor.observe(done, r, x)
        if check and value <= threshold:
            converged = True
            break
        p = add(r, p, _safe_div(rs_new, rs))
        rs = rs_new
    if not return_info:
        return x
    info = SolverInfo(
        solver="cg",
        iterations=done + (0 if x0 is None else 1),
        residual=monitor.final(r),
        initial_residual=initial if initial is not None else monitor.final(r_start),
        converged=bool(converged),
        negative_curvature=negative,
    )
    return x, info
