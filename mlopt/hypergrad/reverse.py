"""Reverse-mode hypergradients through an unrolled lower-level optimization (RHG, TRHG, MAML).

The lower problem's updates ``θ_{t+1} = Φ(θ_t, φ)`` are recorded by autograd (``create_graph``);
the upper's gradient is the vector-Jacobian product of ``θ_T`` with the upper cotangent
(Franceschi et al. 2017, Finn et al. 2017). ``Reverse(truncate=K)`` keeps the graph of the last
``K`` updates only (Shaban et al. 2019). ``Reverse(checkpoint=k)`` keeps no graph during the
unroll and recomputes it ``k`` updates at a time in the backward pass
(:mod:`mlopt.hypergrad.checkpointed`): the same gradient with memory that grows as ``T/k + k``
instead of ``T``.

Truncation convention: ``truncate=K`` backpropagates through the LAST ``K`` updates of each unroll
window, as BOML's truncated RHG does. (BOAT's ``truncate_iter`` counts the other way: it skips the
FIRST ``K`` updates.) The window start is cut from the graph, so a meta-initialization is not
differentiated through when ``K < unroll_steps``.

Example:
    >>> import torch
    >>> phi = torch.tensor(2.0, requires_grad=True)
    >>> step = lambda theta: (theta[0] - 0.5 * (theta[0] - phi),)   # GD on ½(θ-φ)²
    >>> theta_T = unroll(step, (torch.tensor(0.0),), steps=3)
    >>> reverse_vjp(theta_T, (phi,), (torch.tensor(1.0),))
    (tensor(0.8750),)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mlopt.hypergrad import checkpointed
from mlopt.hypergrad.base import Method, Vec, register_method

__all__ = [
    "Reverse",
    "UnrollStep",
    "unroll",
    "unroll_step",
    "cut_graph",
    "segment_ends",
    "reverse_vjp",
]


def unroll(
    step_fn: Callable[[Vec], Vec], params0: Vec, steps: int, *, truncate: int | None = None
) -> Vec:
    """Apply ``step_fn`` ``steps`` times keeping the autograd graph (of the last ``truncate``)."""
    params = tuple(params0)
    for t in range(steps):
        if truncate is not None and t == steps - truncate:
            params = tuple(p.detach().requires_grad_(p.requires_grad) for p in params)
        params = tuple(step_fn(params))
    return params


@dataclass(frozen=True)
class UnrollStep:
    """What reverse mode does with one update of a lower's unroll window.

    Attributes:
        cut: drop the graph before this update (the truncation point of ``Reverse(truncate=K)``).
        keep_graph: record this update in autograd now (``create_graph``).
        record: keep no graph now but record the update for a checkpointed replay.
    """

    cut: bool
    keep_graph: bool
    record: bool


def unroll_step(
    position: int, *, differentiable: bool, cut: int | None, checkpoint: Any
) -> UnrollStep:
    """The graph policy for the update at 0-based window ``position``.

    Updates before the truncation point ``cut`` keep no graph (memory constant in the window);
    with ``checkpoint`` set (a ``mlopt.hypergrad.checkpointed.Schedule``, or a segment
    length: every kept update recorded), the kept updates it replays are recorded instead.

    Example:
        >>> [unroll_step(t, differentiable=True, cut=2, checkpoint=None).keep_graph
        ...  for t in range(4)]
        [False, False, True, True]
    """
    keep = differentiable and (cut is None or position >= cut)
    records = getattr(checkpoint, "records", None)
    record = keep and checkpoint is not None and (records is None or records(position))
    return UnrollStep(
        cut=cut is not None and position == cut, keep_graph=keep and not record, record=record
    )


def cut_graph(params: Vec, opt_state: Any) -> tuple[Vec, Any]:
    """Parameters and functional optimizer state cut from the graph (new leaves), the start of
    a truncated unroll.

    Example:
        >>> p, s = cut_graph((torch.ones(1) * 2,), [{"momentum_buffer": torch.ones(1), "step": 2}])
        >>> p[0].requires_grad, s[0]["step"]
        (True, 2)
    """
    params = tuple(t.detach().requires_grad_() for t in params)
    if opt_state is None:
        return params, None
    state = [
        {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for s in opt_state
    ]
    return params, state


def segment_ends(recorded: int, position: int, checkpoint: Any, unroll_steps: int) -> bool:
    """Whether a checkpointed segment of ``recorded`` updates closes after the update at
    0-based ``position`` (it is full, or the window or its replayed part ends).

    Example:
        >>> segment_ends(2, 3, checkpoint=4, unroll_steps=4)
        True
    """
    if hasattr(checkpoint, "ends"):
        return checkpoint.ends(recorded, position) or position + 1 >= unroll_steps
    return recorded == checkpoint or position + 1 >= unroll_steps


def reverse_vjp(outputs: Vec, inputs: Vec, cotangent: Vec, *, create_graph: bool = False) -> Vec:
    """``cotangent^T d outputs / d inputs`` by backpropagation (zeros for unused inputs)."""
    grads = torch.autograd.grad(
        outputs, inputs, cotangent, create_graph=create_graph, allow_unused=True, retain_graph=True
    )
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


@dataclass(repr=False)
class Reverse(Method):
    """Exact reverse-mode hypergradient through the lower's unroll window.

    Args:
        truncate: backpropagate through the last ``truncate`` updates of each window only
            (None: all of them).
        checkpoint: recompute the unroll in segments of this many updates in the backward pass
            instead of keeping its graph (None: keep it); the last segment keeps its graph (it
            is not replayed). About ``√unroll_steps`` minimizes memory; the gradient is the
            same, at the cost of computing the replayed updates twice. A float in ``(0, 1)``
            is a memory budget instead, as a fraction of plain reverse's graph memory: the
            segment length and the number of updates that keep their graph are chosen to
            replay the fewest updates within it; ``"auto"`` is a budget of 0.4
            (``mlopt.hypergrad.checkpointed.schedule``). Needs a lower problem without
            lowers of its own.

    Example:
        >>> Reverse(truncate=10, checkpoint=4)
        Reverse(truncate=10, checkpoint=4)
    """

    truncate: int | None = None
    checkpoint: int | float | str | None = None

    name = "reverse"
    differentiable_unroll = True
    exposes_graph = True

    def __post_init__(self) -> None:
        from mlopt.errors import ConfigError

        for field in ("truncate", "checkpoint"):
            t = getattr(self, field)
            if field == "checkpoint" and (t == "auto" or (type(t) is float and 0.0 < t < 1.0)):
                continue
            if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
                also = ", a memory budget in (0, 1) or 'auto'" if field == "checkpoint" else ""
                raise ConfigError(
                    f"Reverse: {field} must be None or an integer >= 1{also}, got {t!r}"
                )

    def truncate_at(self, unroll_steps: int) -> int | None:
        if self.truncate is None or self.truncate >= unroll_steps:
            return None
        return unroll_steps - self.truncate

    def checkpoint_at(self, unroll_steps: int) -> checkpointed.Schedule | None:
        """The replay schedule of ``checkpoint`` on a window of ``unroll_steps`` (None: none)."""
        return checkpointed.schedule(self.checkpoint, unroll_steps, self.truncate_at(unroll_steps))


register_method("reverse", Reverse)
