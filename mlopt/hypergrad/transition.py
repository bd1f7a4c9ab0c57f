"""The pure update map of a lower problem over (parameters, optimizer buffers), for forward mode.

Example:
    >>> import torch
    >>> state = [{"momentum_buffer": torch.ones(2), "step": 3}]
    >>> keys = state_keys(state)
    >>> keys
    [['momentum_buffer']]
    >>> unflatten_state(keys, flatten_state(keys, state))[0]["momentum_buffer"]
    tensor([1., 1.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mlopt.hypergrad.base import LowerContext, Transition
from mlopt.step import scaled_lr

__all__ = ["state_keys", "flatten_state", "unflatten_state", "transition_map"]

Vec = tuple[torch.Tensor, ...]


def state_keys(state: list[dict]) -> list[list[str]]:
    """The tensor entries (other than ``step``) of each parameter's optimizer state."""
    return [
        sorted(k for k, v in s.items() if isinstance(v, torch.Tensor) and k != "step")
        for s in state
    ]


def flatten_state(keys: list[list[str]], state: list[dict]) -> Vec:
    """The entries ``keys`` of ``state``, in order."""
    return tuple(s[k] for ks, s in zip(keys, state) for k in ks)


def unflatten_state(keys: list[list[str]], flat: Vec) -> list[dict]:
    """Inverse of :func:`flatten_state`."""
    out, i = [], 0
    for ks in keys:
        out.append({k: flat[i + j] for j, k in enumerate(ks)})
        i += len(ks)
    return out


def transition_map(
    dopt: Any,
    optimizer: torch.optim.Optimizer | None,
    params: Vec,
    ctx: LowerContext,
    gradient_at: Callable[[Vec, Vec], Vec],
    *,
    warmup: float,
    lr: Callable[[], Any],
    first: bool,
) -> Transition:
    """The update map of one lower step, ``(θ, buffers), φ -> (θ', buffers')``.

    ``gradient_at(θ, φ)`` is the lower's gradient with its uppers at ``φ``. The layout is fixed
    over the window: buffers that the first update creates (momentum, Adam moments) enter as zero
    placeholders the rule does not see until they exist. Counters (Adam's ``step``) are
    constants of the map. The lower steps with its own optimizer (forward mode is not a
    differentiable unroll), so its live state is in the optimizer.
    """
    current = dopt.init_state(fresh=False)
    n = len(params)
    with torch.no_grad():  # which buffers does an update create? (no loss evaluation)
        probe = dopt.step(params, [torch.zeros_like(t) for t in params], current)[1]
    keys = state_keys(probe)
    have = state_keys(current)
    static = [{k: v for k, v in st.items() if k not in ks} for st, ks in zip(current, keys)]

    def step_fn(state: Vec, uppers: Vec) -> Vec:
        ps, flat = state[:n], unflatten_state(keys, state[n:])
        buffers = [
            {**st, **{k: v for k, v in fl.items() if k in hv}}
            for st, fl, hv in zip(static, flat, have)
        ]
        grads = gradient_at(ps, uppers)
        with scaled_lr(optimizer, warmup):
            new, new_state = dopt.step(ps, grads, buffers, lr=lr())
        return tuple(new) + flatten_state(keys, new_state)

    filled = [
        {k: st.get(k, torch.zeros_like(t)) for k in ks} for st, ks, t in zip(current, keys, params)
    ]
    # copies: the optimizer then updates the parameters in place, and the tangent step must be
    # taken at the point before the update
    state = tuple(t.detach().clone() for t in params) + tuple(
        v.detach() for v in flatten_state(keys, filled)
    )
    return Transition(
        step_fn, state, tuple(u.detach() for u in ctx.uppers), n, init=ctx.init if first else None
    )
