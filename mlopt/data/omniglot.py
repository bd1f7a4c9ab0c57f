"""Omniglot (Lake et al. 2015) from a folder or the distributed zips, and Lake's one-shot runs.

The data set is 1623 handwritten characters from 50 alphabets, 20 drawings each, as 105x105
PNG files laid out ``images_background/ALPHABET/characterNN/*.png`` (and ``images_evaluation``,
and the "minimal" splits ``images_background_small1``/``small2``). Images are resized
(28x28 by default, as in Vinyals et al. 2016 and Finn et al. 2017) and inverted so strokes are 1
and the background 0. Lake, Salakhutdinov and Tenenbaum (2015), "Human-level concept learning
through probabilistic program induction", Science 350(6266), define 20 official 20-way one-shot
runs (``all_runs.zip``), loaded by :func:`load_one_shot_runs` and scored by
:func:`one_shot_error`. Pillow reads the images; torchvision is only used for ``download=True``.

Source: the authors' repository https://github.com/brendenlake/omniglot (MIT licence), folder
``python/``: ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), the standard splits;
``images_background_small1.zip`` / ``images_background_small2.zip``, the minimal splits; and
``one-shot-classification/all_runs.zip``. ``load_omniglot(root, "background" | "evaluation",
download=True)`` fetches the standard splits through ``torchvision.datasets.Omniglot`` (install
``mlopt[vision]``), which puts them in ``root/omniglot-py/``; the minimal splits and the one-shot
runs are read from a folder holding the zips (this project keeps them in
``../shared/data/omniglot``).

Example:
    >>> ds = load_omniglot("omniglot", "background_small1")  # doctest: +SKIP
    >>> ds.images.shape, ds.num_classes, ds.characters[0]  # doctest: +SKIP
    (torch.Size([2720, 1, 28, 28]), 136, ('Balinese', 'character01'))
    >>> full = load_omniglot("~/data", "evaluation", download=True)  # doctest: +SKIP
    >>> full.num_classes  # doctest: +SKIP
    659
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mlopt.errors import ConfigError

__all__ = [
    "OmniglotDataset",
    "OneShotRun",
    "load_omniglot",
    "load_one_shot_runs",
    "one_shot_error",
    "SPLITS",
]

SPLITS = ("background", "evaluation", "background_small1", "background_small2")


def _decode(data: bytes, image_size: int | None, invert: bool) -> np.ndarray:
    """PNG bytes -> float32 array (H, W) in [0, 1], resized with Lanczos filtering."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L")
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return 1.0 - arr if invert else arr


