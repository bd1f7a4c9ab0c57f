"""Pure helpers of the Stepper: meta-initialization matching, explicit gradients, optimizer-state
layouts for forward mode, and the forward-mode transition map.

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

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.hypergrad.base import LowerContext, Transition
from mlopt.step import scaled_lr

if TYPE_CHECKING:
    from mlopt.problem import Problem
    from mlopt.stepper import Stepper

__all__ = [
    "named_vjp",
    "init_positions",
    "explicit_gradient",
    "detach_state",
    "state_keys",
    "flatten_state",
    "unflatten_state",
    "forward_transition",
]

Vec = tuple[torch.Tensor, ...]


def named_vjp(method: Any, ctx: LowerContext, cotangent: Vec) -> Vec:
    """``method.vjp`` whose errors name the lower problem they come from."""
    try:
        return method.vjp(ctx, cotangent)
    except HypergradientError as err:
        if str(err).startswith("hypergradient through"):
            raise
        raise HypergradientError(f"hypergradient through {ctx.name!r} ({method!r}): {err}") from err


def init_positions(p: Problem, problems: dict[str, Problem], spec: str) -> tuple[str, list[int]]:
    """Parse ``initialize_from`` (``"upper"`` or ``"upper.submodule"``) into the upper's name and
    the position, among the upper's parameters, of each of ``p``'s parameters.

    Raises:
        ConfigError: unknown upper, or parameters of ``p`` with no same-shaped counterpart.
    """
    upper, _, path = spec.partition(".")
    if upper not in problems:
        raise ConfigError(
            f"problem {p.name!r}: initialize_from={spec!r} is not a problem of the engine"
        )
    src = problems[upper]
    prefix = f"{path}." if path else ""
    pos = {n: i for i, n in enumerate(src._names)}
    shapes = {n: tuple(t.shape) for n, t in zip(src._names, src._leaves())}
    out, bad = [], []
    for n, t in zip(p._names, p._leaves()):
        key = prefix + n
        if key not in pos or shapes[key] != tuple(t.shape):
            bad.append(f"{n} {tuple(t.shape)}")
        else:
            out.append(pos[key])
    if bad or not p._names:
        where = f" under {path!r}" if path else ""
        raise ConfigError(
            f"problem {p.name!r}: initialize_from={spec!r} needs the same trainable parameter "
            f"names and shapes in {upper!r}{where}; no match for {bad[:4]}; {upper!r} has "
            f"{sorted(shapes.items())[:6]}"
        )
    return upper, out


def explicit_gradient(p: Problem, params: Vec, given: Any) -> Vec:
    """Validate a gradient returned by ``training_step`` as ``{"loss": ..., "gradient": ...}``."""
    given = tuple(given)
    if len(given) != len(params) or any(
        not isinstance(g, torch.Tensor) or g.shape != t.shape for g, t in zip(given, params)
    ):
        raise ConfigError(
            f"problem {p.name!r}: training_step's 'gradient' must hold one tensor per parameter "
            f"of self.parameters() with the same shapes {[tuple(t.shape) for t in params]}"
        )
    return given


def detach_state(state: Any) -> Any:
    if state is None:
        return None
    return [
        {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in state
    ]


def state_keys(state: list[dict]) -> list[list[str]]:
    return [
        sorted(k for k, v in s.items() if isinstance(v, torch.Tensor) and k != "step")
        for s in state
    ]


def flatten_state(keys: list[list[str]], state: list[dict]) -> Vec:
    return tuple(s[k] for ks, s in zip(keys, state) for k in ks)


def unflatten_state(keys: list[list[str]], flat: Vec) -> list[dict]:
    out, i = [], 0
    for ks in keys:
        out.append({k: flat[i + j] for j, k in enumerate(ks)})
        i += len(ks)
    return out


def forward_transition(stepper: Stepper, p: Problem, params: Vec) -> Transition:
    """The pure update map of ``p`` over (parameters, optimizer buffers), for forward mode.

    The layout is fixed over the window: buffers that the first update creates (momentum,
    Adam moments) enter as zero placeholders the rule does not see until they exist.
    Counters (Adam's ``step``) are constants of the map.
    """
    name, batch = p.name, p.batch
    dopt = stepper.dopt.get(name)
    if dopt is None:
        raise ConfigError(f"problem {name!r}: forward mode needs an optimizer")
    # the lower steps with its own optimizer (forward mode is not a differentiable unroll),
    # so its live state is in the optimizer
    current = dopt.init_state(fresh=False)
    ctx = stepper.context(p)
    n = len(params)
    warmup = stepper._warmup(p)
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
        with contextlib.ExitStack() as stack:
            for up_name, sl in ctx.extra["slices"].items():
                stack.enter_context(stepper.problems[up_name]._using(uppers[sl]))
            grads = torch.func.grad(lambda q: stepper.loss_at(p, q, batch))(ps)
            stack.enter_context(scaled_lr(p.optimizer, warmup))
            new, new_state = dopt.step(ps, grads, buffers, lr=p.learning_rates())
        return tuple(new) + flatten_state(keys, new_state)

    filled = [
        {k: st.get(k, torch.zeros_like(t)) for k in ks} for st, ks, t in zip(current, keys, params)
    ]
    state = tuple(t.detach() for t in params) + tuple(
        v.detach() for v in flatten_state(keys, filled)
    )
    first = stepper.scheduler.window_count[name] == 0
    return Transition(
        step_fn,
        state,
        tuple(u.detach() for u in ctx.uppers),
        n,
        init=ctx.init if first else None,
    )
