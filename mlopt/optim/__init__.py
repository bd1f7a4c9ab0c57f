"""Differentiable (functional) versions of ``torch.optim`` update rules.

Used when a lower-level problem is unrolled differentiably (reverse- or forward-mode
hypergradients, MAML): :mod:`mlopt.optim.rules` holds the pure per-tensor rules of SGD, Adam and
AdamW, and :class:`DifferentiableOptimizer` applies them with the hyperparameters and state of the
user's own optimizer object.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> is_supported(torch.optim.SGD([w], lr=0.1)), supported_optimizers()
    (True, ('SGD', 'Adam', 'AdamW'))
"""

from mlopt.optim import rules
from mlopt.optim.differentiable import DifferentiableOptimizer, is_supported, supported_optimizers
from mlopt.optim.rules import adam, adamw, safe_sqrt, sgd

__all__ = [
    "DifferentiableOptimizer",
    "adam",
    "adamw",
    "is_supported",
    "rules",
    "safe_sqrt",
    "sgd",
    "supported_optimizers",
]