def _read_files(root: Path, keep: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(posix relative path, content) of the files of a folder or zip that ``keep`` accepts."""
    if root.is_file():
        with zipfile.ZipFile(root) as archive:
            return [
                (info.filename, archive.read(info))
                for info in archive.infolist()
                if not info.is_dir() and keep(info.filename)
            ]
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return [(name, (root / name).read_bytes()) for name in names if keep(name)]


class OmniglotDataset:
    """Omniglot images with class labels and per-class character metadata.

    Attributes:
        images: float tensor ``(N, 1, H, W)``, strokes 1 when inverted.
        labels: long tensor ``(N,)``, class ids ``0 .. num_classes-1``.
        characters: ``characters[c] = (alphabet, character)`` of class ``c``.
        files: source path of each image (relative to the split folder).

    Indexing gives ``(image, label)``; ``get_batch(indices)`` gives stacked images, so an
    :class:`~mlopt.data.EpisodicSampler` samples it without a Python loop.

    Example:
        >>> ds = OmniglotDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]),
        ...                      [("Latin", "character01"), ("Greek", "character02")])
        >>> ds.select_alphabets(["Greek"]).characters
        [('Greek', 'character02')]
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        characters: Sequence[tuple[str, str]],
        files: Sequence[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ConfigError(f"OmniglotDataset: {len(images)} images but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(characters)):
            raise ConfigError("OmniglotDataset: labels must lie in 0 .. len(characters)-1")
        self.images, self.labels = images, labels.long()
        self.characters = [tuple(c) for c in characters]
        self.files = list(files) if files is not None else [""] * len(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def get_batch(self, indices: Tensor) -> Tensor:
        """Images at ``indices`` stacked, shape ``(len(indices), 1, H, W)``."""
        return self.images[indices]

    @property
    def num_classes(self) -> int:
        return len(self.characters)

    @property
    def alphabets(self) -> list[str]:
        """Sorted names of the alphabets present."""
        return sorted({a for a, _ in self.characters})

    def select_classes(self, classes: Sequence[int] | Tensor) -> OmniglotDataset:
        """A dataset of the given classes only, relabelled ``0..`` in the order given."""
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes) or any(not 0 <= c < self.num_classes for c in classes):
            raise ConfigError(
                f"select_classes: classes must be distinct ids in 0..{self.num_classes - 1}"
            )
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
        new = remap[self.labels]
        keep = torch.nonzero(new >= 0).flatten()
        return OmniglotDataset(
            self.images[keep],
            new[keep],
            [self.characters[c] for c in classes],
            [self.files[i] for i in keep.tolist()],
        )

    def select_alphabets(self, alphabets: Iterable[str]) -> OmniglotDataset:
        """A dataset of the characters of the named alphabets (e.g. to hold out alphabets)."""
        wanted = set(alphabets)
        unknown = wanted - set(self.alphabets)
        if unknown:
            raise ConfigError(f"select_alphabets: unknown alphabets {sorted(unknown)}")
        return self.select_classes([c for c, (a, _) in enumerate(self.characters) if a in wanted])


def _locate(root: Path, folder: str) -> Path | None:
    if root.is_file():
        return root
    for base in (root, root / "omniglot-py"):
        if (base / folder).is_dir():
            return base / folder
        if (base / f"{folder}.zip").is_file():
            return base / f"{folder}.zip"
    return root if root.name == folder and root.is_dir() else None


# where torchvision's Omniglot fetches the standard splits (github.com/brendenlake/omniglot)
_SOURCE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"


def _download(root: Path, split: str) -> None:
    """Fetch ``images_{split}.zip`` with torchvision into ``root/omniglot-py/`` and extract it."""
    if split not in ("background", "evaluation"):
        raise ConfigError(
            f"load_omniglot: download=True supports 'background' and 'evaluation' only (the "
            f"splits torchvision serves), not {split!r}; pass a folder holding images_{split}.zip "
            f"(from {_SOURCE_URL}/images_{split}.zip)"
        )
    try:
        from torchvision.datasets import Omniglot
    except Exception as err:  # ImportError, or a broken torchvision install (RuntimeError)
        raise ImportError(
            "load_omniglot(download=True) needs torchvision: pip install 'mlopt[vision]', or "
            "pass root= a folder holding images_background.zip / images_evaluation.zip "
            f"(or their extracted folders, from {_SOURCE_URL}); importing torchvision failed "
            f"with: {err}"
        ) from err
    url = f"{getattr(Omniglot, 'download_url_prefix', _SOURCE_URL)}/images_{split}.zip"
    try:
        root.mkdir(parents=True, exist_ok=True)
        Omniglot(str(root), background=split == "background", download=True)
    except Exception as err:  # URLError/socket errors offline, or a bad checksum (RuntimeError)
        offline = isinstance(err, OSError)  # urllib.error.URLError, TimeoutError, socket errors
        kind = ConnectionError if offline else RuntimeError
        raise kind(
            f"load_omniglot(download=True): torchvision could not fetch images_{split}.zip "
            f"from {url} into {root / 'omniglot-py'}"
            + (" (is the network reachable?)" if offline else "")
            + f": {type(err).__name__}: {err}. Without a network, download the zip elsewhere "
            "and pass root= the folder holding it"
        ) from err


def load_omniglot(
    root: str | Path,
    split: str = "background",
    *,
    image_size: int | None = 28,
    invert: bool = True,
    cache_dir: str | Path | None = None,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> OmniglotDataset:
    """Load one Omniglot split as an :class:`OmniglotDataset`.

    Args:
        root: a folder holding ``images_{split}/`` or ``images_{split}.zip`` (directly or under
            ``omniglot-py/``, torchvision's layout), or the path of the zip or folder itself.
        split: one of ``SPLITS``.
        image_size: side of the resized square images; ``None`` keeps 105x105.
        invert: make strokes 1 and background 0.
        cache_dir: when reading a zip, extract it here once and read the folder afterwards.
        download: when the split is not found under ``root``, fetch it (``background`` or
            ``evaluation`` only) from github.com/brendenlake/omniglot with
            ``torchvision.datasets.Omniglot(root, background=..., download=True)``, which
            writes and extracts ``root/omniglot-py/images_{split}.zip``; needs torchvision
            (``mlopt[vision]``, else ImportError) and a network (else ConnectionError).
        dtype: floating dtype of the images.

    Classes are ordered by (alphabet, character) name; labels index ``characters``.

    Example:
        >>> ds = load_omniglot("/data/omniglot", "background_small2")  # doctest: +SKIP
        >>> held_out = ds.select_alphabets(["Tagalog"])  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ConfigError(f"load_omniglot: split must be one of {SPLITS}, got {split!r}")
    root, folder = Path(root).expanduser(), f"images_{split}"
    source = _locate(root, folder)
    if source is None and download:
        _download(root, split)
        source = _locate(root, folder)
        if source is None:
            raise FileNotFoundError(
                f"load_omniglot: torchvision's download left no {folder}/ or {folder}.zip under "
                f"{root}/omniglot-py"
            )
    if source is None:
        raise FileNotFoundError(
            f"load_omniglot: no {folder}/ or {folder}.zip under {root} (nor {root}/omniglot-py); "
            "pass the folder holding the Omniglot zips, or download=True with torchvision"
        )
    if source.is_file() and cache_dir is not None:
        target = Path(cache_dir).expanduser()
        with zipfile.ZipFile(source) as archive:
            tops = {n.split("/", 1)[0] for n in archive.namelist()}
            if not all((target / t).exists() for t in tops):
                archive.extractall(target)
        source = target / folder if (target / folder).is_dir() else target
    pattern = re.compile(r"(?:^|/)([^/]+)/([^/]+)/([^/]+\.png)$", re.IGNORECASE)
    per_class: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    for name, data in _read_files(source, lambda n: pattern.search(n) is not None):
        match = pattern.search(name)
        per_class.setdefault((match[1], match[2]), []).append((name, data))
    if not per_class:
        raise ConfigError(f"load_omniglot: found no ALPHABET/characterNN/*.png images in {source}")
    characters = sorted(per_class)
    arrays, labels, files = [], [], []
    for label, key in enumerate(characters):
        for name, data in sorted(per_class[key], key=lambda item: item[0]):
            arrays.append(_decode(data, image_size, invert))
            labels.append(label)
            files.append(name)
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(dtype)
    return OmniglotDataset(images, torch.tensor(labels, dtype=torch.long), characters, files)


class OneShotRun(NamedTuple):
    """One of Lake's 20-way one-shot runs.

    ``train_images``: ``(20, 1, H, W)``, one drawing per class (``class01 .. class20``);
    ``test_images``: ``(20, 1, H, W)`` (``item01 .. item20``); ``answers[j]``: index in
    ``train_images`` of the class of test image ``j``.
    """

    train_images: Tensor
    test_images: Tensor
    answers: Tensor


def load_one_shot_runs(
    root: str | Path,
    *,
    image_size: int | None = 28,
    invert: bool = True,
    dtype: torch.dtype = torch.float32,
) -> list[OneShotRun]:
    """Load Lake et al. (2015)'s 20 one-shot classification runs, in run order.

    Args:
        root: ``all_runs.zip``, a folder holding it or an ``all_runs/`` folder, or a folder
            holding ``run01/ .. run20/`` directly.
        image_size: side of the resized images; ``None`` keeps 105x105.
        invert: strokes 1, background 0.
        dtype: floating dtype of the images.

    Example:
        >>> runs = load_one_shot_runs("/data/omniglot")  # doctest: +SKIP
        >>> len(runs), runs[0].train_images.shape  # doctest: +SKIP
        (20, torch.Size([20, 1, 28, 28]))
    """
    root = Path(root).expanduser()
    source = root
    if root.is_dir():
        for candidate in (root / "all_runs.zip", root / "all_runs"):
            if candidate.exists():
                source = candidate
                break
    if not source.exists():
        raise FileNotFoundError(f"load_one_shot_runs: {root} does not exist")
    image_re = re.compile(r"(?:^|/)(run\d+)/(training|test)/([^/]+\.png)$", re.IGNORECASE)
    label_re = re.compile(r"(?:^|/)(run\d+)/class_labels\.txt$", re.IGNORECASE)
    images: dict[str, dict[str, dict[str, bytes]]] = {}
    answer_text: dict[str, str] = {}
    wanted = lambda n: bool(image_re.search(n) or label_re.search(n))  # noqa: E731
    for name, data in _read_files(source, wanted):
        if m := image_re.search(name):
            images.setdefault(m[1], {"training": {}, "test": {}})[m[2]][m[3]] = data
        elif m := label_re.search(name):
            answer_text[m[1]] = data.decode()
    if not images:
        raise ConfigError(
            f"load_one_shot_runs: no runNN/training/*.png files in {source}; pass all_runs.zip "
            "or the folder holding it"
        )
    runs = []
    for run in sorted(images):
        if run not in answer_text:
            raise ConfigError(f"load_one_shot_runs: {run}/class_labels.txt is missing")
        train_names = sorted(images[run]["training"])
        test_names = sorted(images[run]["test"])
        truth = {}
        for line in answer_text[run].splitlines():
            if line.strip():
                test_path, train_path = line.split()
                truth[test_path.rsplit("/", 1)[-1]] = train_path.rsplit("/", 1)[-1]
        if set(truth) != set(test_names) or not set(truth.values()) <= set(train_names):
            raise ConfigError(f"load_one_shot_runs: {run}/class_labels.txt does not match files")

        def stack(files: dict[str, bytes], names: list[str]) -> Tensor:
            arr = np.stack([_decode(files[n], image_size, invert) for n in names])
            return torch.from_numpy(arr).unsqueeze(1).to(dtype)

        runs.append(
            OneShotRun(
                stack(images[run]["training"], train_names),
                stack(images[run]["test"], test_names),
                torch.tensor([train_names.index(truth[n]) for n in test_names], dtype=torch.long),
            )
        )
    return runs


def one_shot_error(
    predict_fn: Callable[[Tensor, Tensor], Tensor | Sequence[int]],
    runs: Sequence[OneShotRun],
) -> float:
    """Error rate in percent of ``predict_fn`` over one-shot runs (Lake et al. 2015's score).

    Args:
        predict_fn: ``(train_images, test_images) -> predicted train index per test image``.
        runs: from :func:`load_one_shot_runs`.

    Example:
        >>> run = OneShotRun(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), torch.tensor([1, 0]))
        >>> one_shot_error(lambda tr, te: torch.tensor([1, 1]), [run])
        50.0
    """
    if not runs:
        raise ConfigError("one_shot_error: got no runs; pass load_one_shot_runs(...)")
    errors = total = 0
    for i, run in enumerate(runs):
        pred = torch.as_tensor(predict_fn(run.train_images, run.test_images)).reshape(-1).long()
        if pred.shape != run.answers.shape:
            raise ConfigError(
                f"one_shot_error: predict_fn must return one index per test image, "
                f"{tuple(run.answers.shape)}, got shape {tuple(pred.shape)} on run {i}"
            )
        errors += int((pred.cpu() != run.answers).sum())
        total += len(run.answers)
    return 100.0 * errors / total
