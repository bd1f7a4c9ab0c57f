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
from typing import Any

from mlopt.config import EngineConfig
from mlopt.errors import ConfigError

__all__ = ["make_logger", "check_logger", "Logger"]

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
