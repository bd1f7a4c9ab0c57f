"""Episodic task sampling and data sets: Omniglot, mini-ImageNet, hyper-cleaning splits.

Example:
    >>> import torch
    >>> from mlopt.data import EpisodicSampler, TaskLoader
    >>> X, y = torch.randn(50, 1, 4, 4), torch.arange(50) % 5
    >>> batch = next(iter(TaskLoader(EpisodicSampler((X, y), 5, 1, 2, seed=0), 2)))
    >>> batch.support_x.shape
    torch.Size([2, 5, 1, 4, 4])
"""

from mlopt.data.cleaning import (
    CleaningData,
    corrupt_labels,
    load_digits_cleaning,
    load_mnist_cleaning,
    read_idx,
    split_cleaning,
)
from mlopt.data.episodic import (
    EpisodicSampler,
    Task,
    TaskInfo,
    TaskLoader,
    meta_batch,
    task_generator,
)
from mlopt.data.miniimagenet import (
    MINIIMAGENET_MEAN,
    MINIIMAGENET_STD,
    MiniImageNetDataset,
    load_miniimagenet_folder,
    load_miniimagenet_pickle,
)
from mlopt.data.omniglot import (
    SPLITS,
    OmniglotDataset,
    OneShotRun,
    load_omniglot,
    load_one_shot_runs,
    one_shot_error,
)

__all__ = [
    "CleaningData",
    "EpisodicSampler",
    "MINIIMAGENET_MEAN",
    "MINIIMAGENET_STD",
    "MiniImageNetDataset",
    "OmniglotDataset",
    "OneShotRun",
    "SPLITS",
    "Task",
    "TaskInfo",
    "TaskLoader",
    "corrupt_labels",
    "load_digits_cleaning",
    "load_miniimagenet_folder",
    "load_miniimagenet_pickle",
    "load_mnist_cleaning",
    "load_omniglot",
    "load_one_shot_runs",
    "meta_batch",
    "one_shot_error",
    "read_idx",
    "split_cleaning",
    "task_generator",
]
