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
    >>> from mlopt.hypergrad.checkpointed import state_tensors
    >>> state = [{"momentum_buffer": torch.ones(2), "step": 3}, {}]
    >>> keys, flat = state_tensors(state)
    >>> keys, len(flat)
    ([['momentum_buffer'], []], 1)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mlopt.errors import HypergradientError
from mlopt.hypergrad.base import attach, create_graph_requested

__all__ = [
    "StepRecord",
    "Segment",
    "state_tensors",
    "rebuild_state",
    "record_rng",
    "same_rng",
    "replay_scope",
    "restored",
    "close_segment",
]

Vec = tuple[torch.Tensor, ...]
Replay = Callable[[Vec, Any], tuple[Vec, Any]]


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


def replay_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Replays run in a forked random state (the live one is untouched)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def restored(
    rec: StepRecord, optimizer: torch.optim.Optimizer | None, device: torch.device
) -> Iterator[None]:
    """Restore the random state and learning rates that an update saw."""
    if rec.rng is not None:
        torch.set_rng_state(rec.rng[0])
        if rec.rng[1] is not None:
            torch.cuda.set_rng_state(rec.rng[1], device)
    groups = optimizer.param_groups if optimizer is not None else []
    saved = [g["lr"] for g in groups]
    for g, lr in zip(groups, rec.lrs):
        g["lr"] = lr
    try:
        yield
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr


def close_segment(
    name: str, seg: Segment, end_params: Vec, end_state: Any, replay: Replay
) -> tuple[Vec, Any]:
    """Join the segment's end to its start and the uppers by one recomputing autograd node.

    ``replay(params, state)`` recomputes the segment's updates from its start with their graph
    (injected by the runtime: the same update pipeline as the forward pass). Returns the end
    parameters and optimizer state, now attached to the start and the uppers.
    """
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
        params, state = replay(start[: len(seg.params)], state0)
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
    return joined[:n], rebuild_state(end_state, keys, joined[n:])
