"""The Engine: validates a program, runs its schedule, validates, logs and checkpoints.

Example:
    >>> import torch, mlopt
    >>> class Low(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return ((self.module.weight - self.up.module.weight) ** 2).sum()
    >>> class Up(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return ((self.low.module.weight - 1.0) ** 2).sum()
    >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    >>> cfg = mlopt.Config(unroll_steps=2)
    >>> low = Low("low", a, torch.optim.SGD(a.parameters(), lr=0.1), config=cfg)
    >>> up = Up("up", b, torch.optim.SGD(b.parameters(), lr=0.1))
    >>> engine = mlopt.Engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}},
    ...                       mlopt.EngineConfig(train_iters=4))
    >>> engine.run()["steps"]
    {'up': 2, 'low': 4}
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mlopt import checkpoint as ckpt
from mlopt.config import EngineConfig
from mlopt.errors import ConfigError, DependencyError
from mlopt.graph import describe, normalize, validate
from mlopt.loggers import make_logger
from mlopt.problem import Problem
from mlopt.stepper import Stepper
from mlopt.wiring import init_positions

__all__ = ["Engine"]

log = logging.getLogger("mlopt")


def _choose_device(config: EngineConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    if config.strategy == "cpu":
        return torch.device("cpu")
    if config.strategy == "cuda" and not torch.cuda.is_available():
        raise ConfigError("EngineConfig(strategy='cuda') but CUDA is not available; use 'default'")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _restrict_to_optimizer(p: Problem) -> None:
    """A problem's parameters are the trainable module parameters its optimizer updates."""
    if p.optimizer is None or p._module is None:
        return
    in_opt = {id(q) for g in p.optimizer.param_groups for q in g["params"]}
    p.__dict__["_names"] = [
        n for n, q in p._module.named_parameters() if q.requires_grad and id(q) in in_opt
    ]


def _check_problem(p: Problem, problems: Mapping[str, Problem], uppers: Sequence[str]) -> None:
    """Per-problem checks that need the whole program."""
    if type(p).training_step is Problem.training_step:
        raise ConfigError(
            f"problem {p.name!r} ({type(p).__name__}) does not override training_step(batch); "
            "subclass mlopt.Problem and define it"
        )
    if p._module is not None:
        trainable = [n for n, q in p._module.named_parameters() if q.requires_grad]
        if trainable and p.optimizer is None:
            raise ConfigError(
                f"problem {p.name!r} has trainable parameters {trainable[:3]}... but no optimizer; "
                "pass optimizer=torch.optim.SGD(module.parameters(), lr=...) or freeze them"
            )
    if p.optimizer is not None:
        in_module = {id(q) for q in (p._module.parameters() if p._module is not None else [])}
        stray = [q for g in p.optimizer.param_groups for q in g["params"] if id(q) not in in_module]
        if stray:
            raise ConfigError(
                f"problem {p.name!r}: its optimizer holds {len(stray)} tensor(s) that are not "
                "parameters of its module; build the optimizer from module.parameters()"
            )
    method = p.config.type
    init = p.config.initialize_from
    if init is not None:
        init_positions(p, problems, init)  # raises on unknown problems or mismatched parameters
        init = init.partition(".")[0]
        if init not in uppers:
            raise DependencyError(
                f"problem {p.name!r}: initialize_from={init!r} must be one of its uppers; add "
                f"{{{init!r}: [{p.name!r}]}} to u2l"
            )
    if type(p).learning_rates is not Problem.learning_rates and not (
        uppers and method.differentiable_unroll
    ):
        raise ConfigError(
            f"problem {p.name!r} overrides learning_rates(), which only a differentiable unroll "
            "uses: give it an upper problem (u2l) and Config(type='reverse')"
        )
    if method.tracks_dynamics and uppers and p.config.gradient_clipping:
        raise ConfigError(
            f"problem {p.name!r}: gradient_clipping is not differentiated by forward mode; "
            "remove it or use Config(type='reverse')"
        )
    if getattr(method, "name", "") == "reptile" and init is None:
        raise ConfigError(
            f"problem {p.name!r}: Config(type='reptile') needs Config(initialize_from=<upper>)"
        )
    if uppers and method.differentiable_unroll and p.config.gradient_accumulation > 1:
        raise ConfigError(
            f"problem {p.name!r}: gradient_accumulation > 1 is not supported inside a "
            f"differentiable unroll ({method.name}); accumulate in its upper instead"
        )


