"""Meta-learned modules that an upper problem holds and a lower problem's update or forward uses.

- :class:`MetaSGD`: a meta-initialization plus one learned learning rate per parameter
  element (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning"). The
  lower returns ``list(self.<upper>.module.lrs)`` from ``Problem.learning_rates()``.
- :class:`MTNet`: MT-net (Lee and Choi 2018, "Gradient-Based Meta-Learning with Learned
  Layerwise Metric and Subspace"): after each task layer ``W`` a meta-learned transform ``T``
  (identity at start, never adapted), ``y = T(W x)``, and binary masks ``M`` over the output
  units of each ``W``, sampled per task from Bernoulli(sigmoid(ζ)) with a (straight-through)
  Gumbel-softmax relaxation; the inner update is ``W ← W - α M ⊙ ∇_W L``, i.e. per-element
  learning rates ``α M`` through ``learning_rates()``.
- :class:`WarpNet`: WarpGrad (Flennerhag et al. 2020, "Meta-Learning with Warped Gradient
  Descent"): warp layers ``ω`` between the task layers, meta-learned and never adapted; they
  precondition the task layers' gradients. See :class:`mlopt.meta.WarpGrad` for the
  meta-objective.

The task network is an :class:`mlopt.models.Conv4` (``batch_norm`` "transductive" or "none"),
and :func:`mtnet_forward` / :func:`warp_forward` run it interleaved with the upper's layers, so a
lower problem writes ``mtnet_forward(self.module, self.outer.module.transforms, x)``.

Example:
    >>> import torch
    >>> from mlopt.models import Conv4
    >>> mt = MTNet(Conv4(1, 5, hidden=8))
    >>> mtnet_forward(mt.model, mt.transforms, torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlopt.errors import ConfigError
from mlopt.models import Conv4

__all__ = [
    "MetaSGD",
    "MTNet",
    "WarpNet",
    "mtnet_forward",
    "warp_forward",
    "binary_concrete",
]


def _check_conv4(model: nn.Module, who: str) -> None:
    if not isinstance(model, Conv4) or model.batch_norm == "per-step":
        raise ConfigError(
            f"{who}: the task network must be an mlopt.models.Conv4 with batch_norm "
            "'transductive', 'running' or 'none'"
        )
    if isinstance(model.head, nn.Identity):
        raise ConfigError(f"{who}: the Conv4 needs a classifier head (num_classes=...)")


class MetaSGD(nn.Module):
    """A model (the meta-initialization) and learned per-element learning rates ``lrs``.

    Args:
        model: the network; its trainable parameters start each task.
        init_lr: initial value of every learning rate.

    Use ``Config(initialize_from="<upper>.model")`` on the lower and return
    ``list(self.<upper>.module.lrs)`` from its ``learning_rates()``.

    Example:
        >>> m = MetaSGD(torch.nn.Linear(3, 2), init_lr=0.1)
        >>> [tuple(t.shape) for t in m.lrs], round(m.lrs[0][0, 0].item(), 6)
        ([(2, 3), (2,)], 0.1)
    """

    def __init__(self, model: nn.Module, init_lr: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.lrs = nn.ParameterList(
            [
                nn.Parameter(torch.full_like(p.detach(), float(init_lr)))
                for p in model.parameters()
                if p.requires_grad
            ]
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def lr_dict(self, lrs: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Learning rates by model parameter name (for :func:`mlopt.meta.adapt`)."""
        return dict(zip(self.names, self.lrs if lrs is None else lrs))


