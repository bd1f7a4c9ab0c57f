"""Where metrics go: Python logging, TensorBoard or wandb.

Example:
    >>> from mlopt import EngineConfig
    >>> logger = make_logger(EngineConfig(logger_type="none"))
    >>> logger.log({"outer/loss": 0.5}, step=1)
    >>> logger.flush()
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

import torch

from mlopt.config import EngineConfig
from mlopt.errors import ConfigError

__all__ = ["make_logger", "check_logger", "validation_metrics", "Logger"]

_log = logging.getLogger("mlopt")


class Logger:
    """Logs scalars to Python's ``logging`` (logger ``"mlopt"``) and an optional backend."""

    def __init__(self, backend: Any = None, kind: str = "none") -> None:
        self.backend = backend
        self.kind = kind

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Record ``scalars`` at iteration ``step``."""
        if not scalars:
            return
        _log.info("iter %d | %s", step, " ".join(f"{k}={v:.5g}" for k, v in scalars.items()))
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.backend.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self.backend.log(scalars, step=step)

    def flush(self) -> None:
        """Write buffered records."""
        if self.kind == "tensorboard":
            self.backend.flush()


def check_logger(config: EngineConfig) -> None:
    """Fail before training when the chosen backend is not installed."""
    if config.logger_type == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "EngineConfig: logger_type='wandb' but wandb is not installed; `pip install wandb` "
            "or use logger_type='tensorboard'"
        )


def make_logger(config: EngineConfig, rank: int = 0) -> Logger:
    """The logger for ``config.logger_type``; ranks other than 0 only use Python logging."""
    if config.logger_type == "none" or rank != 0:
        return Logger()
    if config.logger_type == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - tensorboard is a dependency
            raise ConfigError("logger_type='tensorboard' needs `pip install tensorboard`") from err
        return Logger(SummaryWriter(log_dir=config.log_dir), "tensorboard")
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            "logger_type='wandb' but wandb is not installed; `pip install wandb` or use "
            "logger_type='tensorboard'"
        ) from err
    run = wandb.run or wandb.init(dir=config.log_dir)
    return Logger(run, "wandb")


def validation_metrics(out: Any) -> dict[str, float]:
    """``Engine.validation()``'s result as floats.

    Raises:
        ConfigError: it is not a dict (or None) of numbers or one-element tensors.
    """
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise ConfigError(
            f"Engine.validation() must return a dict of metrics, got {type(out).__name__}; "
            "return e.g. {'loss': value, 'accuracy': value}"
        )
    metrics = {}
    for key, value in out.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            number = True
        if not isinstance(key, str) or not number:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            raise ConfigError(
                f"Engine.validation() returned {key!r}: {type(value).__name__}"
                + (f" of shape {shape}" if shape is not None else "")
                + "; each metric must be a number (or a one-element tensor) under a string key: "
                "reduce it, e.g. with .mean(), or log it elsewhere"
            )
        metrics[key] = float(value)
    return metrics
