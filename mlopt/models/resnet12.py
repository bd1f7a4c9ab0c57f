"""ResNet-12 for few-shot learning (BOML's "V2").

Oreshkin et al. (2018, TADAM) and Lee et al. (2019, MetaOptNet): four residual blocks, each of
three 3x3 convolutions with batch norm and leaky ReLU (slope 0.1), a 1x1 convolution shortcut,
then 2x2 max pooling; widths 64-160-320-640. On 84x84 inputs the last map is 5x5, averaged to a
640-dimensional embedding (or flattened with ``avg_pool=False``). Dropout is off by default.

Example:
    >>> net = ResNet12(in_channels=3, num_classes=5, channels=(8, 16, 32, 64))
    >>> net(torch.randn(2, 3, 84, 84)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (used by the docstring examples)
import torch.nn.functional as F
from torch import Tensor, nn

from mlopt.errors import ConfigError
from mlopt.models.conv4 import make_batch_norm

__all__ = ["ResNet12", "ResidualBlock"]


class ResidualBlock(nn.Module):
    """Three conv3x3-BN layers with leaky ReLU, a conv1x1-BN shortcut, ReLU, pooling, dropout.

    Example:
        >>> ResidualBlock(3, 8)(torch.randn(2, 3, 10, 10)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        batch_norm: str = "running",
        negative_slope: float = 0.1,
        dropout: float = 0.0,
        pool: bool = True,
    ) -> None:
        super().__init__()
        if batch_norm == "per-step":
            raise ConfigError("ResNet12: batch_norm='per-step' is supported by Conv4 only")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = make_batch_norm(batch_norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = make_batch_norm(batch_norm, cout)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = make_batch_norm(batch_norm, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_shortcut = make_batch_norm(batch_norm, cout)
        self.negative_slope, self.dropout, self.pool = negative_slope, dropout, pool

    def forward(self, x: Tensor) -> Tensor:
        act = lambda t: F.leaky_relu(t, self.negative_slope)  # noqa: E731
        out = act(self.bn1(self.conv1(x)))
        out = act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = act(out + self.bn_shortcut(self.shortcut(x)))
        if self.pool:
            out = F.max_pool2d(out, 2)
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return out


class ResNet12(nn.Module):
    """ResNet-12 embedding with an optional linear head.

    Args:
        in_channels: input channels (3 for mini-ImageNet).
        num_classes: outputs of the linear head; ``None`` for none (``forward`` = features).
        channels: widths of the four blocks.
        batch_norm: ``"running"`` (default), ``"transductive"`` or ``"none"``
            (see :mod:`mlopt.models.conv4`).
        negative_slope: leaky ReLU slope (0 gives ReLU).
        dropout: dropout rate after each block (0: off).
        avg_pool: average the last feature map (else flatten; then give ``image_size``).
        image_size: input side, used only to size the head when ``avg_pool=False``.

    Example:
        >>> net = ResNet12(3, None, channels=(4, 4, 8, 8))
        >>> net.features(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 8])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int | None = 5,
        *,
        channels: Sequence[int] = (64, 160, 320, 640),
        batch_norm: str = "running",
        negative_slope: float = 0.1,
        dropout: float = 0.0,
        avg_pool: bool = True,
        image_size: int = 84,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or any(c < 1 for c in channels):
            raise ConfigError(f"ResNet12: channels must be positive widths, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"ResNet12: dropout must lie in [0, 1), got {dropout}")
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ResidualBlock(
                widths[i],
                widths[i + 1],
                batch_norm=batch_norm,
                negative_slope=negative_slope,
                dropout=dropout,
            )
            for i in range(len(channels))
        )
        self.avg_pool = avg_pool
        side = image_size
        for _ in channels:
            side //= 2
        if not avg_pool and side < 1:
            raise ConfigError(f"ResNet12: image_size {image_size} is too small to flatten")
        self.feature_dim = channels[-1] if avg_pool else channels[-1] * side * side
        self.head: nn.Module = (
            nn.Identity() if num_classes is None else nn.Linear(self.feature_dim, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def features(self, x: Tensor) -> Tensor:
        """Embedding ``(batch, feature_dim)``."""
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(-2, -1)) if self.avg_pool else x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
