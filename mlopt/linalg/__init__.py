"""Matrix-free linear solvers sharing the contract ``solve(matvec, b) -> x``.

Vectors are tuples of tensors (one per parameter tensor); ``matvec`` maps such a tuple to another
(a Hessian-vector product, a transposed Jacobian-vector product). Bind options with
:func:`functools.partial` to get a ``solve``:

Example:
    >>> import functools, torch
    >>> from mlopt.linalg import cg, neumann
    >>> solve = functools.partial(cg, iterations=20, tol=1e-10)
    >>> solve(lambda v: (4.0 * v[0],), (torch.ones(2),))
    (tensor([0.2500, 0.2500]),)

The solvers:

- :func:`cg`: conjugate gradient for symmetric positive definite systems (HOAG, iMAML);
- :func:`minres`: MINRES for symmetric indefinite systems (a non-convex lower's Hessian);
- :func:`neumann`: truncated Neumann series (Lorraine et al. 2020);
- :func:`fixed_point`: ``x = J x + b`` by iteration (Grazzi et al. 2020).

All raise :class:`mlopt.HypergradientError` on NaN/Inf iterates or divergence, and return a
:class:`SolverInfo` as well with ``return_info=True``.
"""

from mlopt.linalg import vec
from mlopt.linalg._monitor import DIVERGENCE_FACTOR, SolverInfo
from mlopt.linalg.cg import cg
from mlopt.linalg.fixed_point import fixed_point
from mlopt.linalg.minres import minres
from mlopt.linalg.neumann import neumann
from mlopt.linalg.vec import Vec

__all__ = [
    "cg",
    "minres",
    "neumann",
    "fixed_point",
    "SolverInfo",
    "DIVERGENCE_FACTOR",
    "Vec",
    "vec",
]
