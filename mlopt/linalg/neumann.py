"""Truncated Neumann series for ``A x = b``: ``x = alpha * sum_{k=0}^{K} (I - alpha A)^k b``.

Lorraine, Vicol and Duvenaud (2020), "Optimizing Millions of Hyperparameters by Implicit
Differentiation", Algorithm 3: the inverse Hessian-vector product ``H^{-1} v`` as a truncated
Neumann series, which only needs Hessian-vector products. For a symmetric positive definite ``A``
the series converges iff ``0 < alpha < 2 / lambda_max(A)``; the error then shrinks monotonically
(each eigen-component by the factor ``|1 - alpha lambda|`` per term).

Example:
    >>> import torch
    >>> (x,) = neumann(lambda v: (2.0 * v[0],), (torch.ones(2, dtype=torch.float64),),
    ...                iterations=30, alpha=0.4)
    >>> x
    tensor([0.5000, 0.5000], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlopt.errors import ConfigError
from mlopt.linalg._monitor import Monitor, SolverInfo, check_iterations, detached_norm
from mlopt.linalg.vec import Vec, add, as_vec, scale, sub

__all__ = ["neumann"]


def neumann(
    matvec: Callable[[Vec], Vec],
    b: Vec,
    *,
    iterations: int = 10,
    alpha: float | torch.Tensor = 1.0,
    check: bool = True,
    return_info: bool = False,
) -> Vec | tuple[Vec, SolverInfo]:
    """Approximate ``A^{-1} b`` by ``alpha * sum_{k=0}^{K} (I - alpha A)^k b``, ``K = iterations``.

    Uses ``K`` products with ``A``. The term ``(I - alpha A)^{k+1} b`` is exactly the residual
    ``b - A x_k`` of the partial sum ``x_k``, so the monitor watches the terms: when a term grows
    more than 1e6-fold over ``||b||`` the series diverges (``alpha >= 2 / lambda_max(A)`` or an
    ``A`` with negative eigenvalues) and a :class:`HypergradientError` says so.

    Args:
        matvec: ``v -> A v``.
        b: right-hand side, a tuple of tensors.
        iterations: ``K``, the number of terms after the first (``matvec`` calls).
        alpha: step size; needs ``0 < alpha < 2 / lambda_max(A)``. For a Hessian this is the
            inner learning rate of the gradient descent the series mimics.
        check: monitor NaN/Inf and divergence (one device synchronisation per iteration);
            ``False`` for ``torch.func``/``torch.compile`` use.
        return_info: also return a :class:`SolverInfo`; its ``residual`` is ``||b - A x||``,
            which costs one more ``matvec``.

    Returns:
        ``x``, or ``(x, info)`` with ``return_info=True``.

    Raises:
        HypergradientError: a term became NaN/Inf or grew more than 1e6-fold.
        ConfigError: ``iterations < 0`` or ``alpha <= 0``.

    Example:
        >>> import functools
        >>> solve = functools.partial(neumann, iterations=50, alpha=0.3)
        >>> solve(lambda v: (3.0 * v[0],), (torch.ones(1, dtype=torch.float64),))
        (tensor([0.3333], dtype=torch.float64),)
    """
    check_iterations("neumann", iterations)
    value = float(alpha.detach()) if isinstance(alpha, torch.Tensor) else alpha
    if not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(f"neumann: alpha must be a finite number > 0, got {alpha!r}")
    b = as_vec(b, "b")
    hint = (
        f"the Neumann series converges only when alpha < 2 / lambda_max(A) and A is positive "
        f"definite; use a smaller alpha (e.g. alpha={value / 10:g} instead of {value:g}), add a "
        "damping term to the Hessian, or use cg"
    )
    monitor = Monitor("neumann", hint, check)
    monitor.start(b)
    term, total = b, b
    for k in range(1, iterations + 1):
        a_term = matvec(term)
        if k == 1:
            monitor.first_output(b, a_term)
        term = sub(term, scale(a_term, alpha))
        total = add(total, term)
        monitor.observe(k, term, term)
    x = scale(total, alpha)
    if not return_info:
        return x
    residual = sub(b, matvec(x))
    info = SolverInfo(
        solver="neumann",
        iterations=iterations,
        residual=float(detached_norm(residual)),
        initial_residual=float(detached_norm(b)),
        converged=False,
    )
    return x, info
