"""Multilayer perceptrons, e.g. ``MLP([784, 300, 10])`` for MNIST-sized inputs.

Example:
    >>> net = MLP([784, 300, 10])
    >>> net(torch.randn(5, 1, 28, 28)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch  # noqa: F401  (used by the docstring examples)
from torch import Tensor, nn

from mlopt.errors import ConfigError

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def _activation(spec: str | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(spec, str):
        if spec not in ACTIVATIONS:
            raise ConfigError(f"MLP: unknown activation {spec!r}; use one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[spec]()
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        module = spec()
        if not isinstance(module, nn.Module):
            raise ConfigError("MLP: an activation factory must return an nn.Module")
        return module
    raise ConfigError(f"MLP: activation must be a name or an nn.Module factory, got {spec!r}")


class MLP(nn.Module):
    """Fully connected network ``Linear -> act -> ... -> Linear``.

    Args:
        sizes: layer widths, input first, output last (at least two).
        activation: a name from ``ACTIVATIONS``, an ``nn.Module`` class or factory, or a module
            (stateless modules only: the same instance is reused between layers).
        bias: use biases.
        output_activation: optional activation after the last layer (same forms).

    Inputs with more than two dimensions are flattened after the batch dimension.

    Example:
        >>> MLP([4, 8, 8, 2], activation="tanh")(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Callable[[], nn.Module] = "relu",
        *,
        bias: bool = True,
        output_activation: str | Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ConfigError(f"MLP: sizes needs >= 2 positive widths, got {sizes}")
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(_activation(activation))
        if output_activation is not None:
            layers.append(_activation(output_activation))
        self.net = nn.Sequential(*layers)
        self.sizes = sizes

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        return self.net(x)
