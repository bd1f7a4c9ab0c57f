"""mlopt: multilevel optimization for PyTorch.

Write each level as a :class:`Problem`, declare who depends on whom, and let the :class:`Engine`
schedule the lower-level updates and compute hypergradients.

Example:
    >>> import mlopt
    >>> sorted(mlopt.hypergrad.available_methods())[:3]
    ['cg', 'darts', 'finite_difference']
"""

from mlopt import dynamics, hypergrad
from mlopt.config import Config, EngineConfig
from mlopt.engine import Engine
from mlopt.errors import ConfigError, DependencyError, HypergradientError, MLOptError
from mlopt.problem import Problem

__version__ = "0.1.0"

__all__ = [
    "Problem",
    "Engine",
    "Config",
    "EngineConfig",
    "MLOptError",
    "DependencyError",
    "ConfigError",
    "HypergradientError",
    "hypergrad",
    "dynamics",
    "__version__",
]
