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
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mlopt.config import Config
from mlopt.errors import ConfigError, MLOptError
from mlopt.functional import ModuleView, trainable_parameters

__all__ = ["Problem"]

Vec = tuple[torch.Tensor, ...]


class Problem:
    """One level of a multilevel program.

    Args:
        name: unique name; other problems reach this one as ``self.<name>``.
        module: the ``nn.Module`` whose parameters this problem optimizes (None: no parameters).
        optimizer: the user's own ``torch.optim`` optimizer over ``module``'s parameters. It is
            never rebuilt: param groups, state and schedulers keep working.
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
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(
                "problem name must be a Python identifier (it is used as self.<name>), "
                f"got {name!r}"
            )
        if module is not None and not isinstance(module, nn.Module):
            raise ConfigError(
                f"problem {name!r}: module must be a torch.nn.Module, got {type(module)}"
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
        d = self.__dict__
        d["name"] = name
        d["config"] = config
        d["optimizer"] = optimizer
        d["scheduler"] = scheduler
        d["train_data_loader"] = train_data_loader
        d["_module"] = module
        d["_engine"] = None
        d["_names"] = [n for n, _ in trainable_parameters(module)] if module is not None else []
        d["_fast"] = None  # differentiable parameters of an unroll window, or None
        d["_batch"] = None
        d["_iter"] = None
        d["_epoch"] = 0
        d["_position"] = 0
        d["_iter_rng"] = None
        d["_view"] = ModuleView(module, self._visible) if module is not None else None

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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._view is None:
            raise MLOptError(f"problem {self.name!r} has no module to call")
        return self._view(*args, **kwargs)

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
    def _leaves(self) -> list[nn.Parameter]:
        if self._module is None:
            return []
        params = dict(self._module.named_parameters())
        return [params[n] for n in self._names]

    def _current(self) -> Vec:
        return tuple(self._fast) if self._fast is not None else tuple(self._leaves())

    def _visible(self) -> dict[str, torch.Tensor] | None:
        engine = self._engine
        if engine is not None:
            exposed = engine._exposed_params(self)
            if exposed is not None:
                return dict(zip(self._names, exposed))
        if self._fast is None:
            return None
        return dict(zip(self._names, self._fast))

    @contextlib.contextmanager
    def _using(self, params: Vec | None) -> Iterator[None]:
        """Temporarily run with ``params`` as the current parameters."""
        saved = self._fast
        self.__dict__["_fast"] = None if params is None else tuple(params)
        try:
            yield
        finally:
            self.__dict__["_fast"] = saved

    def _set_fast(self, params: Vec | None) -> None:
        self.__dict__["_fast"] = None if params is None else tuple(params)

    @torch.no_grad()
    def _commit(self) -> None:
        """Write the fast weights into the module's parameters and drop the graph."""
        if self._fast is None:
            return
        for leaf, value in zip(self._leaves(), self._fast):
            if value is not leaf:
                leaf.copy_(value)
        self.__dict__["_fast"] = None

    # ------------------------------------------------------------------ data
    def _next_batch(self, rank: int = 0, world: int = 1) -> Any:
        """The next batch (rank's shard under data parallelism), restarting the loader when done."""
        if self.train_data_loader is None:
            self.__dict__["_batch"] = None
            return None
        batch = None
        for i in range(world):  # every rank walks the same stream and keeps its own share
            drawn = self._draw()
            if i == rank:
                batch = drawn
        self.__dict__["_batch"] = batch
        return batch

    def _draw(self) -> Any:
        d = self.__dict__
        for attempt in range(2):
            if d["_iter"] is None:
                d["_iter_rng"] = torch.get_rng_state()
                d["_iter"] = iter(self.train_data_loader)
            try:
                batch = next(d["_iter"])
                d["_position"] += 1
                return batch
            except StopIteration:
                d["_iter"] = None
                d["_epoch"] += 1
                d["_position"] = 0
                if attempt == 1:
                    break
        raise ConfigError(f"problem {self.name!r}: train_data_loader yielded no batch")

    def _data_state(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "rng": self._iter_rng}

    def _load_data_state(self, state: dict) -> None:
        """Recreate the loader's iterator at the saved position (exact for seeded iteration)."""
        d = self.__dict__
        d["_epoch"], d["_iter"], d["_position"] = state["epoch"], None, 0
        if self.train_data_loader is None or state["rng"] is None:
            return
        saved = torch.get_rng_state()
        torch.set_rng_state(state["rng"])
        d["_iter_rng"] = state["rng"]
        try:  # replay under the saved state: samplers draw their seed lazily, at the first next()
            d["_iter"] = iter(self.train_data_loader)
            for _ in range(state["position"]):
                next(d["_iter"])
                d["_position"] += 1
        finally:
            torch.set_rng_state(saved)