def binary_concrete(
    logits: torch.Tensor,
    temperature: float,
    *,
    hard: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A relaxed Bernoulli(sigmoid(logits)) sample (Maddison et al. 2017; Jang et al. 2017).

    ``sigmoid((logits + log u - log(1 - u)) / temperature)``, ``u ~ U(0, 1)``; with ``hard``, the
    value is rounded to {0, 1} and the gradient is the relaxed one (straight-through).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> binary_concrete(torch.full((4,), 50.0), 1.0, generator=gen).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(1e-12, 1 - 1e-12)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def _identity_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return conv


def _identity_linear(features: int) -> nn.Linear:
    lin = nn.Linear(features, features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(features))
    return lin


class MTNet(nn.Module):
    """MT-net: a Conv4 meta-initialization, transforms ``T`` after each layer, mask logits ``ζ``.

    Args:
        model: the task network (:class:`mlopt.models.Conv4` with a head).
        masks: learn masks (MT-net); False gives T-net (transforms only).
        temperature: Gumbel-softmax temperature of the mask samples.
        init_logit: initial ``ζ`` (sigmoid(ζ) is the probability that a unit adapts).

    Attributes:
        model: the meta-initialization of the task network.
        transforms: one 1x1 convolution per block and a linear map after the head, all identity
            at start.
        mask_logits: one vector per layer, over its output units.

    Example:
        >>> mt = MTNet(Conv4(1, 5, hidden=8), init_logit=20.0)
        >>> names = [n for n, _ in mt.model.named_parameters()]
        >>> rates = mt.learning_rates(names, 0.1, generator=torch.Generator().manual_seed(0))
        >>> round(rates[0].min().item(), 6), tuple(rates[0].shape)  # broadcast
        (0.1, (8, 1, 1, 1))
    """

    def __init__(
        self,
        model: Conv4,
        *,
        masks: bool = True,
        temperature: float = 1.0,
        init_logit: float = 0.0,
    ) -> None:
        super().__init__()
        _check_conv4(model, "MTNet")
        if temperature <= 0:
            raise ConfigError(f"MTNet: temperature must be > 0, got {temperature!r}")
        self.model = model
        widths = [b.conv.out_channels for b in model.blocks]
        self.transforms = nn.ModuleList([_identity_conv(c) for c in widths])
        self.transforms.append(_identity_linear(model.head.out_features))
        self.use_masks, self.temperature = masks, float(temperature)
        self.mask_logits = nn.ParameterList(
            [nn.Parameter(torch.full((c,), float(init_logit))) for c in widths]
            + [nn.Parameter(torch.full((model.head.out_features,), float(init_logit)))]
        )
        if not masks:
            for p in self.mask_logits:
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mtnet_forward(self.model, self.transforms, x)

    @staticmethod
    def layer_of(name: str) -> int | None:
        """Index of the masked layer a task parameter belongs to (None: not masked)."""
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) == 4 and parts[2] == "conv":
            return int(parts[1])
        if parts[0] == "head":
            return -1
        return None

    def learning_rates(
        self,
        names: Sequence[str],
        lr: float,
        *,
        generator: torch.Generator | None = None,
        logits: Sequence[torch.Tensor] | None = None,
    ) -> list[Any]:
        """Per-parameter learning rates ``lr * M`` for the task parameters ``names``.

        One mask is sampled per layer (call once per task and reuse it for every inner step);
        parameters outside masked layers get ``lr``. ``logits`` overrides ``self.mask_logits``
        (pass the upper problem's current ones, e.g. ``list(self.outer.module.mask_logits)``).
        """
        if not self.use_masks:
            return [lr] * len(names)
        logits = list(self.mask_logits if logits is None else logits)
        masks = [binary_concrete(z, self.temperature, generator=generator) for z in logits]
        out: list[Any] = []
        for name in names:
            layer = self.layer_of(name)
            if layer is None:
                out.append(lr)
                continue
            m = masks[layer]
            dims = 4 if name.endswith("weight") and layer != -1 else 2
            shape = (-1,) + (1,) * (dims - 1) if name.endswith("weight") else (-1,)
            out.append(lr * m.view(shape))
        return out


def mtnet_forward(task_net: Any, transforms: Any, x: torch.Tensor) -> torch.Tensor:
    """Conv4 forward with ``T`` after each task layer: ``conv → T → norm → ReLU → pool``, then
    ``T(head(features))``. Arguments may be modules or ``problem.module`` views."""
    for block, transform in zip(task_net.blocks, transforms):
        x = transform(block.conv(x))
        x = F.max_pool2d(F.relu(block.norm(x)), 2)
    return transforms[len(task_net.blocks)](task_net.head(x.flatten(1)))


class WarpNet(nn.Module):
    """WarpGrad's model: a Conv4 of task layers and a warp layer after each conv block.

    Args:
        model: the task network (Conv4 with a head); its parameters are adapted per task.
        warp_kernel: kernel size of the warp convolutions (identity at start).

    Example:
        >>> w = WarpNet(Conv4(1, 5, hidden=8))
        >>> w(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(self, model: Conv4, warp_kernel: int = 3) -> None:
        super().__init__()
        _check_conv4(model, "WarpNet")
        if warp_kernel % 2 != 1:
            raise ConfigError(f"WarpNet: warp_kernel must be odd, got {warp_kernel}")
        self.model = model
        warps = []
        for block in model.blocks:
            c = block.conv.out_channels
            conv = nn.Conv2d(c, c, warp_kernel, padding=warp_kernel // 2, bias=True)
            with torch.no_grad():
                nn.init.dirac_(conv.weight)
                conv.bias.zero_()
            warps.append(conv)
        self.warps = nn.ModuleList(warps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return warp_forward(self.model, self.warps, x)


def warp_forward(task_net: Any, warps: Any, x: torch.Tensor) -> torch.Tensor:
    """Task block, warp layer, task block, warp layer, ..., head (modules or problem views)."""
    for block, warp in zip(task_net.blocks, warps):
        x = warp(block(x))
    return task_net.head(x.flatten(1))
