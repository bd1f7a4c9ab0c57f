"""DARTS look-ahead semantics (``EngineConfig(roll_back=True)``), over a problem's state.

In DARTS (Liu et al. 2019, Algorithm 1) the architecture step uses a virtual, look-ahead update of
the weights ``w' = w - ξ ∇_w L_train(w, α)``; the real weight update is then taken from ``w`` with
the new ``α``. With ``roll_back=True``, after an upper steps, each of its lowers returns to the
state it had at the start of its window (parameters, optimizer state, accumulated gradients and
counters) and redoes the window's updates on the same batches with the new upper parameters,
through the same gradient and update pipeline as every other update (so gradients are averaged
across ranks, the fp16 scaler, accumulation, clipping, warm-up and ``on_nonfinite`` apply).

Example:
    >>> import torch
    >>> from mlopt.runtime.state import ProblemState
    >>> net = torch.nn.Linear(1, 1)
    >>> st = ProblemState("low", net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> sorted(snapshot(st))
    ['accumulated', 'grads', 'optimizer', 'params', 'updates']
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from mlopt.runtime.state import ProblemState

__all__ = ["snapshot", "restore", "roll_back"]


def snapshot(st: ProblemState) -> dict:
    """Copies of the problem's parameters, gradients, optimizer state and update counters."""
    leaves = st.leaves()
    return {
        "params": [t.detach().clone() for t in leaves],
        "grads": [None if t.grad is None else t.grad.detach().clone() for t in leaves],
        "optimizer": copy.deepcopy(st.optimizer.state_dict()) if st.optimizer else None,
        "accumulated": st.accumulated,
        "updates": st.updates,
    }


def restore(st: ProblemState, snap: dict) -> None:
    """Put the problem back to ``snap`` (dropping any fast weights and functional state)."""
    st.set_fast(None)
    st.opt_state = None
    with torch.no_grad():
        for leaf, value, grad in zip(st.leaves(), snap["params"], snap["grads"]):
            leaf.copy_(value)
            leaf.grad = None if grad is None else grad.clone()
    if st.optimizer is not None:
        st.optimizer.load_state_dict(snap["optimizer"])
    st.accumulated, st.updates = snap["accumulated"], snap["updates"]


def roll_back(st: ProblemState, redo: Callable[[Any, int], None]) -> None:
    """Restore the window start of ``st`` and ``redo(batch, position)`` each of its updates."""
    restore(st, st.snapshot)
    for position, batch in enumerate(st.window_batches, start=1):
        redo(batch, position)
    st.snapshot = None
