"""The user's level of a multilevel program.

Subclass :class:`Problem`, write ``training_step(batch)``, and give it a module, an optimizer and a
data loader. Inside ``training_step``, ``self.module(x)`` and ``self(x)`` run with the problem's
CURRENT parameters (the differentiable fast weights of an unroll), and ``self.<name>`` is another
problem of the program. The maths lives in ``mlopt.hypergrad``; this class only wires.

Example:
    >>> import torch, mlopt
    >>> class Inner(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         x, y = batch
    ...         return torch.nn.functional.mse_loss(self(x), y)
    >>> net = torch.nn.Linear(3, 1)
    >>> inner = Inner("inner", net, torch.optim.SGD(net.parameters(), lr=0.1),
    ...               train_data_loader=[(torch.randn(4, 3), torch.randn(4, 1))])
    >>> inner.name
    'inner'
"""

from __future__ import annotations

import contextlib
import keyword
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mlopt.config import Config
from mlopt.errors import ConfigError, MLOptError
from mlopt.functional import ModuleView
from mlopt.migration import BETTY_HOOKS, betty_hook_error
from mlopt.runtime.state import ProblemState

__all__ = ["Problem", "problem_state", "bind", "unbind"]

Vec = tuple[torch.Tensor, ...]
# set on every Problem in __init__ (a problem of this name could not be reached as self.<name>)
_INSTANCE_ATTRIBUTES = frozenset({"name", "config", "optimizer", "scheduler", "train_data_loader"})


