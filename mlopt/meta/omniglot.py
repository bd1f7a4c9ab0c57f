"""The Omniglot "minimal" protocol: meta-train on the small background splits, test held out.

Lake et al. (2015, 2019) define a minimal setting of the Omniglot challenge: learn from the two
small background splits only (``images_background_small1`` and ``small2``: 5 alphabets each,
Greek and Latin in both with the same drawings, 242 distinct characters), then do the 20
official 20-way within-alphabet one-shot runs of the evaluation alphabets
(:func:`mlopt.data.load_one_shot_runs`; people make 4.5% errors there).

:func:`load_minimal_splits` loads the union without duplicates; :func:`split_characters` holds out
whole characters (no drawing of a test character is seen in meta-training) for N-way K-shot
accuracy; :func:`mean_confidence_interval` gives the usual 95% interval over test tasks.

Example:
    >>> import torch
    >>> mean_confidence_interval(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    (0.75, 0.49)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mlopt.data import EpisodicSampler, OmniglotDataset, load_omniglot
from mlopt.errors import ConfigError

__all__ = [
    "load_minimal_splits",
    "split_characters",
    "mean_confidence_interval",
    "evaluate_tasks",
]


def load_minimal_splits(
    root: str | Path, *, image_size: int | None = 28, dtype: torch.dtype = torch.float32
) -> OmniglotDataset:
    """Both small background splits as one dataset, characters present in both counted once.

    Example:
        >>> ds = load_minimal_splits("/data/omniglot")  # doctest: +SKIP
        >>> ds.num_classes, len(ds)  # doctest: +SKIP
        (242, 4840)
    """
    first = load_omniglot(root, "background_small1", image_size=image_size, dtype=dtype)
    second = load_omniglot(root, "background_small2", image_size=image_size, dtype=dtype)
    known = set(first.characters)
    extra = [c for c, key in enumerate(second.characters) if key not in known]
    second = second.select_classes(extra)
    return OmniglotDataset(
        torch.cat([first.images, second.images]),
        torch.cat([first.labels, second.labels + first.num_classes]),
        first.characters + second.characters,
        first.files + second.files,
    )


def split_characters(
    dataset: OmniglotDataset, num_test: int, *, seed: int = 0
) -> tuple[OmniglotDataset, OmniglotDataset]:
    """``(train, test)``: ``num_test`` characters drawn at random (seeded) are held out whole.

    Example:
        >>> ds = OmniglotDataset(torch.zeros(6, 1, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2]),
        ...                      [("A", "c1"), ("A", "c2"), ("B", "c1")])
        >>> train, test = split_characters(ds, 1, seed=0)
        >>> train.num_classes, test.num_classes
        (2, 1)
    """
    if not 0 < num_test < dataset.num_classes:
        raise ConfigError(
            f"split_characters: num_test must be in 1..{dataset.num_classes - 1}, got {num_test}"
        )
    order = torch.randperm(dataset.num_classes, generator=torch.Generator().manual_seed(seed))
    test = sorted(order[:num_test].tolist())
    train = sorted(order[num_test:].tolist())
    return dataset.select_classes(train), dataset.select_classes(test)


def mean_confidence_interval(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval, ``1.96 s / sqrt(n)``,
    rounded to 4 decimals."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise ConfigError("mean_confidence_interval: need at least two values")
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel())
    return round(float(v.mean()), 4), round(half, 4)


def evaluate_tasks(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    sampler: EpisodicSampler,
    num_tasks: int,
    *,
    start: int = 0,
) -> dict:
    """Accuracy of ``predict(support_x, support_y, query_x) -> predicted query labels`` over
    tasks ``start .. start+num_tasks-1`` of ``sampler``: ``{"accuracy", "ci95", "tasks"}``."""
    accs = []
    for i in range(start, start + num_tasks):
        task = sampler[i]
        pred = torch.as_tensor(predict(task.support_x, task.support_y, task.query_x))
        accs.append(float((pred.reshape(-1).cpu() == task.query_y).double().mean()))
    mean, half = mean_confidence_interval(accs)
    return {"accuracy": mean, "ci95": half, "tasks": num_tasks}
