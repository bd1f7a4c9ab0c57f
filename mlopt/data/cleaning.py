"""Data for the hyper-cleaning benchmark: learn per-example weights that undo label noise.

Franceschi et al. (2017), "Forward and Reverse Gradient-Based Hyperparameter Optimization", and
Liu et al. (2020), "A Generic First-Order Algorithmic Framework for Bi-Level Programming Beyond
Lower-Level Singleton" (BDA), train on 5000 MNIST examples of which a fraction have corrupted
labels, tune example weights on 5000 clean validation examples and test on 10000. This module
builds those splits from the raw MNIST/FashionMNIST idx files, or offline from scikit-learn's
bundled handwritten digits (1797 real 8x8 images) in the same 1:1:2 proportions.

Example:
    >>> data = load_digits_cleaning(seed=0)
    >>> data.x_train.shape[1], int(data.corrupted.sum()) == round(0.5 * len(data.y_train))
    (64, True)
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlopt.errors import ConfigError

__all__ = [
    "CleaningData",
    "corrupt_labels",
    "split_cleaning",
    "load_digits_cleaning",
    "load_mnist_cleaning",
    "read_idx",
]


class CleaningData(NamedTuple):
    """Hyper-cleaning splits: ``y_train`` is noisy, ``y_train_clean`` true, ``corrupted`` a mask."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    corrupted: Tensor
    y_train_clean: Tensor


