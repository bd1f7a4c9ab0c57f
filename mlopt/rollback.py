"""DARTS look-ahead semantics (``EngineConfig(roll_back=True)``).

In DARTS (Liu et al. 2019, Algorithm 1) the architecture step uses a virtual, look-ahead update of
the weights ``w' = w - ξ ∇_w L_train(w, α)``; the real weight update is then taken from ``w`` with
the new ``α``. With ``roll_back=True``, after an upper steps, each of its lowers returns to the
state it had at the start of its window (parameters and optimizer state) and redoes the window's
updates on the same batches, with plain (non-differentiable) optimizer steps and the new upper
parameters.

Example:
    >>> from mlopt import EngineConfig
    >>> EngineConfig(roll_back=True).roll_back
    True
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from mlopt.step import all_finite, gradient, nonfinite_error, scaled_lr

if TYPE_CHECKING:
    from mlopt.engine import Engine
    from mlopt.problem import Problem

__all__ = ["snapshot", "roll_back"]


def snapshot(p: Problem) -> dict:
    """The parameters and optimizer state of ``p`` (copies)."""
    return {
        "params": [t.detach().clone() for t in p._leaves()],
        "optimizer": copy.deepcopy(p.optimizer.state_dict()) if p.optimizer is not None else None,
    }


def restore(p: Problem, snap: dict) -> None:
    """Put ``p`` back to ``snap`` (dropping any fast weights)."""
    p._set_fast(None)
    with torch.no_grad():
        for leaf, value in zip(p._leaves(), snap["params"]):
            leaf.copy_(value)
    if p.optimizer is not None:
        p.optimizer.load_state_dict(snap["optimizer"])


def redo_window(engine: Engine, p: Problem, batches: list) -> None:
    """Replay the window's updates of ``p`` on ``batches`` with its own optimizer."""
    st = engine.stepper
    for k, batch in enumerate(batches, start=1):
        params = p._current()
        st.replaying = (p.name, k)
        try:
            loss, _ = st.loss(p, batch)
        finally:
            st.replaying = None
        if loss is None:
            continue
        grads = gradient(loss, params, create_graph=False)
        if not all_finite(list(grads)):
            raise nonfinite_error(p.name, st.scheduler.steps[p.name], "gradient (roll-back)")
        for leaf, g in zip(params, grads):
            leaf.grad = g.detach()
        if p.config.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(params, p.config.gradient_clipping)
        with scaled_lr(p.optimizer, st._warmup(p)):
            p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)


def roll_back(engine: Engine, stepped: list[str]) -> None:
    """After the uppers in ``stepped`` stepped, roll their lowers back and redo their windows."""
    st = engine.stepper
    for upper in stepped:
        for low in engine.graph.lowers(upper):
            snap = st.snapshots.get(low)
            if snap is None or st.scheduler.window_count[low] != 0:
                continue
            p = engine.problems_by_name[low]
            restore(p, snap)
            st.opt_state[low] = None
            redo_window(engine, p, st.window_batches[low])
            st.snapshots[low] = None
