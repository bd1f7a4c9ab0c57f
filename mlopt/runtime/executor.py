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

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import HypergradientError
from mlopt.hypergrad import checkpointed as ckr
from mlopt.runtime import rollback, schedule
from mlopt.runtime.context import forward_step
from mlopt.runtime.match import detach_state, explicit_gradient
from mlopt.runtime.pipeline import differentiable_update, optimizer_update, scheduler_step_quietly
from mlopt.runtime.plan import Plan
from mlopt.runtime.replay import Replay
from mlopt.runtime.state import ProblemState
from mlopt.step import all_finite, gradient, nonfinite_error, to_device

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
        for name, st in states.items():
            st.ready = dict.fromkeys(plan.problems[name].waits_for, False)
            if plan.problems[name].fp16_scaler:
                st.scaler = torch.amp.GradScaler(plan.device.type)

    # ------------------------------------------------------------------ operations
    def run(self, op: schedule.Op) -> None:
        """Execute one operation of the schedule."""
        if isinstance(op, schedule.Update):
            self.step(op.problem)
        elif isinstance(op, schedule.OpenWindow):
            self.begin_window(op.problem)
        else:
            for low in op.lowers:
                if self.states[low].snapshot is not None:
                    rollback.roll_back(self.states[low], lambda b, k, n=low: self.redo(n, b, k))

    def iteration(self) -> list[str]:
        """Run one iteration of the schedule; returns the problems that updated."""
        return schedule.iteration(self.plan, self.states, self.run)

    def open_windows(self) -> None:
        """Open every window whose predecessor closed (before the first iteration, on resume)."""
        for op in schedule.windows_to_open(self.plan, self.states):
            self.run(op)

    # ------------------------------------------------------------------ windows
    def begin_window(self, name: str) -> None:
        """Commit the previous window and start a new one (meta-initialization, fresh state)."""
        pp, st, p = self.plan.problems[name], self.states[name], self.problems[name]
        if pp.dopt is not None and st.opt_state is not None:
            pp.dopt.commit(st.opt_state)
        st.commit()
        if pp.init is not None:
            full = self.states[pp.init[0]].current()
            src = tuple(full[i] for i in pp.init[1])
            if pp.differentiable:
                # distinct tensors (views) so that ∂f/∂θ_0 is not confused with ∂f/∂φ
                st.set_fast(tuple(t.view_as(t) for t in src))
            else:
                with torch.no_grad():
                    for leaf, value in zip(st.leaves(), src):
                        leaf.copy_(value)
                if st.optimizer is not None:
                    for leaf in st.leaves():
                        st.optimizer.state.pop(leaf, None)
        elif pp.differentiable:
            # a fresh copy: the leaf may already feed other graphs (e.g. an upper's fast weights
            # that depend on the previous window), and it is overwritten in place on commit
            st.set_fast(tuple(t.detach().clone().requires_grad_() for t in st.leaves()))
        if pp.dopt is not None:
            st.opt_state = pp.dopt.init_state(fresh=pp.init is not None)
        st.memory = pp.method.begin_window() if pp.method.tracks_dynamics else None
        st.window_batches = []
        st.segment = None
        st.opened = True
        if pp.snapshots:
            st.snapshot = rollback.snapshot(st)
        p.on_inner_loop_start()

    def sync_modules(self) -> None:
        """Write fast weights and functional optimizer state into the modules and optimizers,
        keeping the unroll as it is (its tensors are copies, never the leaves themselves)."""
        for name, st in self.states.items():
            dopt = self.plan.problems[name].dopt
            if dopt is not None and st.opt_state is not None:
                dopt.commit(st.opt_state)
            if st.fast is not None:
                with torch.no_grad():
                    for leaf, value in zip(st.leaves(), st.fast):
                        if value is not leaf:
                            leaf.copy_(value)

    # ------------------------------------------------------------------ one update
    def step(self, name: str) -> bool:
        """One update of ``name``; returns True when it completes an unroll window."""
        pp, st = self.plan.problems[name], self.states[name]
        starts = st.window_count == 0
        if not st.opened:
            self.begin_window(name)
        if pp.resample_window and not starts:
            batch = st.batch
        else:
            batch = None
            for i in range(self.services.world):  # every rank walks the stream, keeps its share
                drawn = st.data.next()
                if i == self.services.rank:
                    batch = drawn
            batch = st.batch = to_device(batch, self.plan.device)
        st.window_batches.append(batch)
        # updates before a truncation point keep no graph (constant memory in the window)
        keep_graph = pp.differentiable and (pp.cut is None or st.window_count >= pp.cut)
        if pp.cut is not None and pp.cut == st.window_count:
            st.set_fast(tuple(t.detach().requires_grad_() for t in st.current()))
            st.opt_state = detach_state(st.opt_state)
        record = None
        if keep_graph and pp.checkpoint:  # no graph now: replayed later
            keep_graph = False
            record = self.segment_record(name, batch)
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
        if record is not None and (
            len(st.segment.steps) == pp.checkpoint or st.window_count + 1 >= pp.unroll_steps
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
            if loss is not None and record:
                st.last_loss = loss.detach()
        elif loss is None:
            grads = tuple(torch.zeros_like(t) for t in params)
        else:
            if not all_finite([loss.detach()]):
                return self.skip_or_raise(name, "loss")
            if record:
                st.last_loss = loss.detach()
            try:
                target = loss if scaler is None else scaler.scale(loss)
                grads = gradient(target, params, create_graph=keep_graph)
            except HypergradientError as err:  # a lower's solver diverged in the backward pass
                if pp.on_nonfinite == "raise":
                    raise HypergradientError(f"problem {name!r}, step {st.steps}: {err}") from err
                return self.skip_or_raise(name, f"hypergradient ({err})")
        grads = self.add_direct(name, grads, 1.0 if scaler is None else scaler.get_scale())
        if scaler is None and not all_finite([g.detach() for g in grads]):
            return self.skip_or_raise(name, "gradient (hypergradient included)")
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
                grads,
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
        step = self.states[name].steps
        if self.plan.problems[name].on_nonfinite == "raise":
            raise nonfinite_error(name, step, what)
        warnings.warn(
            f"problem {name!r}, step {step}: non-finite {what}; update skipped",
            RuntimeWarning,
            stacklevel=4,
        )
        return None

    def add_direct(self, name: str, grads: Vec, scale: float = 1.0) -> Vec:
        """Add gradients that lowers give regardless of the loss (Reptile)."""
        for low in self.plan.problems[name].direct_lowers:
            ctx = self.context(low)
            extra = self.plan.problems[low].method.direct_gradient(ctx)
            if extra is None:
                continue
            sl = ctx.extra["slices"].get(name)
            if sl is not None:
                grads = tuple(g + scale * e for g, e in zip(grads, extra[sl]))
        return grads
