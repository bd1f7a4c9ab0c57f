"""Closed-form multilevel problems and checkers, so users can verify their own methods.

Example:
    >>> from mlopt.testing import QuadraticBilevel
    >>> QuadraticBilevel.random(n=2, m=2).n
    2
"""

from mlopt.testing.quadratic import QuadraticBilevel, capture_gradients

__all__ = ["QuadraticBilevel", "capture_gradients"]

try:  # closed forms added alongside (ridge HPO, nested 3-level quadratics)
    from mlopt.testing.nested import *  # noqa: F401,F403
    from mlopt.testing.nested import __all__ as _nested_all
    from mlopt.testing.ridge import *  # noqa: F401,F403
    from mlopt.testing.ridge import __all__ as _ridge_all

    __all__ += list(_ridge_all) + list(_nested_all)
except ImportError:  # pragma: no cover - transitional
    pass
