"""Fixed-point iteration for ``x = J x + b``, the linear system of iterative differentiation.

Grazzi, Franceschi, Pontil and Salzo (2020), "On the Iteration Complexity of Hypergradient
Computation", section 3 (fixed-point method): when the lower solution is the fixed point of an
update map ``Φ(θ, φ)`` (e.g. gradient descent ``Φ(θ) = θ - lr ∇f(θ)``), the hypergradient needs
``w = (I - ∂Φ/∂θ^T)^{-1} v``, obtained by iterating ``w ← J w + v`` with ``J = ∂Φ/∂θ^T``. For the
gradient-descent map ``J = I - lr H`` and the limit is ``w = (lr H)^{-1} v``. The iteration
converges for any ``b`` iff the spectral radius of ``J`` is below 1 (``Φ`` a contraction).

Example:
    >>> import torch
    >>> (x,) = fixed_point(lambda v: (0.5 * v[0],), (torch.ones(2, dtype=torch.float64),),
    ...                    iterations=60, tol=0.0)
    >>> x
    tensor([2., 2.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlopt.linalg._monitor import (
    Monitor,
    SolverInfo,
    check_iterations,
    check_nonnegative,
    detached_norm,
)
from mlopt.linalg.vec import Vec, add, as_vec, check_same_shapes, dot, sub, zeros_like

__all__ = ["fixed_point"]

_HINT = (
    "x = J x + b converges only when the spectral radius of J is below 1; for the gradient "
    "descent map J = I - lr*H this needs 0 < lr < 2 / lambda_max(H) and a positive definite H: "
    "use a smaller inner learning rate or add a damping (weight decay) term to the lower loss"
)


def fixed_point(
    matvec: Callable[[Vec], Vec],
    b: Vec,
    *,
    iterations: int = 10,
    tol: float = 1e-10,
    x0: Vec | None = None,
    check: bool = True,
    return_info: bool = False,
) -> Vec | tuple[Vec, SolverInfo]:
    """Solve ``x = J x + b`` by iterating ``x_{k+1} = J x_k + b``, where ``matvec(v) = J v``.

    Started from ``x = 0`` (the default), the first iterate ``x_1 = b`` costs nothing, so with
    ``K = iterations`` the result is ``sum_{k=0}^{K} J^k b``: the same partial sum as
    :func:`~mlopt.linalg.neumann` with ``J = I - alpha A``. The residual of ``x_k`` is
    ``J x_k + b - x_k = x_{k+1} - x_k``; iterations stop when its norm is at most
    ``tol * ||b||`` (the returned iterate is the last one computed, one step further).

    Args:
        matvec: ``v -> J v`` (for hypergradients, the transposed Jacobian of the update map).
        b: right-hand side, a tuple of tensors.
        iterations: maximum number of ``matvec`` calls.
        tol: relative tolerance on ``||x_{k+1} - x_k||``; ``0`` runs every iteration.
        x0: starting point (warm start); zeros by default.
        check: monitor the residual (tolerance, NaN/Inf, divergence); ``False`` runs exactly
            ``iterations`` iterations without device synchronisation (``torch.func``-friendly).
        return_info: also return a :class:`SolverInfo`; ``residual`` is the last step length
            ``||x_K - x_{K-1}||``, ``initial_residual`` the residual of the starting point
            (``||b||`` from zero).

    Returns:
        ``x``, or ``(x, info)`` with ``return_info=True``.

    Raises:
        HypergradientError: an iterate became NaN/Inf, or the step length grew more than
            1e6-fold over the starting residual (``J`` is not a contraction).
        ConfigError: invalid ``iterations`` or ``tol``.

    Example:
        >>> import functools
        >>> solve = functools.partial(fixed_point, iterations=100, tol=0.0)
        >>> solve(lambda v: (0.5 * v[0],), (torch.ones(1, dtype=torch.float64),))
        (tensor([2.], dtype=torch.float64),)
    """
    check_iterations("fixed_point", iterations)
    check_nonnegative("fixed_point", "tol", tol)
    b = as_vec(b, "b")
    monitor = Monitor("fixed_point", _HINT, check)
    threshold = None
    if check:
        with torch.no_grad():
            threshold = tol * float(torch.sqrt(dot(b, b)))
    done = 0
    if x0 is None:
        # x_0 = 0 has residual b and x_1 = J 0 + b = b needs no product.
        x = r_start = b
        initial = monitor.start(b)
        converged = check and initial <= threshold
        if converged:
            x = zeros_like(b)
    else:
        x = as_vec(x0, "x0")
        check_same_shapes(b, x, "fixed_point: x0 vs b")
        jx = matvec(x)
        monitor.first_output(b, jx)
        x_new = add(jx, b)
        done = 1
        r_start = sub(x_new, x)
        initial = monitor.start(r_start)
        converged = check and initial <= threshold
        x = x_new
    step = None
    while done < iterations and not converged:
        jx = matvec(x)
        if done == 0:
            monitor.first_output(b, jx)
        x_new = add(jx, b)
        step = sub(x_new, x)
        x = x_new
        done += 1
        value = monitor.observe(done, step, x)
        if check and value <= threshold:
            converged = True
    if not return_info:
        return x
    if initial is None:
        initial = float(detached_norm(r_start))
    last = initial if step is None else monitor.final(step)
    info = SolverInfo(
        solver="fixed_point",
        iterations=done,
        residual=last,
        initial_residual=initial,
        converged=bool(converged),
    )
    return x, info
