"""Lower-level dynamics that mix levels: Bi-level Descent Aggregation (BDA, Liu et al. 2020).

Pure functions (:func:`bda_direction`, :func:`bda_objective`, :func:`alpha_at`), learnable
coefficients (:class:`BDAParameters`) and the Problem-level wiring (:class:`BDAProblem`,
:class:`BDA`).

Example:
    >>> from mlopt.dynamics import BDA, alpha_at
    >>> alpha_at(0.9, 3, "harmonic")
    0.3
"""

from mlopt.dynamics.bda import (
    SCHEDULES,
    BDAParameters,
    alpha_at,
    bda_direction,
    bda_objective,
    schedule_factor,
)
from mlopt.dynamics.problem import (
    BDA,
    BDAProblem,
    bda_coefficients,
    bda_training_step,
    upper_batch,
    window_step,
)

__all__ = [
    "BDA",
    "BDAParameters",
    "BDAProblem",
    "SCHEDULES",
    "alpha_at",
    "bda_coefficients",
    "bda_direction",
    "bda_objective",
    "bda_training_step",
    "schedule_factor",
    "upper_batch",
    "window_step",
]
