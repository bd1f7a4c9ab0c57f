"""Checkpointed reverse mode: an unroll window in segments, recomputed in the backward pass.

``Reverse(checkpoint=k)`` runs the lower's updates eagerly without keeping their graph and, every
``k`` updates, joins the segment's end to its start (and to the uppers) by one autograd node
(:func:`mlopt.hypergrad.attach`). When the upper differentiates, each node replays its ``k``
updates from the stored start, with the same batches, random state and learning rates, builds
their graph and backpropagates through it. Memory holds the segment starts (``T/k`` copies of the
weights and optimizer state) plus one segment's graph, instead of the whole window's graph: with
``k ≈ √T`` it grows as ``√T`` (Chen et al. 2016, "Training deep nets with sublinear memory
cost"). Each update is computed twice (once without and once with its graph), plus the backward.

Example:
    >>> import torch
    >>> from mlopt.segments import state_tensors
    >>> state = [{"momentum_buffer": torch.ones(2), "step": 3}, {}]
    >>> keys, flat = state_tensors(state)
    >>> keys, len(flat)
    ([['momentum_buffer'], []], 1)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import HypergradientError
from mlopt.hypergrad.base import attach, create_graph_requested
from mlopt.step import clip_by_total_norm, gradient
from mlopt.wiring import explicit_gradient

if TYPE_CHECKING:
    from mlopt.problem import Problem
    from mlopt.stepper import Stepper

__all__ = [
    "StepRecord",
    "Segment",
    "state_tensors",
    "rebuild_state",
    "record_rng",
    "same_rng",
    "replay",
    "close_segment",
]

Vec = tuple[torch.Tensor, ...]


@dataclass
class StepRecord:
    """What replaying one update needs: its batch, random state, learning rates, position."""

    batch: Any
    rng: tuple[torch.Tensor, torch.Tensor | None] | None  # None: as the previous update left it
    lrs: list[float]
    position: int


@dataclass
class Segment:
    """The start of a segment (with its graph) and the updates taken since."""

    params: Vec
    state: Any
    uppers: Vec
    slices: dict[str, slice]
    steps: list[StepRecord] = field(default_factory=list)
    rng_after: tuple | None = None  # the random state the latest update left


def state_tensors(state: Any) -> tuple[list[list[str]], list[torch.Tensor]]:
    """The floating-point tensors of an optimizer state (a list of dicts), in a fixed order."""
    keys: list[list[str]] = []
    flat: list[torch.Tensor] = []
    for s in state or []:
        ks = sorted(
            k for k, v in s.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
        ks = [k for k in ks if k != "step"]
        keys.append(ks)
        flat.extend(s[k] for k in ks)
    return keys, flat


def rebuild_state(state: Any, keys: list[list[str]], flat: Vec) -> Any:
    """``state`` with its tensors (as listed by :func:`state_tensors`) replaced by ``flat``."""
    if state is None:
        return None
    it = iter(flat)
    return [{**s, **{k: next(it) for k in ks}} for s, ks in zip(state, keys)]


def record_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU random state, and the device's when it is a CUDA device."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def same_rng(a: tuple | None, b: tuple | None) -> bool:
    """Whether two :func:`record_rng` states are equal (the second is not stored then)."""
    if a is None or b is None:
        return False
    return (
        torch.equal(a[0], b[0])
        and (a[1] is None) == (b[1] is None)
        and (a[1] is None or torch.equal(a[1], b[1]))
    )


@contextlib.contextmanager
def _replaying(stepper: Stepper, p: Problem, rec: StepRecord) -> Iterator[None]:
    """Restore what the update saw: batch, random state, learning rates, window position."""
    if rec.rng is not None:
        torch.set_rng_state(rec.rng[0])
        if rec.rng[1] is not None:
            torch.cuda.set_rng_state(rec.rng[1], stepper.device)
    groups = p.optimizer.param_groups if p.optimizer is not None else []
    saved = ([g["lr"] for g in groups], p.__dict__.get("_batch"), stepper.replaying)
    for g, lr in zip(groups, rec.lrs):
        g["lr"] = lr
    p.__dict__["_batch"] = rec.batch
    stepper.replaying = (p.name, rec.position)
    try:
        yield
    finally:
        for g, lr in zip(groups, saved[0]):
            g["lr"] = lr
        p.__dict__["_batch"], stepper.replaying = saved[1], saved[2]


def replay(stepper: Stepper, p: Problem, seg: Segment, params: Vec, state: Any) -> tuple[Vec, Any]:
    """Recompute the segment's updates from ``params``/``state`` (its start), with graph."""
    dopt, clip = stepper.dopt[p.name], p.config.gradient_clipping
    devices = [stepper.device] if stepper.device.type == "cuda" else []
    with contextlib.ExitStack() as pinned:
        pinned.enter_context(torch.random.fork_rng(devices=devices))
        for name, sl in seg.slices.items():  # the uppers as the updates saw them
            pinned.enter_context(stepper.problems[name]._using(seg.uppers[sl]))
        for rec in seg.steps:
            with _replaying(stepper, p, rec), p._using(params):
                loss, metrics = stepper.loss(p, rec.batch)
                explicit = metrics.pop("gradient", None)
                if explicit is not None:
                    grads = explicit_gradient(p, params, explicit)
                else:
                    grads = gradient(loss, params, create_graph=True)
                grads = clip_by_total_norm(grads, clip)
                new, state = dopt.step(params, grads, state, lr=p.learning_rates())
            params = tuple(new)
    return params, state


def close_segment(stepper: Stepper, p: Problem, seg: Segment) -> None:
    """Join the segment's end to its start and the uppers by one recomputing autograd node."""
    name = p.name
    end_params = tuple(t.detach() for t in p._current())
    end_state = stepper.opt_state.get(name)
    keys, end_flat = state_tensors(end_state)
    start_keys, start_flat = state_tensors(seg.state)
    inputs = (*seg.params, *start_flat, *seg.uppers)
    n_start = len(seg.params) + len(start_flat)
    n = len(end_params)

    def vjp(cotangent: Vec) -> tuple[torch.Tensor | None, ...]:
        if create_graph_requested():
            raise HypergradientError(
                f"Reverse(checkpoint=...) on {name!r} cannot be differentiated twice (an upper "
                "that is itself unrolled differentiably); use checkpoint=None there"
            )
        # start from copies: the gradient w.r.t. the start goes back through the node's input,
        # and must not also be counted through the previous segment's node here
        start = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs[:n_start])
        state0 = rebuild_state(seg.state, start_keys, start[len(seg.params) :])
        params, state = replay(stepper, p, seg, start[: len(seg.params)], state0)
        outs = (*params, *state_tensors(state)[1])
        pairs = [(o, c) for o, c in zip(outs, cotangent) if o.requires_grad and c is not None]
        sources = (*start, *seg.uppers)
        need = [i for i, t in enumerate(sources) if t.requires_grad]
        if not pairs or not need:
            return (None,) * len(inputs)
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [sources[i] for i in need],
            [c for _, c in pairs],
            allow_unused=True,
            materialize_grads=True,
        )
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for i, g in zip(need, grads):
            out[i] = g
        return tuple(out)

    joined = attach((*end_params, *end_flat), inputs, vjp)
    joined = tuple(t if t.requires_grad else t.requires_grad_() for t in joined[:n]) + tuple(
        joined[n:]
    )
    p._set_fast(joined[:n])
    stepper.opt_state[name] = rebuild_state(end_state, keys, joined[n:])
