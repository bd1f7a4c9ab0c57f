"""Checkpointed reverse mode in the runtime: records of each update, segment joins, replays.

The maths (the recomputing autograd node) is :func:`mlopt.hypergrad.checkpointed.close_segment`;
this mixin gives it the replay, which runs the segment's updates again through the same update
pipeline (:func:`mlopt.runtime.pipeline.differentiable_update`), with the batches, random state,
learning rates and window positions the updates saw.

Example:
    >>> from mlopt.hypergrad import Reverse
    >>> Reverse(checkpoint=4).checkpoint
    4
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from mlopt.errors import DependencyError
from mlopt.hypergrad import checkpointed as ckr
from mlopt.hypergrad.base import attach
from mlopt.runtime.context import named_vjp
from mlopt.runtime.match import explicit_gradient
from mlopt.runtime.pipeline import differentiable_update
from mlopt.runtime.sharded import Sharded
from mlopt.step import gradient

__all__ = ["Replay", "missing_edge"]

Vec = tuple[torch.Tensor, ...]


def missing_edge(reader: str, name: str) -> DependencyError:
    """Two problems read each other without the edges that carry the hypergradient."""
    return DependencyError(
        f"problem {reader!r} reads problem {name!r}, whose training_step reads {reader!r}, but "
        "no dependency edge carries the hypergradient between them: the gradient would silently "
        f"miss how {name!r} depends on {reader!r}. Declare the upper U and lower L with "
        f"u2l {{U: [L]}} and l2u {{L: [U]}} (e.g. u2l {{{reader!r}: [{name!r}]}}, l2u "
        f"{{{name!r}: [{reader!r}]}}), or read self.{name} under torch.no_grad() in {reader!r} "
        "if it must not differentiate through it"
    )


class Replay(Sharded):
    """What an upper sees of its lowers, and the segments of ``Reverse(checkpoint=k)``: open,
    record, close (join, also when an upper reads a lower in mid-segment) and replay."""

    def exposed_params(self, name: str) -> Vec | None:
        """What the active upper sees of ``name`` (None: its plain current parameters)."""
        if not self._active:
            return None
        reader = self._active[-1]
        pp, st = self.plan.problems[name], self.states[name]
        if reader == name:
            return None
        if name not in self.plan.problems[reader].reads:
            if torch.is_grad_enabled():
                self._reads.add((reader, name))
                if (name, reader) in self._reads:
                    raise missing_edge(reader, name)
            return None
        if name in self.sharded:  # read through its sharded module (mlopt.runtime.sharded)
            return None
        if st.segment is not None:  # read in mid-segment: join it now
            self.close_segment(name)
        if pp.method.exposes_graph and st.fast is not None and pp.differentiable:
            return st.fast
        ctx = self.context(name)
        key = (self.version, tuple(id(t) for t in ctx.uppers), tuple(id(t) for t in st.current()))
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = attach(ctx.params, ctx.uppers, functools.partial(named_vjp, pp.method, ctx))
        self._cache[name] = (key, out)
        return out

    def reduce_unroll(self, name: str, grads: Vec) -> Vec:
        """Under data parallelism a persistent lower's differentiable update takes the gradient
        averaged over ranks (differentiably: one model trained on every rank's data, identical
        on all ranks); a meta-initialized lower adapts to its own rank's task."""
        if self.average_unroll is None or self.plan.problems[name].init is not None:
            return grads
        return self.average_unroll(grads)

    def segment_record(self, name: str, batch: Any) -> ckr.StepRecord:
        """Open (or extend) the segment of ``Reverse(checkpoint=k)`` with this update's record."""
        st = self.states[name]
        if st.segment is None:
            st.segment = ckr.Segment(st.current(), st.opt_state, *self.upper_tensors(name))
        rng = ckr.record_rng(self.plan.device)  # stored only where the RNG moved between updates
        seg = st.segment
        stored = None if seg.steps and ckr.same_rng(rng, seg.rng_after) else rng
        warm = self.plan.problems[name].warmup(st.updates)
        lrs = [g["lr"] * warm for g in st.optimizer.param_groups]
        return ckr.StepRecord(batch, stored, lrs, self.window_position(name))

    def close_segment(self, name: str) -> None:
        """Join the open segment's end to its start by one recomputing autograd node."""
        st = self.states[name]
        seg, st.segment = st.segment, None
        if seg is None or not seg.steps:
            return
        params, st.opt_state = ckr.close_segment(
            name,
            seg,
            tuple(t.detach() for t in st.current()),
            st.opt_state,
            lambda p0, s0: self.replay(name, seg, p0, s0),
        )
        st.set_fast(params)

    def replay(self, name: str, seg: ckr.Segment, params: Vec, state: Any) -> tuple[Vec, Any]:
        """Recompute a segment's updates from its start, with graph (in the backward pass).

        A memory budget's first replay also measures the graph of an update against what a
        segment start holds, and re-plans the schedule from it (once)."""
        plan = self.plan.problems[name].checkpoint
        if plan is None or plan.budget is None or plan.calibrated:
            return self._replay(name, seg, params, state)
        start = (*params, *ckr.state_tensors(state)[1])
        with ckr.saved_storages() as saved:
            out = self._replay(name, seg, params, state)
        new = ckr.graph_bytes(saved, (*start, *seg.uppers))
        plan.calibrate(sum(t.untyped_storage().nbytes() for t in start), new / len(seg.steps))
        return out

    def _replay(self, name: str, seg: ckr.Segment, params: Vec, state: Any) -> tuple[Vec, Any]:
        pp, st, p = self.plan.problems[name], self.states[name], self.problems[name]
        with ckr.replay_scope(self.plan.device), self.pinned(seg.slices, seg.uppers):
            for rec in seg.steps:
                with (
                    ckr.restored(rec, st.optimizer, self.plan.device),
                    self.replaying(name, rec.position),
                ):
                    saved, st.batch = st.batch, rec.batch
                    try:
                        with st.using(params):
                            loss, metrics = self.loss(p, rec.batch)
                            explicit = metrics.pop("gradient", None)
                            if explicit is not None:
                                grads = explicit_gradient(p, params, explicit)
                            else:
                                grads = gradient(loss, params, create_graph=True)
                            params, state = differentiable_update(
                                pp.dopt,
                                None,
                                params,
                                self.reduce_unroll(name, grads),
                                state,
                                clipping=pp.clipping,
                                warmup=1.0,
                                lr=p.learning_rates(),
                                keep_graph=True,
                            )
                    finally:
                        st.batch = saved
        return params, state
