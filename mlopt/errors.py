"""Error classes raised by mlopt.

Every error is a :class:`MLOptError`, itself a :class:`ValueError`, so code that already catches
``ValueError`` keeps working. Messages name the problem(s) involved and say how to fix the input.

Example:
    >>> import mlopt
    >>> try:
    ...     raise mlopt.ConfigError("problem 'inner': unroll_steps must be >= 1, got 0")
    ... except ValueError as err:
    ...     print(type(err).__name__)
    ConfigError
"""

from __future__ import annotations

__all__ = ["MLOptError", "DependencyError", "ConfigError", "HypergradientError"]


class MLOptError(ValueError):
    """Base class of every error mlopt raises on purpose."""


class DependencyError(MLOptError):
    """The problems or the ``u2l``/``l2u`` dependency dicts do not form a valid program."""


class ConfigError(MLOptError):
    """A ``Config``/``EngineConfig`` value, or a problem's set-up, is invalid."""


class HypergradientError(MLOptError):
    """A loss, gradient or hypergradient is not finite, or a linear solver diverged."""
