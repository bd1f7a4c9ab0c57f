"""Runs the schedule's operations over the plan and the problems' states.

The :class:`Runtime` owns no maths: losses come from the user's ``training_step``, gradients from
autograd, hypergradients from the lower problems' methods (``mlopt.hypergrad``), updates from
:mod:`mlopt.runtime.pipeline`. How a hypergradient reaches an upper is in
:mod:`mlopt.runtime.context`.

Example:
    >>> import torch, mlopt
    >>> class P(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return (self.module.weight ** 2).sum()
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> engine = mlopt.Engine([P("p", net, torch.optim.SGD(net.parameters(), lr=0.1))])
    >>> engine.step(), engine.step_counts
    (['p'], {'p': 1})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import HypergradientError
from mlopt.hypergrad import checkpointed as ckr
from mlopt.hypergrad import reverse
from mlopt.runtime import rollback, schedule, window
from mlopt.runtime.context import forward_step
from mlopt.runtime.match import explicit_gradient
from mlopt.runtime.pipeline import differentiable_update, optimizer_update, scheduler_step_quietly
from mlopt.runtime.plan import Plan
from mlopt.runtime.replay import Replay
from mlopt.runtime.state import ProblemState
from mlopt.step import all_finite, missing_loss, skip_or_raise, to_device

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["Runtime", "Services"]

Vec = tuple[torch.Tensor, ...]


@dataclass
class Services:
    """What the distributed strategy gives the runtime: its rank and a gradient reducer."""

    rank: int = 0
    world: int = 1
    reduce_grads: Callable[[Sequence[torch.Tensor]], None] | None = None
    average_unroll: Callable[[Vec], Vec] | None = None


class Runtime(Replay):
    """Executes :mod:`mlopt.runtime.schedule` operations on one program."""

    def __init__(
        self,
        plan: Plan,
        problems: Mapping[str, Problem],
        states: Mapping[str, ProblemState],
        services: Services,
    ) -> None:
        super().__init__(plan, problems, states)
        self.services = services
        self.average_unroll = services.average_unroll
        for name, st in states.items():
            st.ready = dict.fromkeys(plan.problems[name].waits_for, False)
            if plan.problems[name].fp16_scaler:
                st.scaler = torch.amp.GradScaler(plan.device.type)

    # ------------------------------------------------------------------ operations
    def run(self, op: schedule.Op) -> None:
        """Execute one operation of the schedule."""
        if isinstance(op, schedule.Update):
            self.step(op.problem)
        elif isinstance(op, schedule.StartWindow):
            window.start_window(self.plan, self.states, self.problems[op.problem], op.problem)
        elif isinstance(op, schedule.EndWindow):
            window.end_window(self.plan, self.states, op.problem)
        else:
            for low in op.lowers:
                if self.states[low].snapshot is not None:
                    rollback.roll_back(self.states[low], lambda b, k, n=low: self.redo(n, b, k))

    def iteration(self) -> list[str]:
        """Run one iteration of the schedule; returns the problems that updated."""
        return schedule.iteration(self.plan, self.states, self.run)

    def open_windows(self) -> None:
        """Prepare and start every window not yet open (before the first iteration, on resume)."""
        for op in schedule.windows_to_open(self.plan, self.states):
            self.run(op)

    # ------------------------------------------------------------------ windows
    def sync_modules(self) -> None:
        """Write fast weights and functional optimizer state into the modules and optimizers."""
        window.sync_modules(self.plan, self.states)

    # ------------------------------------------------------------------ one update
    def step(self, name: str) -> bool:
        """One update of ``name``; returns True when it completes an unroll window."""
        pp, st = self.plan.problems[name], self.states[name]
        starts = st.window_count == 0
        if not st.opened:
            self.run(schedule.StartWindow(name))
        if (pp.resample_window or st.per_task) and not starts:
            batch = st.batch
        else:
            batch = None
            for i in range(self.services.world):  # every rank walks the stream, keeps its share
                drawn = st.data.next()
                if i == self.services.rank:
                    batch = drawn
            batch = st.batch = to_device(batch, self.plan.device)
        st.window_batches.append(batch)
        how = reverse.unroll_step(
            st.window_count, differentiable=pp.differentiable, cut=pp.cut, checkpoint=pp.checkpoint
        )
        if how.cut:
            fast, st.opt_state = reverse.cut_graph(st.current(), st.opt_state)
            st.set_fast(fast)
        keep_graph = how.keep_graph
        record = self.segment_record(name, batch) if how.record else None
        params = st.current()
        if pp.keeps_before:
            st.before = tuple(t.detach().clone() for t in params)
        grads = self.gradients(name, batch, params, keep_graph)
        if grads is None:  # skipped (on_nonfinite="skip")
            return schedule.book(self.plan, self.states, name)
        transition = self.transition(name, params) if pp.tracks else None
        if record is not None:
            st.segment.steps.append(record)
            st.segment.rng_after = ckr.record_rng(self.plan.device)
        self.apply(name, params, grads, keep_graph)
        if record is not None and reverse.segment_ends(
            len(st.segment.steps), st.window_count, pp.checkpoint, pp.unroll_steps
        ):
            self.close_segment(name)
        if transition is not None:
            st.memory = forward_step(name, pp.method, st.memory, transition)
        self.version += 1
        return schedule.book(self.plan, self.states, name)

    def gradients(
        self, name: str, batch: Any, params: Vec, keep_graph: bool, *, record: bool = True
    ) -> Vec | None:
        """The update's gradient (loss, hypergradient and direct terms), or None when a
        non-finite value makes the problem skip the update (``on_nonfinite="skip"``)."""
        pp, st = self.plan.problems[name], self.states[name]
        loss, metrics = self.loss(self.problems[name], batch)
        explicit = metrics.pop("gradient", None)
        if record:  # (a roll-back redo keeps the window's own losses and metrics)
            st.metrics = metrics
        scaler = st.scaler
        if explicit is not None:
            grads = explicit_gradient(self.problems[name], params, explicit)
        elif loss is None:
            if params and not pp.direct_lowers:
                raise missing_loss(name, len(params))
            grads = tuple(torch.zeros_like(t) for t in params)
        else:  # (the loss is checked with the gradient: one check, one sync per update)
            if scaler is not None and not all_finite([loss.detach()]):
                return self.skip_or_raise(name, "loss")
            try:
                target = loss if scaler is None else scaler.scale(loss)
                grads = self.loss_gradient(name, target, params, keep_graph)
            except HypergradientError as err:  # a lower's solver diverged in the backward pass
                if scaler is not None and scaler.get_scale() > 1.0:  # the scale overflowed it:
                    grads = tuple(torch.full_like(t, float("inf")) for t in params)  # skip, lower
                elif all_finite([loss.detach()]) and pp.on_nonfinite == "raise":
                    raise HypergradientError(f"problem {name!r}, step {st.steps}: {err}") from err
                else:
                    bad = not all_finite([loss.detach()])
                    return self.skip_or_raise(name, "loss" if bad else f"hypergradient ({err})")
        grads = self.add_direct(name, grads, 1.0 if scaler is None else scaler.get_scale())
        own = () if loss is None else (loss,)
        if scaler is None and not all_finite(own + tuple(grads)):  # (records no graph)
            bad = bool(own) and not all_finite(own)
            return self.skip_or_raise(name, "loss" if bad else "gradient (hypergradient included)")
        if record and own:
            st.last_loss = loss.detach()
        return grads

    def apply(
        self, name: str, params: Vec, grads: Vec, keep_graph: bool, *, counted: bool = True
    ) -> None:
        """Hand the gradient to the update pipeline (``counted=False``: a roll-back redo, which
        takes the problem's own optimizer step even where the window was unrolled)."""
        pp, st = self.plan.problems[name], self.states[name]
        if not params:
            return
        if pp.differentiable and counted:
            new, st.opt_state = differentiable_update(
                pp.dopt,
                st.optimizer,
                params,
                self.reduce_unroll(name, grads),
                st.opt_state,
                clipping=pp.clipping,
                warmup=pp.warmup(st.updates),
                lr=self.problems[name].learning_rates(),
                keep_graph=keep_graph,
            )
            if not keep_graph:
                new = tuple(t.detach().requires_grad_() for t in new)
            st.set_fast(new)
            st.updates += 1
            if st.scheduler is not None:
                scheduler_step_quietly(st.scheduler)
            return
        optimizer_update(
            st,
            params,
            grads,
            accumulation=pp.accumulation,
            clipping=pp.clipping,
            warmup=pp.warmup(st.updates),
            reduce=self.services.reduce_grads,
            step_scheduler=counted,
            keep_gradient=pp.keeps_gradient,
        )

    def redo(self, name: str, batch: Any, position: int) -> None:
        """Redo one update of a rolled-back window through the same gradient and pipeline."""
        st = self.states[name]
        with self.replaying(name, position):
            params = st.current()
            grads = self.gradients(name, batch, params, keep_graph=False, record=False)
        if grads is not None:
            self.apply(name, params, grads, keep_graph=False, counted=False)

    def skip_or_raise(self, name: str, what: str) -> None:
        """Raise for a non-finite ``what`` or, with ``on_nonfinite="skip"``, warn (skip)."""
        skip_or_raise(self.plan.problems[name].on_nonfinite, name, self.states[name].steps, what)

    def add_direct(self, name: str, grads: Vec, scale: float = 1.0) -> Vec:
        """Add gradients that lowers give regardless of the loss (Reptile)."""
        for low in self.plan.problems[name].direct_lowers:
            ctx = self.context(low)
            extra = self.plan.problems[low].method.direct_gradient(ctx)
            sl = None if extra is None else ctx.extra["slices"].get(name)
            if sl is not None:
                grads = tuple(g + scale * e for g, e in zip(grads, extra[sl]))
        return grads
