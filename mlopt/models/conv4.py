"""The four-block convolutional network of few-shot learning ("Conv4", BOML's "V1").

Vinyals et al. (2016) and Finn et al. (2017, MAML): four blocks of 3x3 convolution with
``hidden`` filters, batch normalization, ReLU and 2x2 max pooling, then a linear classifier.
On 28x28 Omniglot the feature map ends 1x1 (``hidden`` features), on 84x84 mini-ImageNet 5x5.

Batch normalization modes:

- ``"transductive"``: batch statistics in training *and* evaluation, no running statistics
  (``track_running_stats=False``), as MAML does; works under ``torch.func.vmap``.
- ``"running"``: standard batch norm with running statistics (buffers updated in training).
- ``"per-step"``: per-step batch norm of Antoniou et al. (2019, MAML++): separate running
  statistics, weights and biases for each inner step; pass ``step=k`` to ``forward``.
- ``"none"``: no normalization.

Example:
    >>> net = Conv4(in_channels=1, num_classes=5)
    >>> net(torch.randn(10, 1, 28, 28)).shape
    torch.Size([10, 5])
    >>> net.features(torch.randn(10, 1, 28, 28)).shape
    torch.Size([10, 64])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlopt.errors import ConfigError

__all__ = ["Conv4", "PerStepBatchNorm2d", "make_batch_norm", "BATCH_NORM_MODES"]

BATCH_NORM_MODES = ("transductive", "running", "per-step", "none")


class PerStepBatchNorm2d(nn.Module):
    """Batch norm with one set of statistics, weight and bias per inner step (MAML++).

    In training mode it normalizes with batch statistics and updates the running statistics of
    ``step``; in evaluation mode it uses the running statistics of ``step``.

    Example:
        >>> bn = PerStepBatchNorm2d(3, num_steps=5)
        >>> bn(torch.randn(4, 3, 2, 2), step=2).shape
        torch.Size([4, 3, 2, 2])
    """

    def __init__(
        self, num_features: int, num_steps: int, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ConfigError(f"PerStepBatchNorm2d: num_steps must be >= 1, got {num_steps}")
        self.num_steps, self.eps, self.momentum = num_steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_steps, num_features))
        self.bias = nn.Parameter(torch.zeros(num_steps, num_features))
        self.register_buffer("running_mean", torch.zeros(num_steps, num_features))
        self.register_buffer("running_var", torch.ones(num_steps, num_features))

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        if not 0 <= step < self.num_steps:
            raise ConfigError(
                f"PerStepBatchNorm2d: step {step} out of range 0..{self.num_steps - 1}; "
                "raise num_steps or clamp the step"
            )
        # running_mean[step] is a view: F.batch_norm updates that row of the buffer.
        return F.batch_norm(
            x,
            self.running_mean[step],
            self.running_var[step],
            self.weight[step],
            self.bias[step],
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )


def make_batch_norm(mode: str, channels: int, num_steps: int = 1) -> nn.Module:
    """The normalization layer for one of ``BATCH_NORM_MODES``."""
    if mode == "transductive":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if mode == "running":
        return nn.BatchNorm2d(channels)
    if mode == "per-step":
        return PerStepBatchNorm2d(channels, num_steps)
    if mode == "none":
        return nn.Identity()
    raise ConfigError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {mode!r}")


def _out_size(size: int, blocks: int) -> int:
    for _ in range(blocks):
        size //= 2
    return size


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, mode: str, num_steps: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = make_batch_norm(mode, cout, num_steps)
        self.per_step = mode == "per-step"

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        x = self.conv(x)
        x = self.norm(x, step) if self.per_step else self.norm(x)
        return F.max_pool2d(F.relu(x), 2)


class Conv4(nn.Module):
    """Four conv blocks (conv3x3 -> batch norm -> ReLU -> maxpool 2) and a linear head.

    Args:
        in_channels: 1 for Omniglot, 3 for mini-ImageNet.
        num_classes: outputs of the head; ``None`` for no head (``forward`` gives features).
        hidden: filters per block (64 in Vinyals et al. 2016 and BOML; MAML used 32 on
            mini-ImageNet).
        image_size: input side (or ``(H, W)``), to size the head: 28 -> ``hidden`` features,
            84 -> ``hidden * 25``.
        batch_norm: one of ``BATCH_NORM_MODES``.
        num_steps: number of inner steps for ``batch_norm="per-step"``.
        blocks: number of conv blocks (4).

    ``features(x)`` returns the flattened embedding and ``head`` is the linear classifier, for
    ANIL-style training of the head alone.

    Example:
        >>> net = Conv4(3, 5, image_size=84)
        >>> net(torch.randn(2, 3, 84, 84)).shape, net.feature_dim
        (torch.Size([2, 5]), 1600)
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int | None = 5,
        *,
        hidden: int = 64,
        image_size: int | tuple[int, int] = 28,
        batch_norm: str = "transductive",
        num_steps: int = 1,
        blocks: int = 4,
    ) -> None:
        super().__init__()
        if batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(
                f"Conv4: batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}"
            )
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        oh, ow = _out_size(h, blocks), _out_size(w, blocks)
        if oh < 1 or ow < 1:
            raise ConfigError(
                f"Conv4: a {h}x{w} input shrinks to nothing after {blocks} poolings; use larger "
                "images or fewer blocks"
            )
        chans = [in_channels] + [hidden] * blocks
        self.blocks = nn.ModuleList(
            _ConvBlock(chans[i], chans[i + 1], batch_norm, num_steps) for i in range(blocks)
        )
        self.batch_norm = batch_norm
        self.feature_dim = hidden * oh * ow
        self.head: nn.Module = (
            nn.Identity() if num_classes is None else nn.Linear(self.feature_dim, num_classes)
        )

    def features(self, x: Tensor, step: int = 0) -> Tensor:
        """Flattened embedding ``(batch, feature_dim)``."""
        for block in self.blocks:
            x = block(x, step)
        return x.flatten(1)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        return self.head(self.features(x, step))
