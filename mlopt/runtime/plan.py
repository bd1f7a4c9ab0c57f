"""The plan: everything static about a program, compiled once and frozen.

:func:`compile_plan` is the only place that reads a problem's ``Config`` and its method's flags,
and the only place that raises compatibility errors. The rest of the runtime reads the
:class:`ProblemPlan` of each problem.

Example:
    >>> import torch, mlopt
    >>> class P(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return (self.module.weight ** 2).sum()
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> engine = mlopt.Engine([P("p", net, torch.optim.SGD(net.parameters(), lr=0.1))])
    >>> engine.plan.problems["p"].unroll_steps, engine.plan.order
    (1, ('p',))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlopt.config import freeze
from mlopt.errors import ConfigError, DependencyError
from mlopt.graph import Graph, step_order
from mlopt.hypergrad.base import Method
from mlopt.problem import problem_state
from mlopt.runtime.match import init_positions

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["ProblemPlan", "Plan", "compile_plan"]


@dataclass(frozen=True)
class ProblemPlan:
    """What the runtime needs to know about one problem, fixed for the run.

    Attributes:
        name: the problem's name.
        uppers: problems whose parameters the hypergradient goes to (u2l uppers, then the
            ``initialize_from`` problem).
        reads: lowers whose solution this problem's loss reads (it differentiates through them).
        waits_for: problems that must finish a window before this one steps.
        readers: problems that wait for this one.
        direct_lowers: u2l lowers whose method gives a direct gradient (Reptile).
        method: the hypergradient method of this problem (as a lower).
        differentiable: whether its updates are unrolled differentiably (it has uppers and a
            method that needs it).
        dopt: its differentiable optimizer (differentiable unroll or forward mode), or None.
        cut: window position where a truncated unroll drops the graph (None: never).
        checkpoint: the replay schedule of ``Reverse(checkpoint=...)`` (None: keep the graph).
        init: ``(upper, positions)`` of the meta-initialization, or None.
        tracks: whether the method tracks the dynamics (forward mode) of this problem.
        keeps_before: whether the parameters before each update are kept (DARTS).
        keeps_gradient: whether each update's gradient is kept (SAMA).
        snapshots: whether window starts are snapshot for roll-back.
        fp16_scaler: whether its optimizer updates use a ``GradScaler``.
        resample_window: one batch per window (the current task) instead of one per update;
            None: decided when the first window starts (whether the hook restarts the problem).
    """

    name: str
    uppers: tuple[str, ...]
    reads: frozenset[str]
    waits_for: tuple[str, ...]
    readers: tuple[str, ...]
    direct_lowers: tuple[str, ...]
    method: Method
    differentiable: bool
    dopt: Any
    cut: int | None
    checkpoint: Any
    init: tuple[str, tuple[int, ...]] | None
    tracks: bool
    keeps_before: bool
    keeps_gradient: bool
    snapshots: bool
    fp16_scaler: bool
    resample_window: bool | None
    unroll_steps: int
    accumulation: int
    clipping: float
    warmup_steps: int
    precision: str
    on_nonfinite: str
    log_step: int

    def warmup(self, updates: int) -> float:
        """The warm-up factor of the learning rate for the update after ``updates`` updates."""
        w = self.warmup_steps
        return 1.0 if w == 0 else min(1.0, (updates + 1) / w)


@dataclass(frozen=True)
class Plan:
    """The compiled program: step order, per-problem plans, the device and run options."""

    graph: Graph
    order: tuple[str, ...]
    problems: Mapping[str, ProblemPlan]
    device: torch.device
    roll_back: bool


def _check(p: Problem, problems: Mapping[str, Problem], graph: Graph) -> None:
    """Per-problem compatibility checks (they need the whole program)."""
    name, cfg, method = p.name, p.config, p.config.type
    uppers = graph.hyper_uppers(name)
    if cfg.initialize_from is not None:
        init_positions(p, problems, cfg.initialize_from)  # unknown problem, mismatched params
        init = cfg.initialize_from.partition(".")[0]
        if init not in uppers:
            raise DependencyError(
                f"problem {name!r}: initialize_from={init!r} must be one of its uppers; add "
                f"{{{init!r}: [{name!r}]}} to u2l"
            )
    from mlopt.problem import Problem as Base

    if type(p).learning_rates is not Base.learning_rates and not (
        uppers and method.differentiable_unroll
    ):
        raise ConfigError(
            f"problem {name!r} overrides learning_rates(), which only a differentiable unroll "
            "uses: give it an upper problem (u2l) and Config(type='reverse')"
        )
    if method.tracks_dynamics and uppers and cfg.gradient_clipping:
        raise ConfigError(
            f"problem {name!r}: gradient_clipping is not differentiated by forward mode; "
            "remove it or use Config(type='reverse')"
        )
    if getattr(method, "name", "") == "reptile" and cfg.initialize_from is None:
        raise ConfigError(
            f"problem {name!r}: Config(type='reptile') needs Config(initialize_from=<upper>)"
        )
    if uppers and method.differentiable_unroll and cfg.gradient_accumulation > 1:
        raise ConfigError(
            f"problem {name!r}: gradient_accumulation > 1 is not supported inside a "
            f"differentiable unroll ({method.name}); accumulate in its upper instead"
        )


def _plan_problem(
    p: Problem, problems: Mapping[str, Problem], graph: Graph, roll_back: bool
) -> ProblemPlan:
    name, cfg, method = p.name, p.config, p.config.type
    init = None
    if cfg.initialize_from is not None:
        upper, positions = init_positions(p, problems, cfg.initialize_from)
        init = (upper, tuple(positions))
    uppers = list(graph.hyper_uppers(name))
    if init is not None and init[0] not in uppers:
        uppers.append(init[0])
    differentiable = bool(uppers) and method.differentiable_unroll
    tracks = method.tracks_dynamics and bool(uppers)
    dopt = None
    if (differentiable or tracks) and p.optimizer is not None:
        from mlopt.optim import DifferentiableOptimizer

        try:
            dopt = DifferentiableOptimizer(p.optimizer, problem_state(p).leaves())
        except ConfigError as err:
            raise ConfigError(f"problem {name!r} ({method.name} unroll): {err}") from None
    u2l_lowers = graph.u2l.get(name, ())
    direct = tuple(
        low
        for low in u2l_lowers
        if type(problems[low].config.type).direct_gradient is not Method.direct_gradient
    )
    reads = frozenset(graph.lowers(name)) & {low for low in graph.l2u if name in graph.l2u[low]}
    ckpt = differentiable and getattr(method, "checkpoint_at", None)
    return ProblemPlan(
        name=name,
        uppers=tuple(uppers),
        reads=reads,
        waits_for=graph.lowers(name),
        readers=graph.uppers(name),
        direct_lowers=direct,
        method=method,
        differentiable=differentiable,
        dopt=dopt,
        cut=method.truncate_at(cfg.unroll_steps) if differentiable else None,
        checkpoint=ckpt(cfg.unroll_steps) if ckpt else None,
        init=init,
        tracks=tracks,
        keeps_before=method.needs_params_before and bool(uppers),
        keeps_gradient=getattr(method, "needs_last_gradient", False) and bool(uppers),
        snapshots=roll_back and bool(uppers) and p.optimizer is not None,
        fp16_scaler=cfg.precision == "fp16" and not differentiable and p.optimizer is not None,
        resample_window=_one_batch_per_window(p),
        unroll_steps=cfg.unroll_steps,
        accumulation=cfg.gradient_accumulation,
        clipping=cfg.gradient_clipping,
        warmup_steps=cfg.warmup_steps,
        precision=cfg.precision,
        on_nonfinite=cfg.on_nonfinite,
        log_step=cfg.log_step,
    )


def _one_batch_per_window(p: Problem) -> bool | None:
    """``Config(resample=...)``, or by default whether ``p`` is a per-task problem: it is
    meta-initialized or its loader yields tasks (an ``EpisodicSampler``); None when it overrides
    ``on_inner_loop_start`` (per-task if that hook restarts its parameters: decided at the first
    window start, before any batch is drawn)."""
    cfg = p.config
    if not cfg.resample_is_default or cfg.resample == "window":
        return cfg.resample == "window"
    from mlopt.data.episodic import EpisodicSampler
    from mlopt.problem import Problem as Base

    loader = p.train_data_loader
    if isinstance(loader, EpisodicSampler) or any(
        isinstance(getattr(loader, a, None), EpisodicSampler) for a in ("sampler", "batch_sampler")
    ):
        return True
    return None if type(p).on_inner_loop_start is not Base.on_inner_loop_start else False


def _check_checkpointed(plans: Mapping[str, ProblemPlan], graph: Graph) -> None:
    for name, pp in plans.items():
        if getattr(pp.method, "checkpoint", None) and (
            graph.u2l.get(name) or any(plans[u].differentiable for u in pp.uppers)
        ):
            raise ConfigError(
                f"problem {name!r}: {pp.method!r} replays its updates in the backward pass, which "
                "needs a problem without lowers whose uppers are not unrolled "
                "differentiably themselves; use checkpoint=None there"
            )


def compile_plan(
    problems: Mapping[str, Problem], graph: Graph, device: torch.device, roll_back: bool
) -> Plan:
    """Check every problem against the program and freeze the :class:`Plan`.

    Raises:
        ConfigError, DependencyError: an incompatible option, naming the problem and the fix.
    """
    for p in problems.values():
        _check(p, problems, graph)
    plans = {n: _plan_problem(p, problems, graph, roll_back) for n, p in problems.items()}
    _check_checkpointed(plans, graph)
    for name, p in problems.items():
        freeze(p.config, f"problem {name!r}")
    return Plan(graph, tuple(step_order(graph)), plans, device, roll_back)
