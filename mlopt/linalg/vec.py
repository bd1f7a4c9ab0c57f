"""Vectors as tuples of tensors: the arithmetic the solvers and hypergradient methods share.

A model's parameters are several tensors of different shapes. Rather than flattening them into one
long vector (a copy per operation), mlopt treats a tuple of tensors as one vector of the direct sum
of their spaces: ``dot`` sums the per-tensor inner products, ``norm`` is the Euclidean norm of the
concatenation, and so on. Every function is made of plain, out-of-place torch operations, so
autograd (including ``create_graph`` double backward) and ``torch.func`` transforms see through
them.

Example:
    >>> import torch
    >>> a = (torch.tensor([3.0]), torch.tensor([[4.0]]))
    >>> float(norm(a))
    5.0
    >>> add(a, a, alpha=-0.5)
    (tensor([1.5000]), tensor([[2.]]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mlopt.errors import HypergradientError

__all__ = [
    "Vec",
    "as_vec",
    "dot",
    "add",
    "sub",
    "scale",
    "norm",
    "zeros_like",
    "all_finite",
    "flatten",
    "unflatten",
    "check_same_shapes",
]

Vec = tuple[torch.Tensor, ...]


def as_vec(x: torch.Tensor | Sequence[torch.Tensor], name: str = "vector") -> Vec:
    """Return ``x`` as a tuple of tensors (a single tensor becomes a 1-tuple).

    Raises:
        HypergradientError: if an entry is not a tensor.

    Example:
        >>> as_vec(torch.ones(2))
        (tensor([1., 1.]),)
    """
    if isinstance(x, torch.Tensor):
        return (x,)
    out = tuple(x)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise HypergradientError(
                f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}; pass a tuple of "
                "tensors, one per parameter tensor"
            )
    return out


def check_same_shapes(a: Vec, b: Vec, what: str) -> None:
    """Raise a clear error unless ``a`` and ``b`` have the same number of tensors and shapes.

    Example:
        >>> check_same_shapes((torch.ones(2),), (torch.zeros(2),), "b vs x0")
    """
    if len(a) != len(b):
        raise HypergradientError(
            f"{what}: expected {len(a)} tensors, got {len(b)}; pass one tensor per parameter"
        )
    for i, (s, t) in enumerate(zip(a, b, strict=False)):
        if s.shape != t.shape:
            raise HypergradientError(
                f"{what}: tensor {i} has shape {tuple(t.shape)}, expected {tuple(s.shape)}"
            )


def dot(a: Vec, b: Vec) -> torch.Tensor:
    """Inner product ``sum_i <a_i, b_i>`` as a 0-d tensor.

    Example:
        >>> float(dot((torch.tensor([1.0, 2.0]),), (torch.tensor([3.0, 4.0]),)))
        11.0
    """
    if len(a) == 0:
        return torch.zeros(())
    total = (a[0] * b[0]).sum()
    for x, y in zip(a[1:], b[1:], strict=False):
        total = total + (x * y).sum()
    return total


def add(a: Vec, b: Vec, alpha: float | torch.Tensor = 1.0) -> Vec:
    """``a + alpha * b``, tensor by tensor.

    Example:
        >>> add((torch.tensor([1.0]),), (torch.tensor([2.0]),), alpha=3.0)
        (tensor([7.]),)
    """
    if isinstance(alpha, (int, float)) and alpha == 1.0:
        return tuple(x + y for x, y in zip(a, b, strict=False))
    return tuple(x + alpha * y for x, y in zip(a, b, strict=False))


def sub(a: Vec, b: Vec) -> Vec:
    """``a - b``, tensor by tensor.

    Example:
        >>> sub((torch.tensor([1.0]),), (torch.tensor([2.0]),))
        (tensor([-1.]),)
    """
    return tuple(x - y for x, y in zip(a, b, strict=False))


def scale(a: Vec, c: float | torch.Tensor) -> Vec:
    """``c * a`` for a scalar (float or 0-d tensor) ``c``.

    Example:
        >>> scale((torch.tensor([1.0, -2.0]),), 2.0)
        (tensor([ 2., -4.]),)
    """
    return tuple(c * x for x in a)


def norm(a: Vec) -> torch.Tensor:
    """Euclidean norm of the concatenation of the tensors, as a 0-d tensor.

    Example:
        >>> float(norm((torch.tensor([3.0]), torch.tensor([4.0]))))
        5.0
    """
    return torch.sqrt(dot(a, a))


def zeros_like(a: Vec) -> Vec:
    """Zeros with the shapes, dtypes and devices of ``a``.

    Example:
        >>> zeros_like((torch.ones(2),))
        (tensor([0., 0.]),)
    """
    return tuple(torch.zeros_like(x) for x in a)


def all_finite(a: Vec) -> bool:
    """True when no entry of any tensor is NaN or infinite (one device synchronisation).

    Fast path: the sum of all entries, which is finite whenever every entry is (NaN and ±Inf
    propagate); only when that sum is not finite (a non-finite entry, or finite entries whose sum
    overflows) is each tensor checked entry by entry, so the answer is exact. Nothing is
    recorded for autograd (the tensors may carry a graph), and a 0-dimensional tensor (a loss)
    enters the sum as it is.

    Example:
        >>> all_finite((torch.tensor([1.0, float("nan")]),))
        False
        >>> all_finite((torch.tensor([3e38, 3e38]),))  # the sum overflows, the entries do not
        True
    """
    if len(a) == 0:
        return True
    with torch.no_grad():
        if len(a) <= 3:  # (fewer kernels than stacking)
            total = _total(a[0])
            for x in a[1:]:
                total = total + _total(x)
        else:
            total = torch.stack([x.sum() for x in a]).sum()
        if math.isfinite(total.item()):  # (the one synchronisation)
            return True
        return bool(torch.stack([torch.isfinite(x).all() for x in a]).all())


def _total(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 0 else x.sum()


def flatten(a: Vec) -> torch.Tensor:
    """Concatenate the tensors into one 1-d tensor.

    Example:
        >>> flatten((torch.ones(2), torch.zeros(1, 1)))
        tensor([1., 1., 0.])
    """
    return torch.cat([x.reshape(-1) for x in a])


def unflatten(flat: torch.Tensor, like: Vec) -> Vec:
    """Split a 1-d tensor into tensors shaped like ``like`` (inverse of :func:`flatten`).

    Example:
        >>> unflatten(torch.arange(3.0), (torch.ones(2), torch.ones(1, 1)))
        (tensor([0., 1.]), tensor([[2.]]))
    """
    total = sum(x.numel() for x in like)
    if flat.dim() != 1 or flat.numel() != total:
        raise HypergradientError(
            f"unflatten: got a tensor of shape {tuple(flat.shape)} for {total} entries"
        )
    out, start = [], 0
    for x in like:
        n = x.numel()
        out.append(flat[start : start + n].reshape(x.shape))
        start += n
    return tuple(out)
