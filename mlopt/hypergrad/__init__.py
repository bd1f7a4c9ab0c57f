"""Hypergradient methods: pure functions over tensors and closures, and the method objects that
``Config(type=...)`` accepts.

Example:
    >>> import mlopt.hypergrad as hg
    >>> "reverse" in hg.available_methods()
    True
"""

from mlopt.hypergrad.base import (
    LowerContext,
    Method,
    Transition,
    Vec,
    attach,
    available_methods,
    register_method,
    resolve_method,
)
from mlopt.hypergrad.first_order import FirstOrder, Reptile, first_order_vjp, reptile_gradient
from mlopt.hypergrad.methods import (
    CG,
    MINRES,
    FiniteDifference,
    FixedPoint,
    Forward,
    Neumann,
    implicit_method_vjp,
)
from mlopt.hypergrad.reverse import Reverse, reverse_vjp, unroll
from mlopt.hypergrad.sama import SAMA, sama_vjp

__all__ = [
    "implicit_method_vjp",
    "LowerContext",
    "Method",
    "Transition",
    "Vec",
    "attach",
    "available_methods",
    "register_method",
    "resolve_method",
    "Reverse",
    "FirstOrder",
    "Reptile",
    "CG",
    "MINRES",
    "Neumann",
    "FixedPoint",
    "FiniteDifference",
    "Forward",
    "SAMA",
    "sama_vjp",
    "reverse_vjp",
    "unroll",
    "first_order_vjp",
    "reptile_gradient",
]
