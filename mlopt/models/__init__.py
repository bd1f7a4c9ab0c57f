"""Networks used by meta-learning and hyperparameter benchmarks: Conv4, ResNet-12, MLP.

They hold no Python-side state that depends on parameter values, so they run under
``torch.func.functional_call`` (and, with ``batch_norm="transductive"``, under ``vmap``).

Example:
    >>> import torch
    >>> from mlopt.models import Conv4
    >>> Conv4(1, 5)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 5])
"""

from mlopt.models.conv4 import BATCH_NORM_MODES, Conv4, PerStepBatchNorm2d, make_batch_norm
from mlopt.models.mlp import ACTIVATIONS, MLP
from mlopt.models.resnet12 import ResidualBlock, ResNet12

__all__ = [
    "ACTIVATIONS",
    "BATCH_NORM_MODES",
    "Conv4",
    "MLP",
    "PerStepBatchNorm2d",
    "ResNet12",
    "ResidualBlock",
    "make_batch_norm",
]
