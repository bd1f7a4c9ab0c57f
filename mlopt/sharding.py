"""Optimizer-state sharding for ``EngineConfig(strategy="zero")`` (ZeRO stage 1, under torchrun).

``strategy="zero"`` is ``strategy="ddp"`` (every rank runs the program on its share of the data,
gradients averaged once per optimizer update) with the optimizer state of each problem split
across ranks by :class:`torch.distributed.optim.ZeroRedundancyOptimizer`: each rank keeps the
state (Adam's moments, SGD's momentum) of its own share of the parameter tensors, updates those,
and broadcasts them. The arithmetic is the same as under ``ddp``; only memory differs.

A problem's optimizer is sharded when it is stepped by ``optimizer.step()``. It stays whole, with
its reason in :attr:`mlopt.Engine.sharding`, when its updates are a differentiable unroll or
forward mode (their optimizer state is functional, per window) or when its lower method reads
the whole optimizer (SAMA's correction). The replacement keeps the
optimizer's class, param groups, hyperparameters and state; the hooks registered on it with
``register_step_pre_hook``/``register_step_post_hook`` move to it; its lr scheduler is rebound.

Example (two CPU processes)::

    torchrun --standalone --nproc_per_node 2 train.py   # with EngineConfig(strategy="zero")
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from mlopt.errors import ConfigError

__all__ = [
    "ShardedOptimizer",
    "check_state_hooks",
    "keep_whole_reason",
    "move_step_hooks",
    "shard_optimizers",
    "swap_optimizer",
    "undo_all",
]


class ShardedOptimizer(ZeroRedundancyOptimizer):
    """A ``ZeroRedundancyOptimizer`` whose ``state_dict()`` is the full state on every rank.

    ``state_dict()`` is a collective (every rank calls it at the same point of the program, as
    checkpoints and DARTS's roll-back snapshots do): the shards are consolidated on rank 0 and
    broadcast, so any rank can restore any snapshot. The format is that of the wrapped optimizer
    class, so a checkpoint written under ``zero`` resumes under ``ddp`` and the other way round.
    """

    @classmethod
    def like(cls, optimizer: torch.optim.Optimizer) -> ShardedOptimizer:
        """The sharded twin of ``optimizer``: same class, param groups and state."""
        groups = [dict(g) for g in optimizer.param_groups]
        out = cls(groups, optimizer_class=type(optimizer), **optimizer.defaults)
        if optimizer.state:
            out.load_state_dict(optimizer.state_dict())
        return out

    @property
    def kind(self) -> str:
        """The wrapped optimizer class's name (what a checkpoint records)."""
        return type(self.optim).__name__

    def state_dict(self) -> dict[str, Any]:
        """The full optimizer state, on every rank (a collective)."""
        self.consolidate_state_dict(to=0)
        box = [super().state_dict() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's share of a full state (``state_dict`` is not modified).

        As ``torch.optim.Optimizer.load_state_dict`` does, the state is replaced: a parameter
        without state in ``state_dict`` has none afterwards (ZeRO alone would keep its own).
        """
        self.optim.state.clear()
        super().load_state_dict(copy.deepcopy(state_dict))


def keep_whole_reason(pp: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the optimizer of the problem planned as ``pp`` cannot be sharded, or None."""
    if pp.dopt is not None:
        return (
            "its updates are a differentiable unroll (or forward mode): its optimizer state is "
            "functional, per window"
        )
    if pp.keeps_gradient:
        return "SAMA's correction reads the whole lower optimizer (its class, groups and state)"
    return None


# torch keeps an optimizer's hooks in these (private) dicts; its public API registers hooks but
# cannot list them, so they are read here, once, to move them to the replacement
_STEP_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
_STATE_HOOKS = (
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def check_state_hooks(optimizer: torch.optim.Optimizer, name: str, strategy: str = "zero") -> None:
    """Refuse an optimizer with ``state_dict`` hooks (they cannot move to its replacement)."""
    if any(getattr(optimizer, attr, None) for attr in _STATE_HOOKS):
        raise ConfigError(
            f"problem {name!r}: its optimizer has state_dict hooks, which strategy={strategy!r} "
            "cannot carry to the sharded optimizer; remove them or use strategy='ddp'"
        )


def move_step_hooks(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Register the step pre/post hooks of ``old`` on ``new``."""
    for attr, register in zip(
        _STEP_HOOKS, (new.register_step_pre_hook, new.register_step_post_hook)
    ):
        for hook in list(getattr(old, attr, {}).values()):
            register(hook)


def shard_optimizers(
    plans: Mapping[str, Any], states: Mapping[str, Any], problems: Mapping[str, Any]
) -> tuple[dict[str, str], Callable[[], None]]:
    """Replace each shardable problem's optimizer by its :class:`ShardedOptimizer`.

    Returns, per problem with an optimizer, ``"zero"`` or the reason it stays whole, and a
    function that puts the original optimizers back (the undo of a failed Engine construction).

    Raises:
        ConfigError: no problem can be sharded (``strategy="zero"`` would change nothing), or an
            optimizer carries hooks that cannot move.
    """
    decisions: dict[str, str] = {}
    for name, st in states.items():
        if st.optimizer is None:
            continue
        reason = keep_whole_reason(plans[name], st.optimizer)
        if reason is not None:
            decisions[name] = f"whole: {reason}"
            continue
        check_state_hooks(st.optimizer, name)
        decisions[name] = "zero"
    if "zero" not in decisions.values():
        raise ConfigError(
            "EngineConfig(strategy='zero'): no problem's optimizer can be sharded ("
            + "; ".join(f"{n}: {d}" for n, d in decisions.items())
            + "); use strategy='ddp'"
        )
    undo: list[Callable[[], None]] = []
    for name, decision in decisions.items():
        if decision != "zero":
            continue
        st, problem = states[name], problems[name]
        undo.append(swap_optimizer(st, problem, ShardedOptimizer.like(st.optimizer)))
    return decisions, functools.partial(undo_all, undo)


def swap_optimizer(st: Any, problem: Any, new: torch.optim.Optimizer) -> Callable[[], None]:
    """Make ``new`` the optimizer of the problem (its state ``st`` and the ``problem`` object):
    the old one's step hooks move to it and an lr scheduler of the old one is rebound. Returns
    the function that puts the old optimizer back."""
    old = st.optimizer
    move_step_hooks(old, new)
    st.optimizer = problem.optimizer = new
    rebind = st.scheduler is not None and getattr(st.scheduler, "optimizer", None) is old
    if rebind:
        st.scheduler.optimizer = new
    return functools.partial(_put_back, st, problem, old, rebind)


def undo_all(undo: list[Callable[[], None]]) -> None:
    """Call every function of ``undo`` (the put-backs of :func:`swap_optimizer`)."""
    for f in undo:
        f()


def _put_back(st: Any, problem: Any, old: torch.optim.Optimizer, rebind: bool) -> None:
    st.optimizer = problem.optimizer = old
    if rebind:
        st.scheduler.optimizer = old