class Engine:
    """Runs a multilevel program.

    Args:
        problems: the :class:`~mlopt.Problem` objects, in any order.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}``, with Problem
            objects or names as keys and values.
        config: an :class:`~mlopt.EngineConfig` (None: defaults).

    Override :meth:`validation` to evaluate every ``valid_step`` iterations.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        dependencies: Mapping[str, Any] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"Engine: config must be a mlopt.EngineConfig, got {type(config)}")
        problems = list(problems)
        for p in problems:
            if not isinstance(p, Problem):
                raise DependencyError(f"Engine: {p!r} is not a mlopt.Problem")
        self.config = config
        self.graph = normalize([p.name for p in problems], dependencies)
        validate(self.graph)
        self.problems_by_name = {p.name: p for p in problems}
        for p in problems:
            if p.__dict__["_engine"] is not None and p.__dict__["_engine"] is not self:
                raise ConfigError(f"problem {p.name!r} already belongs to another Engine")
        for p in problems:
            _restrict_to_optimizer(p)
        for p in problems:
            _check_problem(p, self.problems_by_name, self.graph.hyper_uppers(p.name))
        self.device = _choose_device(config)
        self.distributed = None
        if config.strategy == "ddp":
            from mlopt.distributed import DataParallel

            self.distributed = DataParallel(self.device)
            self.device = self.distributed.device
        if config.seed is not None:
            seed_everything(config.seed)  # the same on every rank: see DataParallel.attach
        for p in problems:
            if p._module is not None:
                p._module.to(self.device)
            p.__dict__["_engine"] = self
        self.stepper = Stepper(self.problems_by_name, self.graph, self.device)
        self.stepper.keep_snapshots = config.roll_back
        if self.distributed is not None:
            self.distributed.attach(self.stepper, problems)
        self.iteration = 0
        self.best_metric = config.best_initial
        self.bad_validations = 0
        self.stopped = False
        self._pending_best = False
        self.history: list[dict] = []
        self.logger = make_logger(config, rank=self.stepper.rank)
        if config.resume:
            self.load_checkpoint(config.resume)
        self.stepper.open_windows()

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        """The program and its schedule as text (also what ``print(engine)`` shows)."""
        unroll = {n: p.config.unroll_steps for n, p in self.problems_by_name.items()}
        methods = {n: repr(p.config.type) for n, p in self.problems_by_name.items()}
        return describe(self.graph, unroll, methods)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"Engine(problems={list(self.problems_by_name)}, iteration={self.iteration})"

    def _exposed_params(self, problem: Problem):
        return self.stepper.exposed_params(problem)

    # ------------------------------------------------------------------ running
    def step(self) -> list[str]:
        """Run one iteration of the schedule; returns the names of the problems that stepped."""
        stepped = []
        sched = self.stepper.scheduler
        for name in sched.order:
            if sched.should_step(name):
                self.stepper.step(self.problems_by_name[name])
                stepped.append(name)
        self.iteration += 1
        if self.config.roll_back:
            self._roll_back(stepped)
        self.stepper.open_windows()
        self._log_step(stepped)
        return stepped

    def run(self) -> dict:
        """Run until ``train_iters`` iterations (or early stopping); returns a summary dict."""
        cfg = self.config
        bar = None
        if cfg.progress and self.stepper.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train_iters, initial=self.iteration, desc="mlopt")
        pending_save = False
        try:
            while self.iteration < cfg.train_iters and not self.stopped:
                self.step()
                if cfg.valid_step and self.iteration % cfg.valid_step == 0:
                    self._validate()
                if (
                    cfg.checkpoint_dir
                    and cfg.checkpoint_step
                    and (self.iteration % cfg.checkpoint_step == 0)
                ):
                    pending_save = True
                if pending_save and ckpt.at_boundary(self):
                    self.save_checkpoint()
                    pending_save = False
                if self._pending_best and ckpt.at_boundary(self):
                    self.save_checkpoint(name="best.pt")
                    self._pending_best = False
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{float(v):.4g}" for k, v in self.stepper.last_loss.items()}
                    )
        finally:
            if bar is not None:
                bar.close()
        self.stepper.sync_modules()
        if cfg.checkpoint_dir:
            if ckpt.at_boundary(self):
                self.save_checkpoint()
            else:
                log.warning(
                    "iteration %d ends inside an unroll window: no final checkpoint (the last "
                    "one is at the previous window boundary)",
                    self.iteration,
                )
        self.logger.flush()
        return {
            "iterations": self.iteration,
            "steps": dict(self.stepper.scheduler.steps),
            "stopped_early": self.stopped,
            "best_metric": self.best_metric,
            "history": self.history,
        }

    def validation(self) -> dict:
        """Override to evaluate the program; return a dict of metrics (floats or tensors)."""
        return {}

    def _validate(self) -> dict:
        with torch.no_grad():
            metrics = self.validation() or {}
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.distributed is not None:
            metrics = self.distributed.average_metrics(metrics)
        self.history.append({"iteration": self.iteration, **metrics})
        self.logger.log({f"validation/{k}": v for k, v in metrics.items()}, self.iteration)
        cfg = self.config
        if cfg.early_stopping:
            key = cfg.early_stopping_metric
            if key not in metrics:
                raise ConfigError(
                    f"early_stopping_metric {key!r} is not in Engine.validation()'s result "
                    f"(keys: {sorted(metrics)})"
                )
            value = metrics[key]
            better = (
                value < self.best_metric
                if cfg.early_stopping_mode == "min"
                else (value > self.best_metric)
            )
            if better:
                self.best_metric, self.bad_validations = value, 0
                # saved at the next window boundary (an unroll's graph cannot be saved)
                self._pending_best = bool(cfg.checkpoint_dir)
            else:
                self.bad_validations += 1
                if self.bad_validations >= cfg.early_stopping_patience:
                    self.stopped = True
                    log.info("early stopping at iteration %d (%s=%g)", self.iteration, key, value)
        return metrics

    def _log_step(self, stepped: list[str]) -> None:
        out = {}
        for name in stepped:
            p = self.problems_by_name[name]
            every = p.config.log_step
            if every and self.stepper.scheduler.steps[name] % every == 0:
                if name in self.stepper.last_loss:
                    out[f"{name}/loss"] = float(self.stepper.last_loss[name])
                for k, v in self.stepper.metrics.get(name, {}).items():
                    if isinstance(v, (int, float)) or (
                        isinstance(v, torch.Tensor) and v.numel() == 1
                    ):
                        out[f"{name}/{k}"] = float(v)
        if out:
            self.logger.log(out, self.iteration)

    def _roll_back(self, stepped: list[str]) -> None:
        from mlopt.rollback import roll_back

        roll_back(self, stepped)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume exactly (tensors and plain Python values only)."""
        return ckpt.engine_state(self)

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        ckpt.load_engine_state(self, state)

    def save_checkpoint(self, name: str | None = None) -> str | None:
        """Atomically write a checkpoint into ``checkpoint_dir`` (rank 0 only); returns its path."""
        return ckpt.save(self, name)

    def load_checkpoint(self, path: str | bool) -> None:
        """Resume from ``path`` (or the latest checkpoint in ``checkpoint_dir`` for True)."""
        ckpt.load(self, path)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