class Problem:
    """One level of a multilevel program.

    Args:
        name: unique name; other problems reach this one as ``self.<name>``.
        module: the ``nn.Module`` whose parameters this problem optimizes (None: no parameters).
        optimizer: the user's own ``torch.optim`` optimizer over ``module``'s parameters. It is
            never rebuilt: param groups, state and schedulers keep working (except under
            ``EngineConfig(strategy="zero")``, where it is replaced by its sharded twin with the
            same class, groups, state and step hooks: see :mod:`mlopt.sharding`).
        train_data_loader: any iterable of batches, restarted when exhausted (None: ``batch=None``).
        config: a :class:`~mlopt.Config` (None: ``Config()``).
        scheduler: an optional learning-rate scheduler, stepped after each optimizer update.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_data_loader: Iterable | None = None,
        config: Config | None = None,
        scheduler: Any = None,
    ) -> None:
        _check_name(name)
        d = self.__dict__
        d["name"] = name
        for hook in BETTY_HOOKS:
            if callable(getattr(type(self), hook, None)):
                raise betty_hook_error(name, hook)
        module, optimizer, scheduler, train_data_loader = self._configured(
            module, optimizer, scheduler, train_data_loader
        )
        _check_loader(name, train_data_loader)
        _check_scheduler(name, scheduler)
        if module is not None and not isinstance(module, nn.Module):
            swapped = (
                " (mlopt's order is Problem(name, module, optimizer, train_data_loader, "
                "config, scheduler); Betty's starts with config: pass config=... by keyword)"
            )
            raise ConfigError(
                f"problem {name!r}: module must be a torch.nn.Module, got {type(module)}"
                + (swapped if isinstance(module, Config) else "")
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"problem {name!r}: optimizer must be a torch.optim.Optimizer, "
                f"got {type(optimizer)}"
            )
        config = Config() if config is None else config
        if not isinstance(config, Config):
            raise ConfigError(
                f"problem {name!r}: config must be a mlopt.Config, got {type(config)}"
            )
        d["config"] = config
        d["optimizer"] = optimizer
        d["scheduler"] = scheduler
        d["train_data_loader"] = train_data_loader
        d["_module"] = module
        d["_engine"] = None
        d["_state"] = ProblemState(name, module, optimizer, scheduler, train_data_loader)
        d["_view"] = ModuleView(module, self._visible) if module is not None else None

    def _configured(self, module: Any, optimizer: Any, scheduler: Any, loader: Any) -> tuple:
        """What was not passed, from Betty's ``configure_*`` hooks, called in Betty's order
        (loader, module, optimizer, scheduler) with ``self.module`` and ``self.optimizer`` set."""
        d, cls = self.__dict__, type(self)
        if loader is None and callable(getattr(cls, "configure_train_data_loader", None)):
            loader = self.configure_train_data_loader()
        if module is None and callable(getattr(cls, "configure_module", None)):
            module = self.configure_module()
        d["_view"] = ModuleView(module, lambda: None) if isinstance(module, nn.Module) else None
        if optimizer is None and callable(getattr(cls, "configure_optimizer", None)):
            optimizer = self.configure_optimizer()
        d["optimizer"] = optimizer
        if scheduler is None and callable(getattr(cls, "configure_scheduler", None)):
            scheduler = self.configure_scheduler()
        return module, optimizer, scheduler, loader

    # ------------------------------------------------------------------ user API
    def training_step(self, batch: Any) -> torch.Tensor | dict:
        """The problem's loss on ``batch``: a scalar tensor, or a dict with ``"loss"`` and metrics.

        Override this in a subclass.
        """
        raise MLOptError(
            f"problem {self.name!r}: subclass mlopt.Problem and override training_step(batch)"
        )

    def on_inner_loop_start(self) -> None:
        """Hook called at the start of each unroll window, before its first update."""

    def learning_rates(self) -> list[Any] | None:
        """Learning rates for a differentiable unroll, one per parameter tensor (None: the
        optimizer's own). Override to use learned rates, e.g. Meta-SGD's per-element tensors
        held by an upper problem: ``return list(self.outer.module.lrs)``. Entries may be
        floats, tensors of the parameter's shape, or None (keep the group's rate)."""
        return None

    @property
    def module(self) -> ModuleView | None:
        """The module, run with the problem's current parameters."""
        return self._view

    @property
    def batch(self) -> Any:
        """The batch of the latest update (the current task, with ``resample="window"``)."""
        return self._batch

    @property
    def engine(self) -> Any:
        """The :class:`~mlopt.Engine` running this problem (None before one is built)."""
        return self._engine

    def parameters(self) -> Vec:
        """The problem's current trainable parameters (fast weights during an unroll)."""
        return self._current()

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """The current trainable parameters by name."""
        return dict(zip(self._names, self._current()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """What ``problem(...)`` computes: the module with the current parameters. Override it
        (as in Betty) to compute something else; ``self.module(...)`` stays the module."""
        if self._view is None:
            raise MLOptError(f"problem {self.name!r} has no module to call")
        return self._view(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __getattr__(self, item: str) -> Any:
        engine = self.__dict__.get("_engine")
        if engine is not None and not item.startswith("_"):
            other = engine.problems_by_name.get(item)
            if other is not None:
                return other
        raise AttributeError(
            f"{type(self).__name__} {self.__dict__.get('name')!r} has no attribute {item!r}"
            + ("" if engine is None else f"; problems are {sorted(engine.problems_by_name)}")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config!r})"

    # ------------------------------------------------------------------ parameters
    # (the state lives in the problem's ProblemState; these delegate for the module view)
    @property
    def _names(self) -> list[str]:
        return self._state.names

    @property
    def _fast(self) -> Vec | None:
        return self._state.fast

    @property
    def _batch(self) -> Any:
        return self._state.batch

    def _leaves(self) -> list[nn.Parameter]:
        return self._state.leaves()

    def _current(self) -> Vec:
        return self._state.current()

    def _visible(self) -> dict[str, torch.Tensor] | None:
        engine = self._engine
        if engine is not None:
            exposed = engine._exposed_params(self)
            if exposed is not None:
                return dict(zip(self._names, exposed))
        if self._fast is None:
            return None
        return dict(zip(self._names, self._fast))

    def _using(self, params: Vec | None) -> contextlib.AbstractContextManager:
        """Temporarily run with ``params`` as the current parameters."""
        return self._state.using(params)

    def _set_fast(self, params: Vec | None) -> None:
        self._state.set_fast(params)

    def _commit(self) -> None:
        """Write the fast weights into the module's parameters and drop the graph."""
        self._state.commit()


def _check_name(name: Any) -> None:
    """A problem's name is an identifier that shadows nothing (it is reached as self.<name>)."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(
            f"problem name must be a Python identifier (it is used as self.<name>), got {name!r}"
        )
    if name.startswith("_") or hasattr(Problem, name) or name in _INSTANCE_ATTRIBUTES:
        raise ConfigError(
            f"problem name {name!r} would shadow "
            + ("a private attribute" if name.startswith("_") else f"Problem.{name}")
            + " (other problems reach this one as self.<name>); choose another name, "
            f"e.g. {name.strip('_') + '_problem'!r}"
        )


def _check_loader(name: str, loader: Any) -> None:
    """A loader must be re-iterable: it is restarted at every epoch."""
    if loader is None:
        return
    if not hasattr(loader, "__iter__"):
        raise ConfigError(
            f"problem {name!r}: train_data_loader must be an iterable of batches (a DataLoader, "
            f"a list ...), got {type(loader).__name__}"
        )
    if iter(loader) is loader:
        raise ConfigError(
            f"problem {name!r}: train_data_loader is a one-shot iterator "
            f"({type(loader).__name__}); it would run dry after one epoch and cannot be resumed. "
            "Pass a re-iterable (a DataLoader, a list, or a class whose __iter__ starts again)"
        )


def _check_scheduler(name: str, scheduler: Any) -> None:
    """A scheduler must step and checkpoint like torch's."""
    if scheduler is None:
        return
    missing = [
        m
        for m in ("step", "state_dict", "load_state_dict")
        if not callable(getattr(scheduler, m, None))
    ]
    if missing:
        raise ConfigError(
            f"problem {name!r}: scheduler {type(scheduler).__name__} lacks {missing}; pass a "
            "torch.optim.lr_scheduler object (step(), state_dict(), load_state_dict())"
        )


def problem_state(problem: Problem) -> ProblemState:
    """The :class:`~mlopt.runtime.state.ProblemState` holding ``problem``'s mutable state."""
    return problem._state


def unbind(problem: Problem, engine: Any) -> None:
    """Detach ``problem`` from ``engine`` (an Engine whose construction failed)."""
    if problem.__dict__["_engine"] is engine:
        problem.__dict__["_engine"] = None


def bind(problem: Problem, engine: Any, *, check_only: bool = False) -> None:
    """Attach ``problem`` to ``engine`` (``self.<name>`` then finds the engine's problems).

    Raises:
        ConfigError: the problem already belongs to another Engine.
    """
    current = problem.__dict__["_engine"]
    if current is not None and current is not engine:
        raise ConfigError(
            f"problem {problem.name!r} already belongs to another Engine; build a new Problem "
            "(with its own module and optimizer) for each Engine"
        )
    if not check_only:
        problem.__dict__["_engine"] = engine