def corrupt_labels(
    y: Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Replace exactly ``round(fraction * len(y))`` labels by a different, uniformly drawn class.

    Args:
        y: integer labels ``(n,)`` in ``0 .. num_classes-1``.
        fraction: share of examples to corrupt, in ``[0, 1]``.
        num_classes: number of classes (>= 2).
        seed: seed of the corruption.

    Returns:
        ``(noisy_labels, corrupted_mask)``: every masked label differs from the true one.

    Example:
        >>> y = torch.arange(10) % 3
        >>> noisy, mask = corrupt_labels(y, 0.5, 3, seed=1)
        >>> int(mask.sum()), bool((noisy[mask] != y[mask]).all())
        (5, True)
        >>> bool((noisy[~mask] == y[~mask]).all())
        True
    """
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.is_floating_point():
        raise ConfigError(
            f"corrupt_labels: y must be a 1-D integer tensor, got {y.dtype} {y.shape}"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"corrupt_labels: num_classes must be an int >= 2, got {num_classes!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"corrupt_labels: fraction must lie in [0, 1], got {fraction!r}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(f"corrupt_labels: labels must lie in 0..{num_classes - 1}")
    gen = torch.Generator().manual_seed(int(seed))
    count = int(round(fraction * len(y)))
    chosen = torch.randperm(len(y), generator=gen)[:count]
    # A shift in 1..C-1 modulo C lands uniformly on the C-1 other classes, never on the truth.
    shift = torch.randint(1, num_classes, (count,), generator=gen)
    noisy = y.clone().long()
    noisy[chosen] = (noisy[chosen] + shift) % num_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask


def split_cleaning(
    x: Tensor,
    y: Tensor,
    sizes: tuple[int, int, int],
    *,
    fraction: float = 0.5,
    num_classes: int = 10,
    seed: int = 0,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
) -> CleaningData:
    """Random train/validation/test split of ``(x, y)`` and label corruption of the train part.

    When ``x_test``/``y_test`` are given, the test examples are drawn from them instead (as with
    MNIST's separate test set). Inputs are flattened to ``(n, features)``.

    Example:
        >>> x, y = torch.randn(40, 2, 2), torch.arange(40) % 4
        >>> d = split_cleaning(x, y, (10, 10, 20), num_classes=4)
        >>> d.x_train.shape, d.x_test.shape
        (torch.Size([10, 4]), torch.Size([20, 4]))
    """
    n_train, n_val, n_test = sizes
    pool = len(y)
    need = n_train + n_val + (n_test if x_test is None else 0)
    if min(sizes) < 0 or need > pool or (x_test is not None and n_test > len(y_test)):
        raise ConfigError(
            f"split_cleaning: sizes {sizes} need more examples than available ({pool} "
            f"{'' if x_test is None else f'+ {len(y_test)} test'}); request smaller splits"
        )
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(pool, generator=gen)
    x, y = x.flatten(1), y.long()
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    if x_test is None:
        te = perm[n_train + n_val : need]
        xt, yt = x[te], y[te]
    else:
        te = torch.randperm(len(y_test), generator=gen)[:n_test]
        xt, yt = x_test.flatten(1)[te], y_test.long()[te]
    noisy, mask = corrupt_labels(y[tr], fraction, num_classes, seed=seed + 1)
    return CleaningData(x[tr], noisy, x[va], y[va], xt, yt, mask, y[tr])


def load_digits_cleaning(
    seed: int = 0,
    *,
    fraction: float = 0.5,
    sizes: tuple[int, int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> CleaningData:
    """Hyper-cleaning on scikit-learn's bundled digits (1797 images, 64 features in [0, 1]).

    By default the split follows the MNIST protocol's 5000/5000/10000 proportions:
    449/449/899 examples. Needs scikit-learn (no network).

    Example:
        >>> d = load_digits_cleaning(seed=0)
        >>> len(d.y_train), len(d.y_val), len(d.y_test)
        (449, 449, 899)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "load_digits_cleaning needs scikit-learn: pip install scikit-learn (mlopt's "
            "'examples' extra, e.g. pip install -e '.[examples]' in a checkout)"
        ) from err
    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=dtype)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if sizes is None:
        quarter = len(y) // 4
        sizes = (quarter, quarter, len(y) - 2 * quarter)
    return split_cleaning(x, y, sizes, fraction=fraction, num_classes=10, seed=seed)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzipped or not, as a numpy array.

    Example:
        >>> images = read_idx("train-images-idx3-ubyte.gz")  # doctest: +SKIP
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    codes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in codes:
        raise ConfigError(f"read_idx: {path} is not an idx file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(codes[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ConfigError(
            f"read_idx: {path} holds {len(raw) - offset} data bytes, header says {expected}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=offset)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(root: Path, name: str, stem: str) -> Path | None:
    for folder in (root, root / name / "raw", root / name):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist_cleaning(
    root: str | Path,
    name: str = "MNIST",
    *,
    seed: int = 0,
    fraction: float = 0.5,
    sizes: tuple[int, int, int] = (5000, 5000, 10000),
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> CleaningData:
    """Hyper-cleaning splits of MNIST or FashionMNIST from the raw idx files.

    Train and validation examples come from the 60000 training images, test ones from the
    10000 test images; pixels are scaled to ``[0, 1]`` and flattened to 784 features.

    Args:
        root: folder with the four idx files (``.gz`` or not), directly or under
            ``NAME/raw/`` (torchvision's layout).
        name: ``"MNIST"`` or ``"FashionMNIST"``.
        seed: seed of the split and of the corruption.
        fraction: share of corrupted training labels.
        sizes: (train, validation, test) sizes.
        download: when files are missing, download them with torchvision (needs network).
        dtype: floating dtype of the inputs.

    Example:
        >>> data = load_mnist_cleaning("~/data", "FashionMNIST")  # doctest: +SKIP
    """
    if name not in ("MNIST", "FashionMNIST"):
        raise ConfigError(
            f"load_mnist_cleaning: name must be 'MNIST' or 'FashionMNIST', not {name!r}"
        )
    root = Path(root).expanduser()
    paths = {k: _find_idx(root, name, stem) for k, stem in _IDX_FILES.items()}
    if any(p is None for p in paths.values()) and download:
        try:
            import torchvision.datasets as tvd
        except Exception as err:  # ImportError, or a broken torchvision install
            raise ImportError(
                f"load_mnist_cleaning(download=True) needs torchvision: pip install "
                f"'mlopt[vision]', or put the raw idx files in {root}; importing torchvision "
                f"failed: {err}"
            ) from err
        for train in (True, False):
            getattr(tvd, name)(str(root), train=train, download=True)
        paths = {k: _find_idx(root, name, stem) for k, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"load_mnist_cleaning: {missing} not found in {root} or {root / name / 'raw'}; "
            "put the raw idx files there or pass download=True (needs torchvision and network)"
        )
    arrays = {k: read_idx(p) for k, p in paths.items()}

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.reshape(len(a), -1))).to(dtype) / 255.0

    return split_cleaning(
        images(arrays["train_x"]),
        torch.as_tensor(arrays["train_y"].astype(np.int64)),
        sizes,
        fraction=fraction,
        num_classes=10,
        seed=seed,
        x_test=images(arrays["test_x"]),
        y_test=torch.as_tensor(arrays["test_y"].astype(np.int64)),
    )
