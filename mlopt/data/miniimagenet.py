"""mini-ImageNet (Vinyals et al. 2016; splits of Ravi & Larochelle 2017) from folders or pickles.

Two layouts are read: a folder of class subfolders holding images of any size (resized to
84x84 RGB), and the common pickle layout, a dict with ``"image_data"`` (``uint8``, ``N x 84 x
84 x 3``) and ``"class_dict"`` (``{class_name: [indices]}``). Images are kept as ``uint8``
(60,000 float images would take 5 GB) and converted to float in ``[0, 1]`` (optionally
normalized) when fetched, a task at a time.

Example:
    >>> train = load_miniimagenet_pickle("mini-imagenet-cache-train.pkl")  # doctest: +SKIP
    >>> sampler = EpisodicSampler(train, ways=5, shots=1, queries=15, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mlopt.errors import ConfigError

__all__ = [
    "MiniImageNetDataset",
    "load_miniimagenet_folder",
    "load_miniimagenet_pickle",
    "MINIIMAGENET_MEAN",
    "MINIIMAGENET_STD",
]

# Per-channel pixel statistics of the mini-ImageNet training split, in [0, 1] units (the values
# commonly used since Lee et al. 2019, MetaOptNet).
MINIIMAGENET_MEAN = (120.39586422 / 255.0, 115.59361427 / 255.0, 104.54012653 / 255.0)
MINIIMAGENET_STD = (70.68188272 / 255.0, 68.27635443 / 255.0, 72.54505529 / 255.0)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class MiniImageNetDataset:
    """Colour images stored as ``uint8`` ``(N, 3, H, W)``, returned as float ``[0, 1]``.

    Args:
        images: ``uint8`` tensor ``(N, 3, H, W)``.
        labels: long tensor ``(N,)`` with values ``0 .. len(class_names)-1``.
        class_names: name of each class id.
        normalize: subtract ``MINIIMAGENET_MEAN`` and divide by ``MINIIMAGENET_STD``.
        dtype: floating dtype of returned images.

    Example:
        >>> ds = MiniImageNetDataset(torch.zeros(2, 3, 84, 84, dtype=torch.uint8),
        ...                          torch.tensor([0, 1]), ["n01", "n02"])
        >>> ds[1][0].shape, ds[1][1]
        (torch.Size([3, 84, 84]), 1)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        class_names: Sequence[str],
        *,
        normalize: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(
                f"MiniImageNetDataset: images must be uint8 (N, 3, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ConfigError(f"MiniImageNetDataset: {len(images)} images, {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.class_names = list(class_names)
        self.normalize, self.dtype = normalize, dtype

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def get_batch(self, indices: Tensor) -> Tensor:
        """Float images at ``indices``, shape ``(len(indices), 3, H, W)``."""
        x = self.images[indices].to(self.dtype) / 255.0
        if self.normalize:
            mean = torch.tensor(MINIIMAGENET_MEAN, dtype=self.dtype).view(3, 1, 1)
            std = torch.tensor(MINIIMAGENET_STD, dtype=self.dtype).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.get_batch(torch.tensor([int(index)]))[0], int(self.labels[index])


def load_miniimagenet_folder(
    root: str | Path,
    *,
    image_size: int = 84,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
) -> MiniImageNetDataset:
    """Read ``root/CLASS_NAME/*.jpg|png|...``; every image is converted to RGB and resized.

    Classes are the subfolders sorted by name; images within a class are sorted by file name.

    Example:
        >>> val = load_miniimagenet_folder("mini-imagenet/val")  # doctest: +SKIP
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"load_miniimagenet_folder: {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    arrays, labels, names = [], [], []
    for cls in class_dirs:
        files = sorted(p for p in cls.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            continue
        for f in files:
            with Image.open(f) as img:
                img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8))
            labels.append(len(names))
        names.append(cls.name)
    if not arrays:
        raise ConfigError(
            f"load_miniimagenet_folder: no images in class subfolders of {root}; expected "
            "root/CLASS_NAME/*.jpg"
        )
    return MiniImageNetDataset(
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(labels, dtype=torch.long),
        names,
        normalize=normalize,
        dtype=dtype,
    )


def load_miniimagenet_pickle(
    path: str | Path,
    *,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
) -> MiniImageNetDataset:
    """Read the pickle layout ``{"image_data": uint8 N x H x W x 3, "class_dict": {...}}``.

    Classes are sorted by name; images listed under no class are dropped. Python 2 pickles are
    read too (``latin1``). Unpickling runs code from the file: load trusted files only.

    Example:
        >>> test = load_miniimagenet_pickle("mini-imagenet-cache-test.pkl")  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    with open(path, "rb") as fh:
        content = pickle.load(fh, encoding="latin1")
    if not isinstance(content, Mapping) or not {"image_data", "class_dict"} <= set(content):
        raise ConfigError(
            f"load_miniimagenet_pickle: {path} must hold a dict with 'image_data' and "
            "'class_dict' keys"
        )
    data = np.asarray(content["image_data"])
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
        raise ConfigError(
            f"load_miniimagenet_pickle: image_data must be uint8 N x H x W x 3, got {data.dtype} "
            f"{data.shape}"
        )
    names = sorted(content["class_dict"])
    labels = np.full(len(data), -1, dtype=np.int64)
    for label, name in enumerate(names):
        idx = np.asarray(content["class_dict"][name], dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
            raise ConfigError(
                f"load_miniimagenet_pickle: class {name!r} lists indices outside 0..{len(data) - 1}"
            )
        if (labels[idx] >= 0).any():
            raise ConfigError(
                f"load_miniimagenet_pickle: class {name!r} shares images with another"
            )
        labels[idx] = label
    keep = labels >= 0
    if not keep.all():
        data, labels = data[keep], labels[keep]
    return MiniImageNetDataset(
        torch.from_numpy(data).permute(0, 3, 1, 2),  # a view: no copy of the (large) array
        torch.from_numpy(labels),
        names,
        normalize=normalize,
        dtype=dtype,
    )
