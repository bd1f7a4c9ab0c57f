"""Validated configuration: :class:`Config` for a problem, :class:`EngineConfig` for a run.

Values are checked when the object is built, so a typo fails before any training starts.

Example:
    >>> from mlopt import Config, EngineConfig
    >>> cfg = Config(type="reverse", unroll_steps=5)
    >>> cfg.unroll_steps
    5
    >>> EngineConfig(train_iters=100, valid_step=10).train_iters
    100
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any

from mlopt.errors import ConfigError
from mlopt.migration import BETTY_CONFIG, BETTY_ENGINE_CONFIG, BETTY_STRATEGIES, unknown_field

__all__ = [
    "freeze",
    "is_frozen",
    "thaw",
    "Config",
    "EngineConfig",
    "PRECISIONS",
    "STRATEGIES",
    "LOGGERS",
]

PRECISIONS = ("fp32", "fp16", "bf16")
STRATEGIES = ("default", "cpu", "cuda", "ddp", "zero", "fsdp")
LOGGERS = ("none", "tensorboard", "wandb")
_RESAMPLE = ("step", "window")
_ON_NONFINITE = ("raise", "skip")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(
    owner: str, name: str, value: Any, choices: tuple[str, ...], betty: dict | None = None
) -> None:
    if value not in choices:
        hint = ""
        if betty and isinstance(value, str) and value in betty:
            hint = f" ({value!r} is Betty's; in mlopt: {betty[value]})"
        raise ConfigError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}{hint}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{owner}: {name} must be True or False, got {value!r} ({type(value).__name__}); "
            f"a string such as 'false' would switch it on"
        )


def _check_text(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}: {name} must be a non-empty string, got {value!r}")


def _check_device(value: Any) -> None:
    """``device`` must parse as a torch device that this machine has."""
    import torch

    if isinstance(value, torch.device):
        dev = value
    else:
        try:
            dev = torch.device(value)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ConfigError(
                f"EngineConfig: device={value!r} is not a device; use e.g. 'cpu', 'cuda' or "
                "'cuda:1' (or leave device=None and choose with strategy=)"
            ) from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigError(
                f"EngineConfig: device={value!r} but this machine has {count} CUDA device(s); "
                "use device='cpu' or leave device=None (CUDA when present, else the CPU)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"EngineConfig: device={value!r} but MPS is not available here")
    elif dev.type != "cpu":
        raise ConfigError(
            f"EngineConfig: device={value!r}: mlopt runs on 'cpu', 'cuda' or 'mps' devices"
        )


class _ReadOnlyOnceCompiled:
    """Fields can change until an Engine compiles the object; then a change is an error (it
    would be ignored by the running program)."""

    def __setattr__(self, key: str, value: Any) -> None:
        owner = self.__dict__.get("_owner")
        if owner is not None:
            kind = type(self).__name__
            raise ConfigError(
                f"{owner}: {kind}.{key} cannot change once an Engine has compiled the program "
                f"(the change would be ignored); pass {kind}({key}=...) before building the "
                "Engine"
            )
        if key == "resample":
            self.__dict__["_auto_resample"] = value is None
        super().__setattr__(key, value)


@dataclass
class Config(_ReadOnlyOnceCompiled):
    """How one problem is solved and how hypergradients flow back through it.

    Attributes:
        type: hypergradient method used when an upper problem differentiates through this
            (lower) problem: a registered name (``"reverse"``, ``"first_order"``, ``"cg"``, ...;
            see ``mlopt.hypergrad.available_methods()``) or a method object such as
            ``mlopt.hypergrad.Reverse(truncate=2)``.
        unroll_steps: updates this problem makes per window before its uppers step.
        initialize_from: name of an upper problem whose parameters start each unroll window
            (meta-initialization, MAML family). The modules must have the same parameter names.
        resample: ``"step"`` draws a new batch for every update; ``"window"`` draws one batch per
            unroll window and reuses it (one task per window, as in MAML). Default: ``"window"``
            for a per-task problem, detected when the Engine is built: ``initialize_from`` is
            set, its loader is an ``mlopt.data.EpisodicSampler`` (it yields tasks), or its
            ``on_inner_loop_start`` changes its parameters (it restarts each window: checked
            when the first window starts, before any batch); else ``"step"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` autocast for ``training_step``.
        gradient_accumulation: number of gradient computations summed (averaged) per optimizer
            update (a meta-batch of tasks for an upper problem).
        gradient_clipping: clip the total gradient norm to this value (0 disables).
        warmup_steps: linear learning-rate warm-up over this many optimizer updates.
        log_step: log this problem's loss every ``log_step`` steps (0 disables).
        on_nonfinite: ``"raise"`` a HypergradientError on a NaN/Inf loss or gradient, or
            ``"skip"`` the update with a warning.
        options: free-form options for user extensions.
    """

    type: Any = "reverse"
    unroll_steps: int = 1
    initialize_from: str | None = None
    resample: str | None = None
    precision: str = "fp32"
    gradient_accumulation: int = 1
    gradient_clipping: float = 0.0
    warmup_steps: int = 0
    log_step: int = 0
    on_nonfinite: str = "raise"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resample_is_default(self) -> bool:
        """Whether ``resample`` was left to its default (the Engine may then detect a per-task
        program: see the attribute's description)."""
        return bool(self.__dict__.get("_auto_resample", False))

    def validate(self) -> None:
        """Check every field (again: the Engine calls this when it compiles the program).

        Raises:
            ConfigError: naming the field, the value and what is allowed.
        """
        owner = "Config"
        _check_int(owner, "unroll_steps", self.unroll_steps, 1)
        _check_int(owner, "gradient_accumulation", self.gradient_accumulation, 1)
        _check_int(owner, "warmup_steps", self.warmup_steps, 0)
        if self.log_step == -1:
            raise ConfigError(
                "Config: log_step=-1 is Betty's 'no logging'; in mlopt use log_step=0 (the default)"
            )
        _check_int(owner, "log_step", self.log_step, 0)
        _check_choice(owner, "precision", self.precision, PRECISIONS)
        _check_choice(owner, "on_nonfinite", self.on_nonfinite, _ON_NONFINITE)
        clip = self.gradient_clipping
        if (
            not isinstance(clip, (int, float))
            or isinstance(clip, bool)
            or not (clip >= 0 and math.isfinite(clip))
        ):
            raise ConfigError(
                f"Config: gradient_clipping must be a finite number >= 0 (0 disables), got {clip!r}"
            )
        if not isinstance(self.options, dict):
            raise ConfigError(f"Config: options must be a dict, got {type(self.options).__name__}")
        if self.initialize_from is not None and not isinstance(self.initialize_from, str):
            name = getattr(self.initialize_from, "name", None)
            if not isinstance(name, str):
                raise ConfigError(
                    "Config: initialize_from must be the name of an upper problem (a string), "
                    f"got {self.initialize_from!r}"
                )
            self.__dict__["initialize_from"] = name
        if self.__dict__.get("_auto_resample", self.resample is None):
            self.__dict__["_auto_resample"] = True
            self.__dict__["resample"] = "window" if self.initialize_from is not None else "step"
        _check_choice(owner, "resample", self.resample, _RESAMPLE)
        # The method itself is resolved (and unknown names rejected) by mlopt.hypergrad.
        from mlopt.hypergrad import resolve_method

        self.__dict__["type"] = resolve_method(self.type)


def freeze(config: Config | EngineConfig, owner: str) -> None:
    """Make ``config`` read-only: an Engine has compiled it (``owner`` names whose it is)."""
    config.__dict__["_owner"] = owner


def is_frozen(config: Config | EngineConfig) -> bool:
    """Whether an Engine has made ``config`` read-only."""
    return config.__dict__.get("_owner") is not None


def thaw(config: Config | EngineConfig) -> None:
    """Undo :func:`freeze` (for an Engine whose construction failed)."""
    config.__dict__.pop("_owner", None)


@dataclass
class EngineConfig(_ReadOnlyOnceCompiled):
    """Settings of a whole run.

    Attributes:
        train_iters: iterations of the schedule (the lowest problems step once per iteration).
        valid_step: call ``Engine.validation()`` every this many iterations (0 disables).
        logger_type: ``"none"``, ``"tensorboard"`` or ``"wandb"``.
        log_dir: directory for TensorBoard/wandb logs.
        progress: show a tqdm progress bar with the losses, steps per second and validation
            metrics (rank 0 only); None (the default): when standard error is a terminal.
        seed: seed for Python, NumPy and torch (None leaves the RNGs alone).
        checkpoint_dir: where checkpoints go (None disables checkpointing).
        checkpoint_step: save a checkpoint every this many iterations (0: only at the end).
        resume: path of a checkpoint file, or ``True`` for the latest in ``checkpoint_dir``.
        early_stopping: stop when ``early_stopping_metric`` (from ``validation()``) has not
            improved for ``early_stopping_patience`` validations.
        early_stopping_metric: key of the validation dict to watch.
        early_stopping_mode: ``"min"`` or ``"max"``.
        early_stopping_patience: validations without improvement before stopping.
        roll_back: DARTS look-ahead semantics: after an upper steps, its lowers return to the
            state they had at the start of their window and redo the window's updates (on the
            same batches) with the new upper parameters.
        strategy: ``"default"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"ddp"`` (torch.distributed data parallel launched with torchrun) or ``"zero"``
            (``"ddp"`` with each optimizer's state sharded across ranks: :mod:`mlopt.sharding`)
            or ``"fsdp"`` (``"ddp"`` with modules sharded by ``fully_shard``: :mod:`mlopt.fsdp`).
        device: explicit device string, overriding ``strategy``'s choice.
    """

    train_iters: int = 1000
    valid_step: int = 0
    logger_type: str = "none"
    log_dir: str = "runs"
    progress: bool | None = None
    seed: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_step: int = 0
    resume: Any = None
    early_stopping: bool = False
    early_stopping_metric: str = "loss"
    early_stopping_mode: str = "min"
    early_stopping_patience: int = 5
    roll_back: bool = False
    strategy: str = "default"
    device: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (again: the Engine calls this when it is built).

        Raises:
            ConfigError: naming the field, the value and what is allowed.
        """
        owner = "EngineConfig"
        _check_int(owner, "train_iters", self.train_iters, 0)
        _check_int(owner, "valid_step", self.valid_step, 0)
        _check_int(owner, "checkpoint_step", self.checkpoint_step, 0)
        _check_int(owner, "early_stopping_patience", self.early_stopping_patience, 1)
        _check_choice(owner, "logger_type", self.logger_type, LOGGERS)
        _check_choice(owner, "strategy", self.strategy, STRATEGIES, BETTY_STRATEGIES)
        _check_choice(owner, "early_stopping_mode", self.early_stopping_mode, ("min", "max"))
        if self.progress is not None:
            _check_bool(owner, "progress", self.progress)
        for flag in ("early_stopping", "roll_back"):
            _check_bool(owner, flag, getattr(self, flag))
        _check_text(owner, "log_dir", self.log_dir)
        _check_text(owner, "early_stopping_metric", self.early_stopping_metric)
        if self.seed is not None:
            _check_int(owner, "seed", self.seed, 0)
        if self.device is not None:
            _check_device(self.device)
        if self.checkpoint_dir is not None:
            _check_text(owner, "checkpoint_dir", self.checkpoint_dir)
        if self.early_stopping and self.valid_step == 0:
            raise ConfigError(
                "EngineConfig: early_stopping needs validation: set valid_step > 0 and override "
                "Engine.validation() to return a dict with the watched metric"
            )
        if self.checkpoint_step and self.checkpoint_dir is None:
            raise ConfigError(
                "EngineConfig: checkpoint_step is set but checkpoint_dir is None; give a directory"
            )
        if self.resume not in (None, False, True) and not isinstance(self.resume, str):
            raise ConfigError(
                f"EngineConfig: resume must be a checkpoint path or True, got {self.resume!r}"
            )
        if self.resume == "":
            raise ConfigError(
                "EngineConfig: resume='' is empty; give a checkpoint path, True for the latest "
                "in checkpoint_dir, or None to start fresh"
            )
        if self.resume is True and self.checkpoint_dir is None:
            raise ConfigError("EngineConfig: resume=True needs checkpoint_dir to look in")


def _reject_unknown_options(cls: type, betty: dict[str, str]) -> None:
    """Wrap the dataclass ``__init__`` of ``cls``: an unknown keyword is a ConfigError naming the
    mlopt equivalent of Betty's option, or the closest field (not a bare TypeError)."""
    init = cls.__init__
    names = [f.name for f in fields(cls)]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in names:
                raise unknown_field(cls.__name__, key, names, betty)
        if len(args) > len(names):
            raise ConfigError(
                f"{cls.__name__} takes at most {len(names)} arguments; pass options by keyword"
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__


_reject_unknown_options(Config, BETTY_CONFIG)
_reject_unknown_options(EngineConfig, BETTY_ENGINE_CONFIG)
