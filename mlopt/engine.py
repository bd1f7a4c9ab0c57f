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
import math
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mlopt import checkpoint as ckpt
from mlopt.config import EngineConfig, is_frozen, thaw
from mlopt.errors import ConfigError, DependencyError
from mlopt.graph import describe, normalize, validate
from mlopt.loggers import make_logger, validation_metrics
from mlopt.problem import Problem, bind, problem_state, unbind
from mlopt.runtime.checks import check_problems
from mlopt.runtime.executor import Runtime, Services
from mlopt.runtime.plan import compile_plan
from mlopt.runtime.run import choose_device, compile_run
from mlopt.runtime.schedule import operations
from mlopt.runtime.state import ProblemState, RunState

__all__ = ["Engine"]

log = logging.getLogger("mlopt")


class Engine:
    """Runs a multilevel program.

    Args:
        problems: the :class:`~mlopt.Problem` objects, in any order.
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}``, with Problem
            objects or names as keys and values.
        config: an :class:`~mlopt.EngineConfig` (None: defaults).

    Override :meth:`validation` to evaluate every ``valid_step`` iterations. Under
    ``strategy="zero"``, ``engine.sharding`` maps each problem with an optimizer to ``"zero"`` or
    to the reason its optimizer stays whole (:mod:`mlopt.sharding`); under ``strategy="fsdp"``,
    to ``"fsdp"`` or the reason its module stays whole (:mod:`mlopt.fsdp`).
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
        if isinstance(problems, Problem) or not isinstance(problems, Iterable):
            raise ConfigError(
                f"Engine: problems must be a list of mlopt.Problem objects, got "
                f"{type(problems).__name__}"
                + (" (pass [problem])" if isinstance(problems, Problem) else "")
            )
        problems = list(problems)
        if not problems:
            raise ConfigError("Engine: problems is empty; pass the mlopt.Problem objects to run")
        for p in problems:
            if not isinstance(p, Problem):
                raise DependencyError(f"Engine: {p!r} is not a mlopt.Problem")
        self.config = config
        # transactional: a failed construction leaves no problem bound to this engine and the
        # configs it froze editable again
        configs = [config, *(p.config for p in problems)]
        editable = [c for c in configs if not is_frozen(c)]
        try:
            self._build(problems, dependencies, config)
        except BaseException:
            self.__dict__.get("_unshard", lambda: None)()
            for p in problems:
                unbind(p, self)
            for c in editable:
                thaw(c)
            raise

    def _build(
        self, problems: list[Problem], dependencies: Mapping[str, Any] | None, config: EngineConfig
    ) -> None:
        run = self.run_plan = compile_run(config)
        self.graph = normalize([p.name for p in problems], dependencies)
        validate(self.graph)
        self.problems_by_name = {p.name: p for p in problems}
        states = {p.name: problem_state(p) for p in problems}
        for p in problems:
            bind(p, self, check_only=True)  # before anything changes
        for st in states.values():
            st.restrict_to_optimizer()
        check_problems(problems, states)
        resume = None if run.resume is None else ckpt.resolve(run.resume, run.checkpoint_dir)
        self.device = choose_device(run)
        self.distributed = None
        services = Services()
        if run.strategy in ("ddp", "zero", "fsdp"):
            from mlopt.distributed import DataParallel

            self.distributed = DataParallel(self.device, run.strategy)
            self.device = self.distributed.device
            dp = self.distributed
            services = Services(dp.rank, dp.world, dp.reduce_grads, dp.average_differentiable)
        self.plan = compile_plan(self.problems_by_name, self.graph, self.device, run.roll_back)
        if run.seed is not None:
            seed_everything(run.seed)  # the same on every rank: see DataParallel.start
        for p in problems:
            bind(p, self)
            if states[p.name].module is not None:
                states[p.name].module.to(self.device)
        self.states = states
        self.runtime = Runtime(self.plan, self.problems_by_name, states, services)
        if self.distributed is not None:
            self.distributed.start([st.module for st in states.values() if st.module is not None])
        self.sharding: dict[str, str] = {}
        if run.strategy == "zero":
            from mlopt.sharding import shard_optimizers

            self.sharding, self._unshard = shard_optimizers(
                self.plan.problems, states, self.problems_by_name
            )
        elif run.strategy == "fsdp":
            from mlopt.fsdp import shard_modules

            self.sharding, self._unshard = shard_modules(
                self.plan.problems, states, self.problems_by_name, self.device
            )
            self.runtime.sharded = frozenset(n for n, d in self.sharding.items() if d == "fsdp")
        self.run_state = RunState(best_metric=run.initial_best)
        if resume is not None:
            self.load_checkpoint(resume)
        self.runtime.open_windows()
        self.logger = make_logger(config, rank=services.rank)  # last: it may create files

    # ------------------------------------------------------------------ read-outs
    @property
    def iteration(self) -> int:
        """Iterations of the schedule run so far."""
        return self.run_state.iteration

    @property
    def global_step(self) -> int:
        """Betty's name for :attr:`iteration` (the same number)."""
        return self.run_state.iteration

    def __getattr__(self, item: str) -> Any:
        # Betty's habit: problems reached as engine.<name> (e.g. self.inner in validation())
        problems = self.__dict__.get("problems_by_name")
        if problems is not None and item in problems:
            return problems[item]
        raise AttributeError(
            f"{type(self).__name__} has no attribute {item!r}"
            + (f"; problems are {sorted(problems)}" if problems else "")
        )

    @property
    def stopped(self) -> bool:
        """Whether early stopping ended the run."""
        return self.run_state.stopped

    @property
    def best_metric(self) -> float:
        """The best early-stopping metric seen so far."""
        return self.run_state.best_metric

    @property
    def history(self) -> list[dict]:
        """One dict of validation metrics per validation, with its iteration."""
        return self.run_state.history

    @property
    def step_counts(self) -> dict[str, int]:
        """Updates booked per problem (skipped non-finite updates included)."""
        return {n: st.steps for n, st in self.states.items()}

    @property
    def update_counts(self) -> dict[str, int]:
        """Optimizer (or differentiable) updates taken per problem."""
        return {n: st.updates for n, st in self.states.items()}

    @property
    def last_losses(self) -> dict[str, torch.Tensor]:
        """The latest loss of each problem that has computed one (detached)."""
        return {n: st.last_loss for n, st in self.states.items() if st.last_loss is not None}

    @property
    def metrics(self) -> dict[str, dict]:
        """The latest metrics each problem's ``training_step`` returned besides its loss."""
        return {n: dict(st.metrics) for n, st in self.states.items()}

    def state(self, name: str) -> ProblemState:
        """The :class:`~mlopt.runtime.state.ProblemState` of problem ``name``."""
        return self.states[name]

    def window_position(self, name: str) -> int:
        """1-based position of ``name``'s current update in its unroll window."""
        return self.runtime.window_position(name)

    # ------------------------------------------------------------------ description
    def describe(self, iterations: int | None = None) -> str:
        """The program, its schedule and the operations that :meth:`step` executes in the first
        ``iterations`` iterations (default: two periods of the schedule, at most 8), as text;
        also what ``print(engine)`` shows."""
        unroll = {n: pp.unroll_steps for n, pp in self.plan.problems.items()}
        methods = {n: repr(pp.method) for n, pp in self.plan.problems.items()}
        if iterations is None:
            iterations = min(8, 2 * math.prod(unroll.values()))
        lines = [describe(self.graph, unroll, methods), "operations (what Engine.step() runs):"]
        for i, ops in enumerate(operations(self.plan, iterations), start=1):
            lines.append(f"  iteration {i}: " + "; ".join(map(str, ops)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"Engine(problems={list(self.problems_by_name)}, iteration={self.iteration})"

    def _exposed_params(self, problem: Problem):
        return self.runtime.exposed_params(problem.name)

    # ------------------------------------------------------------------ running
    def step(self) -> list[str]:
        """Run one iteration of the schedule; returns the names of the problems that stepped."""
        stepped = self.runtime.iteration()
        self.run_state.iteration += 1
        self._log_step(stepped)
        return stepped

    def run(self) -> dict:
        """Run until ``train_iters`` iterations (or early stopping); returns a summary dict."""
        run = self.run_plan
        bar = None
        if run.progress and self.runtime.services.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.iterations, initial=self.iteration, desc="mlopt")
        pending_save = False
        try:
            while self.iteration < run.iterations and not self.stopped:
                self.step()
                if run.validate_now(self.iteration):
                    metrics = self._validate()
                    if bar is not None and metrics:
                        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                        bar.write(f"iteration {self.iteration}: validation {shown}", sys.stderr)
                if run.checkpoint_now(self.iteration):
                    pending_save = True
                if pending_save and ckpt.at_boundary(self.plan, self.states):
                    self.save_checkpoint()
                    pending_save = False
                if self.run_state.pending_best and ckpt.at_boundary(self.plan, self.states):
                    self.save_checkpoint(name="best.pt")
                    self.run_state.pending_best = False
                if bar is not None and bar.update(1):  # (losses read only when it redraws)
                    bar.set_postfix({k: f"{float(v):.4g}" for k, v in self.last_losses.items()})
        finally:
            if bar is not None:
                bar.set_postfix(
                    {k: f"{float(v):.4g}" for k, v in self.last_losses.items()}, refresh=False
                )
                bar.close()
        self.runtime.sync_modules()
        if run.checkpoint_dir is not None:
            if ckpt.at_boundary(self.plan, self.states):
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
            "steps": self.step_counts,
            "stopped_early": self.stopped,
            "best_metric": self.best_metric,
            "history": self.history,
            "updates": self.update_counts,
        }

    def validation(self) -> dict:
        """Override to evaluate the program; return a dict of metrics (floats or tensors)."""
        return {}

    def _validate(self) -> dict:
        with torch.no_grad():
            metrics = validation_metrics(self.validation())
        if self.distributed is not None:
            metrics = self.distributed.average_metrics(metrics)
        self.history.append({"iteration": self.iteration, **metrics})
        self.logger.log({f"validation/{k}": v for k, v in metrics.items()}, self.iteration)
        stop, run = self.run_plan.early_stopping, self.run_state
        if stop is not None:
            key = stop.metric
            if key not in metrics:
                raise ConfigError(
                    f"early_stopping_metric {key!r} is not in Engine.validation()'s result "
                    f"(keys: {sorted(metrics)})"
                )
            value = metrics[key]
            if stop.better(value, self.best_metric):
                run.best_metric, run.bad_validations = value, 0
                # saved at the next window boundary (an unroll's graph cannot be saved)
                run.pending_best = self.run_plan.checkpoint_dir is not None
            else:
                run.bad_validations += 1
                if run.bad_validations >= stop.patience:
                    run.stopped = True
                    log.info("early stopping at iteration %d (%s=%g)", self.iteration, key, value)
        return metrics

    def _log_step(self, stepped: list[str]) -> None:
        out = {}
        for name in stepped:
            st, every = self.states[name], self.plan.problems[name].log_step
            if every and st.steps % every == 0:
                if st.last_loss is not None:
                    out[f"{name}/loss"] = float(st.last_loss)
                for k, v in st.metrics.items():
                    if isinstance(v, (int, float)) or (
                        isinstance(v, torch.Tensor) and v.numel() == 1
                    ):
                        out[f"{name}/{k}"] = float(v)
        if out:
            self.logger.log(out, self.iteration)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: each problem's state, the run's, the generators
        (tensors and plain Python values only)."""
        self.runtime.sync_modules()
        return ckpt.program_state(self.plan, self.states, self.run_state)

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned, all or nothing.

        Raises:
            ConfigError: ``state`` lacks entries or does not fit the program (problems, graph,
                parameter shapes, optimizers, schedulers, scalers); nothing was changed.
        """
        ckpt.load_program_state(self.plan, self.states, self.run_state, state)

    def save_checkpoint(self, name: str | None = None) -> str | None:
        """Atomically write a checkpoint into ``checkpoint_dir`` (rank 0 only); returns its path."""
        dist = self.distributed
        params = [t for st in self.states.values() if st.module for t in st.module.parameters()]
        return ckpt.save(
            self.state_dict(),
            self.run_plan.checkpoint_dir,
            name or f"iter_{self.iteration:08d}.pt",
            latest=name is None,
            parameters=params,
            write=dist is None or dist.rank == 0,
            barrier=None if dist is None else dist.barrier,
        )

    def load_checkpoint(self, path: str | bool) -> None:
        """Resume from ``path`` (or the latest checkpoint in ``checkpoint_dir`` for True).

        The file is validated (a readable, integrity-checked mlopt checkpoint with all its
        entries), then its fit to this program; only then is anything restored.

        Raises:
            ConfigError: naming the path and what is wrong; nothing was changed.
        """
        path = ckpt.resolve(path, self.run_plan.checkpoint_dir)
        state = ckpt.read_checkpoint(path, map_location=self.device)
        ckpt.load_program_state(
            self.plan, self.states, self.run_state, state, source=f"checkpoint {path!r}"
        )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
