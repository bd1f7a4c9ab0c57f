"""The run plan: what an :class:`~mlopt.EngineConfig` asks of a run, compiled once.

:func:`compile_run` is the only reader of ``EngineConfig`` fields (besides the logger, which reads
its own two); the Engine and its services read the frozen :class:`RunPlan`. Checks that need the
machine (is the device there, can the checkpoint folder be written) happen here, before training.

Example:
    >>> from mlopt import EngineConfig
    >>> run = compile_run(EngineConfig(train_iters=10, valid_step=5))
    >>> run.iterations, run.validate_now(5), run.validate_now(7)
    (10, True, False)
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from mlopt.config import EngineConfig, freeze
from mlopt.errors import ConfigError
from mlopt.loggers import check_logger

__all__ = ["EarlyStopping", "RunPlan", "compile_run", "choose_device"]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after ``patience`` validations in which ``metric`` did not improve (``mode``)."""

    metric: str
    mode: str
    patience: int

    @property
    def initial(self) -> float:
        """The worst possible value of the metric."""
        return math.inf if self.mode == "min" else -math.inf

    def better(self, value: float, best: float) -> bool:
        """Whether ``value`` improves on ``best``.

        Example:
            >>> EarlyStopping("acc", "max", 3).better(0.9, 0.8)
            True
        """
        return value < best if self.mode == "min" else value > best


@dataclass(frozen=True)
class RunPlan:
    """The run's settings, fixed for the run.

    Attributes:
        iterations: iterations of the schedule to run.
        valid_every: validate every this many iterations (0: never).
        progress: show a progress bar.
        seed: the seed of Python's, NumPy's and torch's generators (None: leave them).
        checkpoint_dir: where checkpoints go (None: nowhere).
        checkpoint_every: save every this many iterations (0: only at the end).
        resume: the checkpoint to resume from (a path, True for the latest, None).
        early_stopping: the early-stopping rule, or None.
        roll_back: DARTS look-ahead semantics for lowers.
        strategy: ``"default"``, ``"cpu"``, ``"cuda"``, ``"ddp"``, ``"zero"`` or ``"fsdp"``.
        device: the explicit device asked for, or None.
    """

    iterations: int
    valid_every: int
    progress: bool
    seed: int | None
    checkpoint_dir: str | None
    checkpoint_every: int
    resume: Any
    early_stopping: EarlyStopping | None
    roll_back: bool
    strategy: str
    device: torch.device | None

    @property
    def initial_best(self) -> float:
        """The best metric before any validation."""
        return math.inf if self.early_stopping is None else self.early_stopping.initial

    def validate_now(self, iteration: int) -> bool:
        """Whether the run validates after ``iteration``."""
        return bool(self.valid_every) and iteration % self.valid_every == 0

    def checkpoint_now(self, iteration: int) -> bool:
        """Whether a periodic checkpoint is due after ``iteration``."""
        every = self.checkpoint_every
        return self.checkpoint_dir is not None and bool(every) and iteration % every == 0


def _writable_folder(folder: str) -> str:
    """Create ``folder`` if needed and prove it can hold a checkpoint (write, then remove)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(
            f"EngineConfig: checkpoint_dir={folder!r} is a file, not a directory; give a folder"
        )
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"EngineConfig: checkpoint_dir={folder!r} cannot be written ({err.strerror}); give "
            "a folder this process can write to"
        ) from err
    return folder


def compile_run(config: EngineConfig) -> RunPlan:
    """Validate ``config`` again (it may have been changed since construction), check what
    needs the machine, make it read-only and return the :class:`RunPlan`.

    Raises:
        ConfigError: an invalid field, naming the field and the fix.
    """
    config.validate()
    check_logger(config)
    stop = None
    if config.early_stopping:
        stop = EarlyStopping(
            config.early_stopping_metric, config.early_stopping_mode, config.early_stopping_patience
        )
    folder = config.checkpoint_dir
    plan = RunPlan(
        iterations=config.train_iters,
        valid_every=config.valid_step,
        progress=sys.stderr.isatty() if config.progress is None else config.progress,
        seed=config.seed,
        checkpoint_dir=None if folder is None else _writable_folder(folder),
        checkpoint_every=config.checkpoint_step,
        resume=config.resume or None,
        early_stopping=stop,
        roll_back=config.roll_back,
        strategy=config.strategy,
        device=None if config.device is None else torch.device(config.device),
    )
    freeze(config, "the Engine")
    return plan


def choose_device(run: RunPlan) -> torch.device:
    """The device of a run: the explicit one, else the strategy's choice."""
    if run.device is not None:
        return run.device
    if run.strategy == "cpu":
        return torch.device("cpu")
    if run.strategy == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "EngineConfig(strategy='cuda') but CUDA is not available; use strategy='default' "
            "(CUDA when present, else the CPU) or 'cpu'"
        )
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
