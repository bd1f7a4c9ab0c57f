"""DARTS search space: candidate operations, mixed edges, cells, the search network, genotypes.

Liu, Simonyan and Yang (2019), "DARTS: Differentiable Architecture Search". A cell is a DAG with
two input nodes (the outputs of the two previous cells) and ``steps`` intermediate nodes; every
edge ``j -> i`` computes ``Σ_o softmax(α_{ij})_o · o(x_j)`` over the candidate operations. The
architecture weights ``α`` (one row per edge, for normal and for reduction cells) are an input of
:meth:`SearchNetwork.forward`, so they can live in another problem (the upper level). After the
search, :func:`derive_genotype` keeps the two strongest non-zero incoming edges of each node with
their strongest operation, and :class:`GenotypeNetwork` trains that discrete architecture.

``CIFAR_PRIMITIVES`` with ``steps=4`` is the standard CIFAR-10 space (14 edges per cell);
``SMALL_PRIMITIVES`` with ``steps=3`` (9 edges) is a small space that searches in minutes on a CPU.

Example:
    >>> import torch
    >>> net = SearchNetwork(4, 10, layers=3, in_channels=1, steps=2, multiplier=2,
    ...                     primitives=SMALL_PRIMITIVES, reductions=(1,))
    >>> arch = Architecture(net.num_edges, len(SMALL_PRIMITIVES))
    >>> net(torch.randn(2, 1, 8, 8), arch.normal, arch.reduce).shape
    torch.Size([2, 10])
    >>> geno = derive_genotype(arch.normal, arch.reduce, 2, SMALL_PRIMITIVES)
    >>> len(geno.normal)
    4
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlopt.errors import ConfigError

__all__ = [
    "CIFAR_PRIMITIVES",
    "SMALL_PRIMITIVES",
    "OPS",
    "Genotype",
    "MixedOp",
    "SearchCell",
    "SearchNetwork",
    "Architecture",
    "GenotypeNetwork",
    "derive_genotype",
    "random_genotype",
]

CIFAR_PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
SMALL_PRIMITIVES = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")


class Genotype(NamedTuple):
    """A discrete cell pair: ``(op name, input index)`` for two inputs of every node."""

    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]


# ---------------------------------------------------------------------- operations
class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, pad: int, affine: bool):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, k, stride, pad, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise (dilated) convolution, pointwise convolution, batch norm."""

    def __init__(self, c_in, c_out, k, stride, pad, dilation, affine):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, k, stride, pad, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable convolutions (the first one strided)."""

    def __init__(self, c_in, c_out, k, stride, pad, affine):
        super().__init__(
            DilConv(c_in, c_in, k, stride, pad, 1, affine),
            DilConv(c_in, c_out, k, 1, pad, 1, affine),
        )


class Zero(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride] * 0.0


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset strided 1x1 convolutions."""

    def __init__(self, c_in: int, c_out: int, affine: bool) -> None:
        super().__init__()
        if c_out % 2:
            raise ConfigError(f"FactorizedReduce: c_out must be even, got {c_out}")
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda c, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda c, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda c, stride, affine: (
        nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine)
    ),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}


def _check_primitives(primitives: Sequence[str]) -> None:
    unknown = [p for p in primitives if p not in OPS]
    if unknown or len(primitives) < 2:
        raise ConfigError(
            f"DARTS: unknown or too few primitives {unknown or list(primitives)}; "
            f"choose at least two of {sorted(OPS)}"
        )


class MixedOp(nn.Module):
    """``Σ_o w_o · o(x)`` over the candidate operations (pooling followed by a batch norm)."""

    def __init__(self, c: int, stride: int, primitives: Sequence[str]) -> None:
        super().__init__()
        ops = []
        for name in primitives:
            op = OPS[name](c, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


def _preprocess(c_pp: int, c_p: int, c: int, reduction_prev: bool, affine: bool):
    first = (
        FactorizedReduce(c_pp, c, affine)
        if reduction_prev
        else ReLUConvBN(c_pp, c, 1, 1, 0, affine)
    )
    return first, ReLUConvBN(c_p, c, 1, 1, 0, affine)


class SearchCell(nn.Module):
    """A cell whose every edge is a :class:`MixedOp`."""

    def __init__(self, steps, multiplier, c_pp, c_p, c, reduction, reduction_prev, primitives):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.pre0, self.pre1 = _preprocess(c_pp, c_p, c, reduction_prev, affine=False)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(c, stride, primitives))

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        offset = 0
        for _ in range(self.steps):
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier :], dim=1)


