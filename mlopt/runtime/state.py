"""The run's mutable state: one :class:`ProblemState` per problem and one :class:`RunState`.

Everything that changes while a program trains lives here and nowhere else: a problem's fast
weights, its functional optimizer state, its unroll window (batches, start snapshot, method
memory, open checkpoint segment), its data position, its counters, its loss scaler and method
extras (BDA's stream over the upper's data). Both objects follow torch's Stateful protocol
(``state_dict()`` / ``load_state_dict()``); a checkpoint is exactly these objects.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> st = ProblemState("p", net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> st.steps, st.updates, sorted(st.state_dict())[:3]
    (0, 0, ['accumulated', 'data', 'extras'])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mlopt.runtime.data import DataStream

__all__ = ["ProblemState", "RunState", "REQUIRED_KEYS"]

Vec = tuple[torch.Tensor, ...]
_COUNTERS = ("window_count", "steps", "updates", "accumulated")
REQUIRED_KEYS = (*_COUNTERS, "ready", "data")  # in every ProblemState.state_dict()


class ProblemState:
    """All mutable state of one problem.

    Attributes:
        fast: differentiable parameters of the current unroll (None: the module's own).
        batch: the batch of the latest update.
        data: the problem's :class:`~mlopt.runtime.data.DataStream`.
        opt_state: functional optimizer state inside a differentiable unroll.
        memory: what the method tracks over a window (forward mode's tangents).
        before: parameters before the latest update (DARTS).
        window_batches: the batches of the current window (roll-back replays them).
        snapshot: parameters, optimizer state and accumulation at the window start (roll-back).
        segment: the open segment of ``Reverse(checkpoint=k)``.
        opened: whether the current window has been opened.
        window_count: updates in the current window; steps: updates ever booked;
        updates: optimizer updates taken; accumulated: gradients accumulated since the last one.
        ready: for each lower, whether it finished a window since this problem last stepped.
        last_loss, metrics: what the latest ``training_step`` returned.
        scaler: the fp16 ``GradScaler`` of the problem's optimizer, or None.
        extras: method extras by name; values with ``state_dict()`` are checkpointed through it.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        loader: Any = None,
    ) -> None:
        self.name = name
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.names: list[str] = (
            [n for n, q in module.named_parameters() if q.requires_grad] if module else []
        )
        self.fast: Vec | None = None
        self.batch: Any = None
        self.data = DataStream(loader, name)
        self.opt_state: Any = None
        self.memory: Any = None
        self.before: Vec | None = None
        self.last_grad: Vec | None = None  # the last update's gradient (SAMA)
        self.per_task: bool | None = None  # its hook restarts it: one batch per window
        self.window_batches: list = []
        self.snapshot: dict | None = None
        self.segment: Any = None
        self.opened = False
        self.window_count = self.steps = self.updates = self.accumulated = 0
        self.ready: dict[str, bool] = {}
        self.last_loss: torch.Tensor | None = None
        self.metrics: dict[str, Any] = {}
        self.scaler: torch.amp.GradScaler | None = None
        self.extras: dict[str, Any] = {}
        self._saved_extras: dict[str, Any] = {}

    # ------------------------------------------------------------------ parameters
    def leaves(self) -> list[torch.nn.Parameter]:
        """The module's trainable parameters that this problem optimizes, in a fixed order."""
        if self.module is None:
            return []
        params = dict(self.module.named_parameters())
        return [params[n] for n in self.names]

    def current(self) -> Vec:
        """The current parameters: the fast weights of an unroll, else the leaves."""
        return tuple(self.fast) if self.fast is not None else tuple(self.leaves())

    def set_fast(self, params: Vec | None) -> None:
        """Make ``params`` the current parameters (None: the module's own)."""
        self.fast = None if params is None else tuple(params)

    @contextlib.contextmanager
    def using(self, params: Vec | None) -> Iterator[None]:
        """Temporarily run with ``params`` as the current parameters."""
        saved = self.fast
        self.set_fast(params)
        try:
            yield
        finally:
            self.fast = saved

    @torch.no_grad()
    def commit(self) -> None:
        """Write the fast weights into the module's parameters and drop the graph."""
        if self.fast is None:
            return
        for leaf, value in zip(self.leaves(), self.fast):
            if value is not leaf:
                leaf.copy_(value)
        self.fast = None

    def learning_rates(self) -> tuple[float, ...]:
        """The optimizer's current learning rate of each parameter tensor."""
        if self.optimizer is None:
            return ()
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return tuple(float(lr_of.get(id(p), 0.0)) for p in self.leaves())

    def restrict_to_optimizer(self) -> None:
        """Keep only the trainable module parameters that the optimizer updates."""
        if self.optimizer is None or self.module is None:
            return
        in_opt = {id(q) for g in self.optimizer.param_groups for q in g["params"]}
        self.names = [
            n for n, q in self.module.named_parameters() if q.requires_grad and id(q) in in_opt
        ]

    def reset_window(self) -> None:
        """Forget the transient state of an unroll window (after a restore)."""
        self.fast, self.opt_state, self.opened, self.segment = None, None, False, None

    def state_dict(self) -> dict[str, Any]:
        """Module, optimizer, scheduler, scaler, data position, counters and extras."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _COUNTERS}
        out["ready"] = dict(self.ready)
        out["data"] = self.data.state_dict()
        if self.module is not None:
            out["module"] = self.module.state_dict()
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None and hasattr(self.scheduler, "state_dict"):
            out["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        out["extras"] = {
            k: v.state_dict() for k, v in self.extras.items() if hasattr(v, "state_dict")
        }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the window restarts empty)."""
        self.reset_window()
        if self.module is not None:
            self.module.load_state_dict(state["module"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(state["data"])
        for k in _COUNTERS:
            setattr(self, k, int(state[k]))
        self.ready.update({k: bool(v) for k, v in state["ready"].items()})
        self._saved_extras = dict(state.get("extras", {}))
        for k in list(self._saved_extras):
            if k in self.extras:
                self.extras[k].load_state_dict(self._saved_extras.pop(k))

    def restorer(self) -> Callable[[], None]:
        """A function that puts this state back as it is now (the undo of a failed load)."""
        saved = copy.deepcopy(self.state_dict())
        window = (self.fast, self.opt_state, self.opened, self.segment)
        ready, pending = dict(self.ready), dict(self._saved_extras)

        def undo() -> None:
            self.load_state_dict(saved)
            self.fast, self.opt_state, self.opened, self.segment = window
            self.ready.clear()
            self.ready.update(ready)
            self._saved_extras = pending

        return undo

    def extra(self, key: str, factory: Any) -> Any:
        """The method extra ``key``, created by ``factory()`` on first use; an extra saved in
        the checkpoint being resumed is restored into it then (extras are created lazily)."""
        if key not in self.extras:
            self.extras[key] = factory()
            if key in self._saved_extras:
                self.extras[key].load_state_dict(self._saved_extras.pop(key))
        return self.extras[key]


@dataclass
class RunState:
    """The run's own counters: iteration, early stopping, validation history.

    Example:
        >>> run = RunState(best_metric=float("inf"))
        >>> run.iteration += 1
        >>> RunState(best_metric=0.0).load_state_dict(run.state_dict()) is None
        True
    """

    best_metric: float
    iteration: int = 0
    bad_validations: int = 0
    stopped: bool = False
    history: list[dict] = field(default_factory=list)
    pending_best: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Plain values only."""
        return {
            "iteration": self.iteration,
            "best_metric": float(self.best_metric),
            "bad_validations": self.bad_validations,
            "stopped": self.stopped,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.iteration = int(state["iteration"])
        self.best_metric = state["best_metric"]
        self.bad_validations = int(state["bad_validations"])
        self.stopped = bool(state["stopped"])
        self.history = list(state["history"])
