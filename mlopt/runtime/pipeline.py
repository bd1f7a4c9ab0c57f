"""The update pipeline, shared by the normal path, the checkpointed-reverse replay and roll-back.

A differentiable unroll takes :func:`differentiable_update` (clip -> warm-up/lr -> functional
optimizer rule, graph kept where asked). Every other update takes :func:`optimizer_update`
(accumulate -> reduce across ranks -> unscale -> clip -> warm-up/lr -> the user's
``optimizer.step()``). Non-finite losses and gradients are handled before either, by
:func:`mlopt.runtime.executor.Runtime.gradients`, with the problem's ``on_nonfinite`` policy.

Example:
    >>> import torch
    >>> from mlopt.runtime.state import ProblemState
    >>> net = torch.nn.Linear(1, 1, bias=False)
    >>> st = ProblemState("p", net, torch.optim.SGD(net.parameters(), lr=0.5))
    >>> with torch.no_grad():
    ...     _ = net.weight.fill_(1.0)
    >>> optimizer_update(st, st.current(), (torch.ones(1, 1),), accumulation=1, clipping=0.0,
    ...                  warmup=1.0)
    True
    >>> net.weight.item()
    0.5
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mlopt.runtime.state import ProblemState
from mlopt.step import clear_grads, clip_by_total_norm, optimizer_step, scaled_lr

__all__ = ["differentiable_update", "optimizer_update", "scheduler_step_quietly"]

Vec = tuple[torch.Tensor, ...]


def differentiable_update(
    dopt: Any,
    optimizer: torch.optim.Optimizer | None,
    params: Vec,
    grads: Vec,
    state: Any,
    *,
    clipping: float,
    warmup: float,
    lr: Any,
    keep_graph: bool,
) -> tuple[Vec, Any]:
    """One functional update ``(params, state) -> (params', state')`` of a differentiable unroll.

    The gradient is clipped differentiably (one gradient per update), the learning rate scaled by
    the warm-up factor, and the graph kept when ``keep_graph``.
    """
    grads = clip_by_total_norm(grads, clipping)
    with scaled_lr(optimizer, warmup), torch.set_grad_enabled(keep_graph):
        new, state = dopt.step(params, grads, state, lr=lr)
    return tuple(new), state


def optimizer_update(
    st: ProblemState,
    params: Vec,
    grads: Vec,
    *,
    accumulation: int,
    clipping: float,
    warmup: float,
    reduce: Callable[[Sequence[torch.Tensor]], None] | None = None,
    step_scheduler: bool = True,
    keep_gradient: bool = False,
) -> bool:
    """Accumulate ``grads`` into ``.grad`` and, every ``accumulation`` calls, step the optimizer.

    Returns True when the optimizer stepped. The accumulated gradient is averaged across ranks
    (``reduce``), unscaled by the problem's fp16 scaler, clipped to ``clipping`` (total norm),
    and applied with the learning rate scaled by ``warmup``; with ``keep_gradient`` that applied
    gradient is kept as ``st.last_grad`` (SAMA's preconditioner needs the step's own gradient).
    """
    for leaf, g in zip(params, grads):
        g = g.detach() if accumulation == 1 else g.detach() / accumulation  # (x / 1 == x)
        leaf.grad = g if leaf.grad is None else leaf.grad + g
    st.accumulated += 1
    if st.accumulated < accumulation:
        return False
    if reduce is not None:
        reduce(params)
    scaler = st.scaler
    if scaler is not None:  # fp16: overflowing steps are skipped and the scale lowered
        scaler.unscale_(st.optimizer)
    if clipping:  # the accumulated, averaged gradient, as torch users expect
        torch.nn.utils.clip_grad_norm_(params, clipping)
    if keep_gradient:
        st.last_grad = tuple(
            torch.zeros_like(q) if q.grad is None else q.grad.detach().clone() for q in params
        )
    fast = False
    with scaled_lr(st.optimizer, warmup):
        if scaler is None:
            fast = optimizer_step(st.optimizer)
        else:
            scaler.step(st.optimizer)
            scaler.update()
    clear_grads(st.optimizer)
    st.accumulated = 0
    st.updates += 1
    if step_scheduler and st.scheduler is not None:
        if not fast and getattr(st.optimizer, "kind", None) is None:
            st.scheduler.step()
        else:  # torch's step-order check looks for its own wrapper's call: the fast path (or a
            scheduler_step_quietly(st.scheduler)  # sharded optimizer, mlopt.sharding) skips it
    return True


def scheduler_step_quietly(scheduler: Any) -> None:
    """Step an lr scheduler whose optimizer's ``step()`` is never called (a functional unroll)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        warnings.filterwarnings("ignore", "Seems like `optimizer.step()` has been overridden")
        scheduler.step()