def _reductions(layers: int, reductions: Sequence[int] | None) -> set[int]:
    out = {layers // 3, 2 * layers // 3} if reductions is None else set(reductions)
    if any(not 0 <= r < layers for r in out):
        raise ConfigError(f"DARTS: reduction cell indices {sorted(out)} must lie in [0, {layers})")
    return out


class SearchNetwork(nn.Module):
    """The over-parameterized network searched by DARTS.

    Args:
        channels: initial channels ``C`` (16 on CIFAR-10).
        num_classes: outputs.
        layers: number of cells (8 on CIFAR-10).
        in_channels: image channels.
        steps: intermediate nodes per cell (4 on CIFAR-10).
        multiplier: how many of the last nodes a cell concatenates (4 on CIFAR-10).
        stem_multiplier: stem width is ``stem_multiplier * channels``.
        primitives: candidate operations.
        reductions: indices of reduction cells (default ``layers//3`` and ``2*layers//3``).

    ``forward(x, alphas_normal, alphas_reduce)`` takes the architecture logits, one row per edge.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        layers: int,
        in_channels: int = 3,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        primitives: Sequence[str] = CIFAR_PRIMITIVES,
        reductions: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_primitives(primitives)
        if multiplier > steps:
            raise ConfigError(f"DARTS: multiplier {multiplier} exceeds steps {steps}")
        self.steps, self.primitives = steps, tuple(primitives)
        self.num_edges = sum(2 + i for i in range(steps))
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        red = _reductions(layers, reductions)
        for i in range(layers):
            reduction = i in red
            if reduction:
                c_curr *= 2
            cell = SearchCell(
                steps, multiplier, c_pp, c_p, c_curr, reduction, reduction_prev, primitives
            )
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, multiplier * c_curr
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: Tensor, alphas_normal: Tensor, alphas_reduce: Tensor) -> Tensor:
        """Logits of ``x`` with the architecture weights (softmax over each row's operations)."""
        w_normal = F.softmax(alphas_normal, dim=-1)
        w_reduce = F.softmax(alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


class Architecture(nn.Module):
    """The architecture logits ``α`` of normal and reduction cells (``1e-3 · N(0, 1)`` init).

    Example:
        >>> Architecture(14, 8).normal.shape
        torch.Size([14, 8])
    """

    def __init__(self, num_edges: int, num_ops: int, scale: float = 1e-3) -> None:
        super().__init__()
        self.normal = nn.Parameter(scale * torch.randn(num_edges, num_ops))
        self.reduce = nn.Parameter(scale * torch.randn(num_edges, num_ops))


def _parse(weights: Tensor, steps: int, primitives: Sequence[str]) -> list[tuple[str, int]]:
    if "none" in primitives:
        keep = [i for i, p in enumerate(primitives) if p != "none"]
    else:
        keep = list(range(len(primitives)))
    gene, start = [], 0
    for i in range(steps):
        rows = weights[start : start + 2 + i]
        best = rows[:, keep].max(dim=1)
        chosen = sorted(best.values.argsort(descending=True)[:2].tolist())
        for j in chosen:
            gene.append((primitives[keep[int(best.indices[j])]], j))
        start += 2 + i
    return gene


def derive_genotype(
    alphas_normal: Tensor,
    alphas_reduce: Tensor,
    steps: int,
    primitives: Sequence[str] = CIFAR_PRIMITIVES,
    multiplier: int | None = None,
) -> Genotype:
    """The discrete architecture of DARTS's Section 2.4: for each node, the two incoming edges
    with the largest non-``none`` softmax weight, each with its strongest operation."""
    with torch.no_grad():
        normal = _parse(F.softmax(alphas_normal, dim=-1), steps, primitives)
        reduce = _parse(F.softmax(alphas_reduce, dim=-1), steps, primitives)
    multiplier = steps if multiplier is None else multiplier
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal, concat, reduce, concat)


def random_genotype(
    steps: int, primitives: Sequence[str], multiplier: int | None = None, seed: int = 0
) -> Genotype:
    """A uniformly random genotype of the same space (a baseline for the search)."""
    g = torch.Generator().manual_seed(seed)
    ops = [p for p in primitives if p != "none"]

    def cell() -> list[tuple[str, int]]:
        gene = []
        for i in range(steps):
            for j in sorted(torch.randperm(2 + i, generator=g)[:2].tolist()):
                gene.append((ops[int(torch.randint(len(ops), (1,), generator=g))], j))
        return gene

    multiplier = steps if multiplier is None else multiplier
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(cell(), concat, cell(), concat)


class GenotypeCell(nn.Module):
    def __init__(self, gene, concat, c_pp, c_p, c, reduction, reduction_prev):
        super().__init__()
        self.reduction, self.concat = reduction, list(concat)
        self.pre0, self.pre1 = _preprocess(c_pp, c_p, c, reduction_prev, affine=True)
        self.inputs = [j for _, j in gene]
        self.ops = nn.ModuleList(
            OPS[name](c, 2 if reduction and j < 2 else 1, True) for name, j in gene
        )

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for i in range(len(self.ops) // 2):
            a, b = 2 * i, 2 * i + 1
            states.append(self.ops[a](states[self.inputs[a]]) + self.ops[b](states[self.inputs[b]]))
        return torch.cat([states[i] for i in self.concat], dim=1)


class GenotypeNetwork(nn.Module):
    """The discrete network of a :class:`Genotype` (no auxiliary head, no drop-path).

    Example:
        >>> g = random_genotype(2, SMALL_PRIMITIVES)
        >>> GenotypeNetwork(g, 4, 10, layers=3, in_channels=1, reductions=(1,))(
        ...     torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        genotype: Genotype,
        channels: int,
        num_classes: int,
        layers: int,
        in_channels: int = 3,
        stem_multiplier: int = 3,
        reductions: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in _reductions(layers, reductions)
            if reduction:
                c_curr *= 2
            gene = genotype.reduce if reduction else genotype.normal
            concat = genotype.reduce_concat if reduction else genotype.normal_concat
            self.cells.append(
                GenotypeCell(gene, concat, c_pp, c_p, c_curr, reduction, reduction_prev)
            )
            reduction_prev = reduction
            c_pp, c_p = c_p, len(concat) * c_curr
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))
