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
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mlopt.errors import HypergradientError
from mlopt.hypergrad.base import attach, create_graph_requested

__all__ = [
    "AUTO_BUDGET",
    "START_COST",
    "Schedule",
    "budget_schedule",
    "schedule",
    "graph_bytes",
    "saved_storages",
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

AUTO_BUDGET = 0.4  # checkpoint="auto": 0.4 of plain reverse's memory (a margin under 0.5)
START_COST = 4.0  # a segment start, in updates' graphs, until the first replay measures it


def budget_schedule(n: int, budget: float, start_cost: float = START_COST) -> tuple[int, int]:
    """``(segment, live)`` for ``n`` differentiated updates in ``budget`` times plain reverse's
    memory, replaying as few updates as possible.

    Memory model, in units of one update's graph; ``start_cost`` is what a segment start (the
    parameters and optimizer state it keeps) costs in those units. The last ``live`` updates
    keep their graph, the ``n - live`` before them are replayed in segments of ``segment <=
    live`` updates. The forward pass peaks at ``live + starts``; the backward pass frees the live
    tail before it replays, and peaks at ``segment + starts``; both also hold the cotangent and
    its gradient (two starts' worth), as plain reverse does (``n + 2 start_cost``). With
    ``segment = live`` the peak is ``live + start_cost (ceil((n - live) / live) + 2)``, and the
    largest ``live`` within the budget replays least. When no split fits, the minimum-memory
    ``segment = live = ceil(√(n start_cost))`` (capped at ``n``) is returned.

    Example:
        >>> budget_schedule(200, 0.4, start_cost=1.0), budget_schedule(200, 0.4, start_cost=5.3)
        ((76, 76), (57, 57))
        >>> budget_schedule(100, 0.01)
        (20, 20)
    """
    cap = budget * (n + 2 * start_cost)
    for live in range(n, 0, -1):
        if live + start_cost * (math.ceil((n - live) / live) + 2) <= cap:
            return live, live
    k = min(n, math.ceil(math.sqrt(n * start_cost)))
    return k, k


@dataclass
class Schedule:
    """Which updates of a window are recorded for replay, and where their segments end.

    Attributes:
        segment: updates per recomputed segment (``k``).
        live_from: window position from which the updates keep their graph (none replayed).
        budget: the memory budget it was planned for (None: a fixed ``segment``).
        unroll_steps: the window length; ``first``: the first differentiated position.
        calibrated: whether a replay has measured what a segment start costs (a budget is
            planned with :data:`START_COST` until then, and re-planned once, after it).

    Example:
        >>> s = Schedule(segment=3, live_from=6)
        >>> [s.records(t) for t in (5, 6)], s.ends(recorded=2, position=5)
        ([True, False], True)
    """

    segment: int
    live_from: int
    budget: float | None = None
    unroll_steps: int = 0
    first: int = 0
    calibrated: bool = False

    def records(self, position: int) -> bool:
        """Whether the update at 0-based window ``position`` is recorded for replay."""
        return position < self.live_from

    def ends(self, recorded: int, position: int) -> bool:
        """Whether a segment of ``recorded`` updates closes after the update at ``position``
        (it is full, or the live tail starts next)."""
        return recorded >= self.segment or position + 1 >= self.live_from

    def calibrate(self, start_bytes: int, update_bytes: float) -> None:
        """Re-plan a budget once from a measured segment start and update graph (bytes)."""
        if self.budget is None or self.calibrated or update_bytes <= 0:
            return
        self.calibrated = True
        cost = max(start_bytes / update_bytes, 0.0)
        k, live = budget_schedule(self.unroll_steps - self.first, self.budget, cost)
        self.segment, self.live_from = k, self.unroll_steps - live


def schedule(
    checkpoint: int | float | str | None, unroll_steps: int, cut: int | None
) -> Schedule | None:
    """The replay schedule of ``Reverse(checkpoint=...)`` on a window of ``unroll_steps`` whose
    differentiated updates start at ``cut`` (None: 0).

    ``checkpoint=k`` replays segments of ``k`` updates and keeps the last segment's graph live
    (replaying it would only recompute what the backward pass is about to use, at the same peak
    memory). A float in ``(0, 1)`` is a memory budget, as a fraction of plain reverse's memory
    (:func:`budget_schedule`); ``"auto"`` is :data:`AUTO_BUDGET`.

    Example:
        >>> schedule(4, 10, None).live_from, schedule(4, 10, 6).live_from
        (8, 6)
        >>> s = schedule("auto", 200, None)
        >>> s.segment, s.live_from
        (67, 133)
    """
    if checkpoint is None:
        return None
    first = cut or 0
    n = unroll_steps - first
    if isinstance(checkpoint, (str, float)):
        budget = AUTO_BUDGET if isinstance(checkpoint, str) else checkpoint
        k, live = budget_schedule(n, budget)
        return Schedule(k, unroll_steps - live, budget, unroll_steps, first)
    last = n - checkpoint * ((n - 1) // checkpoint) if n > 0 else 0
    return Schedule(checkpoint, unroll_steps - last, None, unroll_steps, first)


def graph_bytes(saved: dict[int, int], exclude: Vec) -> int:
    """Bytes of the storages in ``saved`` (data pointer -> bytes) not held by ``exclude``.

    Example:
        >>> a, b = torch.ones(4), torch.ones(2)
        >>> graph_bytes({a.data_ptr(): 16, b.data_ptr(): 8}, (a,))
        8
    """
    held = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for ptr, n in saved.items() if ptr not in held)


@contextlib.contextmanager
def saved_storages() -> Iterator[dict[int, int]]:
    """Collect the storages autograd saves inside the block (data pointer -> bytes)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


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
