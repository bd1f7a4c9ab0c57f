"""Runs problem updates: unroll windows, fast weights, hypergradient exposure.

The :class:`Stepper` is the Engine's workhorse and owns no maths: losses come from the user's
``training_step``, gradients from autograd, hypergradients from the lower problems' methods
(``mlopt.hypergrad``), differentiable updates from ``mlopt.optim``.

How a hypergradient reaches an upper: while an upper's ``training_step`` runs, a lower that it
reads (an ``l2u`` edge) shows it either its differentiable unroll (``reverse``) or an autograd node
(:func:`mlopt.hypergrad.attach`) whose backward is the lower's method. The upper's gradient is then
plain ``torch.autograd.grad``, and a middle level differentiates through its own lowers the
same way.

Example:
    >>> import torch, mlopt
    >>> class P(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return (self.module.weight ** 2).sum()
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> engine = mlopt.Engine([P("p", net, torch.optim.SGD(net.parameters(), lr=0.1))])
    >>> engine.stepper.step(engine.problems_by_name["p"])  # True: a window of 1 update closed
    True
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.graph import Graph, Scheduler
from mlopt.hypergrad.base import LowerContext, Method, attach
from mlopt.segments import Segment, StepRecord, close_segment, record_rng, same_rng
from mlopt.step import (
    all_finite,
    autocast,
    clip_by_total_norm,
    gradient,
    nonfinite_error,
    scaled_lr,
    split_output,
    to_device,
)
from mlopt.wiring import (
    detach_state,
    explicit_gradient,
    forward_transition,
    init_positions,
    named_vjp,
)

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["Stepper"]

Vec = tuple[torch.Tensor, ...]


class Stepper:
    """Per-run state of the schedule and the update of each problem."""

    def __init__(self, problems: dict[str, Problem], graph: Graph, device: torch.device) -> None:
        self.problems = problems
        self.graph = graph
        self.device = device
        self.scheduler = Scheduler(graph, {n: p.config.unroll_steps for n, p in problems.items()})
        self.reads = {
            n: set(graph.lowers(n)) & {low for low in graph.l2u if n in graph.l2u[low]}
            for n in problems
        }
        self.uppers = {n: self._upper_names(n) for n in problems}
        self.differentiable = {
            n: bool(self.uppers[n]) and p.config.type.differentiable_unroll
            for n, p in problems.items()
        }
        # fp16 loss scaling for updates taken by the user's optimizer (a differentiable unroll
        # runs unscaled: use bf16 there)
        self.scalers = {
            n: torch.amp.GradScaler(device.type)
            for n, p in problems.items()
            if p.config.precision == "fp16" and not self.differentiable[n] and p.optimizer
        }
        self.dopt: dict[str, Any] = {}
        self.opt_state: dict[str, Any] = {}
        self.memory: dict[str, Any] = {}
        self.before: dict[str, Vec | None] = {}
        self.window_batches: dict[str, list] = {n: [] for n in problems}
        self.snapshots: dict[str, dict | None] = {}
        self.opened = dict.fromkeys(problems, False)
        self.replaying: tuple[str, int] | None = None  # (problem, window position) in roll-back
        self.keep_snapshots = False  # EngineConfig.roll_back
        self.accumulated = dict.fromkeys(problems, 0)
        self.updates = dict.fromkeys(problems, 0)
        self.last_loss: dict[str, float] = {}
        self.metrics: dict[str, dict] = {}
        self.rank, self.world = 0, 1
        self.reduce_grads = None  # set by the distributed strategy
        self._active: list[Problem] = []
        self._version = 0
        self._cache: dict[str, tuple] = {}
        self.segments: dict[str, Any] = {}  # Reverse(checkpoint=k): the open segment
        for name, p in problems.items():
            m = p.config.type
            if getattr(m, "checkpoint", None) and (
                graph.u2l.get(name) or any(self.differentiable[u] for u in self.uppers[name])
            ):
                raise ConfigError(
                    f"problem {name!r}: {m!r} replays its updates in the backward pass, which "
                    "needs a problem without lowers whose uppers are not unrolled "
                    "differentiably themselves; use checkpoint=None there"
                )
            if self.differentiable[name] or (m.tracks_dynamics and self.uppers[name]):
                from mlopt.optim import DifferentiableOptimizer

                if p.optimizer is not None:
                    self.dopt[name] = DifferentiableOptimizer(p.optimizer, p._leaves())

    def _upper_names(self, name: str) -> list[str]:
        out = list(self.graph.hyper_uppers(name))
        spec = self.init_spec(self.problems[name])
        if spec is not None and spec[0] not in out:
            out.append(spec[0])
        return out

    def init_spec(self, p: Problem) -> tuple[str, list[int]] | None:
        """``(upper name, position in the upper's parameters of each of p's parameters)``."""
        spec = p.config.initialize_from
        if spec is None:
            return None
        return init_positions(p, self.problems, spec)

    # ------------------------------------------------------------------ activity
    @contextlib.contextmanager
    def active(self, problem: Problem) -> Iterator[None]:
        """Mark ``problem`` as the one whose loss is being computed."""
        self._active.append(problem)
        try:
            yield
        finally:
            self._active.pop()

    def loss(self, problem: Problem, batch: Any) -> tuple[torch.Tensor | None, dict]:
        """Run ``problem.training_step(batch)`` under its precision; returns (loss, metrics)."""
        with self.active(problem), autocast(problem.config.precision, self.device):
            out = problem.training_step(batch)
        return split_output(problem.name, out)

    def loss_at(self, problem: Problem, params: Vec, batch: Any) -> torch.Tensor:
        """The problem's loss with ``params`` as its current parameters."""
        with problem._using(params):
            loss, _ = self.loss(problem, batch)
        if loss is None:
            raise ConfigError(f"problem {problem.name!r}: training_step returned no loss")
        return loss

    # ------------------------------------------------------------------ exposure
    def exposed_params(self, problem: Problem) -> Vec | None:
        """What the active upper sees of ``problem`` (None: its plain current parameters)."""
        if not self._active:
            return None
        reader = self._active[-1]
        if reader is problem or problem.name not in self.reads[reader.name]:
            return None
        method = problem.config.type
        if self.segments.get(problem.name) is not None:  # read in mid-segment: join it now
            self._close_segment(problem)
        if method.exposes_graph and problem._fast is not None and self.differentiable[problem.name]:
            return problem._fast
        ctx = self.context(problem)
        key = (
            self._version,
            tuple(id(t) for t in ctx.uppers),
            tuple(id(t) for t in problem._current()),
        )
        hit = self._cache.get(problem.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = attach(ctx.params, ctx.uppers, functools.partial(named_vjp, method, ctx))
        self._cache[problem.name] = (key, out)
        return out

    def upper_tensors(self, problem: Problem) -> tuple[Vec, dict[str, slice]]:
        """The current parameters of ``problem``'s uppers, concatenated, and each one's slice."""
        tensors: list[torch.Tensor] = []
        slices: dict[str, slice] = {}
        for name in self.uppers[problem.name]:
            cur = self.problems[name]._current()
            slices[name] = slice(len(tensors), len(tensors) + len(cur))
            tensors.extend(cur)
        return tuple(tensors), slices

    def context(self, problem: Problem) -> LowerContext:
        """The :class:`LowerContext` of ``problem`` with its uppers' current parameters."""
        tensors, slices = self.upper_tensors(problem)
        batch = problem.batch
        spec = self.init_spec(problem)
        init = None
        if spec is not None:
            start = slices[spec[0]].start
            init = tuple(start + i for i in spec[1])
        return LowerContext(
            name=problem.name,
            params=tuple(t.detach() for t in problem._current()),
            params_before=self.before.get(problem.name),
            uppers=tensors,
            loss_fn=functools.partial(self.pinned_loss, problem, batch, tensors, slices),
            lr=self.learning_rates(problem),
            init=init,
            memory=self.memory.get(problem.name),
            step=self.scheduler.steps[problem.name],
            extra={"slices": slices},
        )

    def pinned_loss(
        self, problem: Problem, batch: Any, uppers: Vec, slices: dict[str, slice], params: Vec
    ) -> torch.Tensor:
        """``problem``'s loss at ``params`` with every upper pinned to the given tensors.

        A method's vjp runs later, during an upper's backward pass, when the uppers' current
        parameters may have changed (a middle level evaluating at temporary parameters): pinning
        makes the closure depend on its captured tensors only.
        """
        with contextlib.ExitStack() as stack:
            for name, sl in slices.items():
                stack.enter_context(self.problems[name]._using(uppers[sl]))
            return self.loss_at(problem, params, batch)

    def learning_rates(self, problem: Problem) -> tuple[float, ...]:
        """The current learning rate of each trainable parameter tensor."""
        opt = problem.optimizer
        if opt is None:
            return ()
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        return tuple(float(lr_of.get(id(p), 0.0)) for p in problem._leaves())

    # ------------------------------------------------------------------ windows
    def begin_window(self, p: Problem) -> None:
        """Commit the previous window and start a new one (meta-initialization, fresh state)."""
        name, diff = p.name, self.differentiable[p.name]
        if name in self.dopt and self.opt_state.get(name) is not None:
            self.dopt[name].commit(self.opt_state[name])
        p._commit()
        spec = self.init_spec(p)
        init = None if spec is None else spec[0]
        if spec is not None:
            full = self.problems[spec[0]]._current()
            src = tuple(full[i] for i in spec[1])
            if diff:
                # distinct tensors (views) so that ∂f/∂θ_0 is not confused with ∂f/∂φ
                p._set_fast(tuple(t.view_as(t) for t in src))
            else:
                with torch.no_grad():
                    for leaf, value in zip(p._leaves(), src):
                        leaf.copy_(value)
                if p.optimizer is not None:
                    for leaf in p._leaves():
                        p.optimizer.state.pop(leaf, None)
        elif diff:
            # a fresh copy: the leaf may already feed other graphs (e.g. an upper's fast weights
            # that depend on the previous window), and it is overwritten in place on commit
            p._set_fast(tuple(t.detach().clone().requires_grad_() for t in p._leaves()))
        if name in self.dopt:
            self.opt_state[name] = self.dopt[name].init_state(fresh=init is not None)
        self.memory[name] = p.config.type.begin_window() if p.config.type.tracks_dynamics else None
        self.window_batches[name] = []
        self.segments.pop(name, None)
        self.opened[name] = True
        if self.keep_snapshots and self.uppers[name] and p.optimizer is not None:
            from mlopt.rollback import snapshot

            self.snapshots[name] = snapshot(p)
        p.on_inner_loop_start()

    def open_windows(self) -> None:
        """Open the next unroll window of every problem whose previous window has closed.

        Windows open eagerly (at the start and at the end of the iteration that closed the
        previous one), so that every problem stepping in between sees the window's own tensors.
        """
        for name in self.scheduler.order:
            if not self.opened[name] and self.scheduler.window_count[name] == 0:
                self.begin_window(self.problems[name])

    def window_position(self, name: str) -> int:
        """1-based position of ``name``'s current (or replayed) update in its unroll window;
        ``unroll_steps`` once the window has closed (an upper re-evaluating the last update)."""
        if self.replaying is not None and self.replaying[0] == name:
            return self.replaying[1]
        if self.opened[name]:
            return self.scheduler.window_count[name] + 1
        return self.problems[name].config.unroll_steps

    def sync_modules(self) -> None:
        """Write fast weights and functional optimizer state into the modules and optimizers,
        keeping the unroll as it is (its tensors are copies, never the leaves themselves)."""
        for name, p in self.problems.items():
            if name in self.dopt and self.opt_state.get(name) is not None:
                self.dopt[name].commit(self.opt_state[name])
            if p._fast is not None:
                with torch.no_grad():
                    for leaf, value in zip(p._leaves(), p._fast):
                        if value is not leaf:
                            leaf.copy_(value)

    def step(self, p: Problem) -> bool:
        """One update of ``p``; returns True when it completes an unroll window."""
        name, cfg, sched = p.name, p.config, self.scheduler
        starts = sched.window_starts(name)
        if not self.opened[name]:
            self.begin_window(p)
        if cfg.resample == "window" and not starts:
            batch = p.batch
        else:
            batch = to_device(p._next_batch(self.rank, self.world), self.device)
            p.__dict__["_batch"] = batch
        self.window_batches[name].append(batch)
        diff = self.differentiable[name]
        method = cfg.type
        cut = method.truncate_at(cfg.unroll_steps) if diff else None
        # updates before a truncation point keep no graph (constant memory in the window)
        keep_graph = diff and (cut is None or sched.window_count[name] >= cut)
        if cut is not None and cut == sched.window_count[name]:
            p._set_fast(tuple(t.detach().requires_grad_() for t in p._current()))
            self.opt_state[name] = detach_state(self.opt_state.get(name))
        segment = None
        if keep_graph and getattr(method, "checkpoint", None):  # no graph now: replayed later
            segment, keep_graph = self._open_segment(p), False
            rng = record_rng(self.device)  # stored only where the RNG moved between updates
            stored_rng = None if segment.steps and same_rng(rng, segment.rng_after) else rng
            position = self.window_position(name)
        params = p._current()
        if method.needs_params_before and self.uppers[name]:
            self.before[name] = tuple(t.detach().clone() for t in params)
        loss, metrics = self.loss(p, batch)
        explicit = metrics.pop("gradient", None)
        self.metrics[name] = metrics
        if explicit is not None:
            grads = explicit_gradient(p, params, explicit)
            if loss is not None:
                self.last_loss[name] = loss.detach()
        elif loss is None:
            grads = tuple(torch.zeros_like(t) for t in params)
        else:
            if not all_finite([loss.detach()]):
                return self._skip_or_raise(p, "loss")
            self.last_loss[name] = loss.detach()
            scaler = self.scalers.get(name)
            try:
                target = loss if scaler is None else scaler.scale(loss)
                grads = gradient(target, params, create_graph=keep_graph)
            except HypergradientError as err:  # a lower's solver diverged in the backward pass
                if cfg.on_nonfinite == "raise":
                    step = sched.steps[name]
                    raise HypergradientError(f"problem {name!r}, step {step}: {err}") from err
                return self._skip_or_raise(p, f"hypergradient ({err})")
        scaler = self.scalers.get(name)
        grads = self._add_direct(p, grads, 1.0 if scaler is None else scaler.get_scale())
        if scaler is None and not all_finite([g.detach() for g in grads]):
            return self._skip_or_raise(p, "gradient (hypergradient included)")
        if diff:  # one gradient per update: clip it here (differentiably)
            grads = clip_by_total_norm(grads, cfg.gradient_clipping)
        transition = (
            forward_transition(self, p, params)
            if method.tracks_dynamics and self.uppers[name]
            else None
        )
        if segment is not None:
            lrs = [g["lr"] * self._warmup(p) for g in p.optimizer.param_groups]
            segment.steps.append(StepRecord(batch, stored_rng, lrs, position))
            segment.rng_after = record_rng(self.device)
        self._update(p, params, grads, diff, keep_graph)
        if segment is not None and (
            len(segment.steps) == method.checkpoint
            or sched.window_count[name] + 1 >= cfg.unroll_steps
        ):
            self._close_segment(p)
        if transition is not None:
            self.memory[name] = method.after_step(self.memory[name], transition)
        self._version += 1
        return self._record(name)

    def _open_segment(self, p: Problem) -> Segment:
        seg = self.segments.get(p.name)
        if seg is None:
            seg = Segment(p._current(), self.opt_state.get(p.name), *self.upper_tensors(p))
            self.segments[p.name] = seg
        return seg

    def _close_segment(self, p: Problem) -> None:
        seg = self.segments.pop(p.name, None)
        if seg is not None and seg.steps:
            close_segment(self, p, seg)

    def _record(self, name: str) -> bool:
        done = self.scheduler.record_step(name)
        if done:
            self.opened[name] = False
        return done

    def _skip_or_raise(self, p: Problem, what: str) -> bool:
        step = self.scheduler.steps[p.name]
        if p.config.on_nonfinite == "raise":
            raise nonfinite_error(p.name, step, what)
        warnings.warn(
            f"problem {p.name!r}, step {step}: non-finite {what}; update skipped",
            RuntimeWarning,
            stacklevel=3,
        )
        return self._record(p.name)

    def _add_direct(self, p: Problem, grads: Vec, scale: float = 1.0) -> Vec:
        """Add gradients that lowers give regardless of the loss (Reptile)."""
        for low_name in self.graph.u2l.get(p.name, ()):
            low = self.problems[low_name]
            if type(low.config.type).direct_gradient is Method.direct_gradient:
                continue
            ctx = self.context(low)
            extra = low.config.type.direct_gradient(ctx)
            if extra is None:
                continue
            sl = ctx.extra["slices"].get(p.name)
            if sl is not None:
                grads = tuple(g + scale * e for g, e in zip(grads, extra[sl]))
        return grads

    def _warmup(self, p: Problem) -> float:
        w = p.config.warmup_steps
        return 1.0 if w == 0 else min(1.0, (self.updates[p.name] + 1) / w)

    def _update(self, p: Problem, params: Vec, grads: Vec, diff: bool, keep_graph: bool) -> None:
        name, cfg = p.name, p.config
        if not params:
            return
        if diff:
            with scaled_lr(p.optimizer, self._warmup(p)), torch.set_grad_enabled(keep_graph):
                new, self.opt_state[name] = self.dopt[name].step(
                    params, grads, self.opt_state[name], lr=p.learning_rates()
                )
            if not keep_graph:
                new = tuple(t.detach().requires_grad_() for t in new)
            p._set_fast(tuple(new))
            self.updates[name] += 1
            if p.scheduler is not None:
                with warnings.catch_warnings():  # the unroll never calls optimizer.step()
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    p.scheduler.step()
            return
        k = cfg.gradient_accumulation
        for leaf, g in zip(params, grads):
            g = g.detach() / k
            leaf.grad = g if leaf.grad is None else leaf.grad + g
        self.accumulated[name] += 1
        if self.accumulated[name] < k:
            return
        if self.reduce_grads is not None:
            self.reduce_grads(params)
        scaler = self.scalers.get(name)
        if scaler is not None:  # fp16: overflowing steps are skipped and the scale lowered
            scaler.unscale_(p.optimizer)
        if cfg.gradient_clipping:  # the accumulated, averaged gradient, as torch users expect
            torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clipping)
        with scaled_lr(p.optimizer, self._warmup(p)):
            if scaler is None:
                p.optimizer.step()
            else:
                scaler.step(p.optimizer)
                scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        self.accumulated[name] = 0
        self.updates[name] += 1
        if p.scheduler is not None:
            p.scheduler.step()
