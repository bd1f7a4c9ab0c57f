"""A problem's data stream: an endless walk over its loader with an exact, checkpointable position.

The position is saved as (epoch, batches drawn in it) plus what decides the epoch's order: the
global torch generator when the epoch's iterator was created, and the loader's own
``generator=`` (and its sampler's) when it has one. Resuming recreates the epoch's iterator under
those states and skips the drawn batches. A loader with its own ``state_dict()`` (torchdata's
``StatefulDataLoader``) saves and restores its epoch itself; its own generators are saved as
they are at the save, so that the following epochs are drawn exactly as well.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> stream = DataStream(DataLoader(list(range(6)), batch_size=2, shuffle=True))
    >>> _ = stream.next()
    >>> saved = stream.state_dict()
    >>> following = stream.next()
    >>> resumed = DataStream(DataLoader(list(range(6)), batch_size=2, shuffle=True))
    >>> resumed.load_state_dict(saved)
    >>> bool(torch.equal(resumed.next(), following))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mlopt.errors import ConfigError

__all__ = ["DataStream"]


def _generators(loader: Any) -> list[torch.Generator]:
    """The loader's own generators (DataLoader(generator=...), its sampler's), deduplicated."""
    out: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    g = getattr(inner, "generator", None)
    if isinstance(g, torch.Generator) and all(g is not h for h in out):
        out.append(g)
    return out


def _stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


class DataStream:
    """Batches of ``loader`` forever (restarted when exhausted), with a resumable position.

    Args:
        loader: any iterable of batches, or None (every batch is None).
        owner: the problem's name, for error messages.
    """

    def __init__(self, loader: Iterable | None, owner: str = "?") -> None:
        self.loader = loader
        self.owner = owner
        self.epoch = 0
        self.position = 0
        self._iter: Iterator | None = None
        self._iter_rng: torch.Tensor | None = None
        self._iter_gens: list[torch.Tensor] | None = None

    def next(self) -> Any:
        """The next batch, starting a new epoch when the loader is exhausted."""
        if self.loader is None:
            return None
        for attempt in range(2):
            if self._iter is None:
                self._iter_rng = torch.get_rng_state()
                self._iter_gens = [g.get_state() for g in _generators(self.loader)]
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
                self.position += 1
                return batch
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.position = 0
                if attempt == 1:
                    break
        raise ConfigError(f"problem {self.owner!r}: train_data_loader yielded no batch")

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and the generator states that decided the epoch's order."""
        out: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        if _stateful(self.loader):
            # this stream's own iterator when it is stateful (torchdata's are: the loader's
            # state_dict() describes its latest iterator, which may be another stream's, e.g.
            # BDA's over the upper's loader); None between epochs
            source = self._iter if _stateful(self._iter) else self.loader
            out["loader"] = None if self._iter is None else source.state_dict()
            # the loader restores its epoch's order from the generator state at the epoch's start;
            # the later epochs need the generators as they are now
            out["generators"] = [g.get_state() for g in _generators(self.loader)]
        else:
            out["rng"] = self._iter_rng
            out["generators"] = self._iter_gens
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Recreate the iterator at the saved position (exact for seeded iteration)."""
        self.epoch, self._iter, self.position = state["epoch"], None, 0
        if self.loader is None:
            return
        if "loader" in state:
            self.position = state["position"]
            if state["loader"] is not None:
                self.loader.load_state_dict(state["loader"])
                self._iter = iter(self.loader)  # (restores the epoch, moving its generators)
            for g, s in zip(_generators(self.loader), state.get("generators") or []):
                g.set_state(s)
            return
        if state.get("rng") is None:
            return
        gens = _generators(self.loader)
        saved = torch.get_rng_state()
        torch.set_rng_state(state["rng"])
        self._iter_rng = state["rng"]
        self._iter_gens = state.get("generators") or []
        for g, s in zip(gens, self._iter_gens):
            g.set_state(s)
        try:  # replay under the saved state: samplers draw their seed lazily, at the first next()
            self._iter = iter(self.loader)
            for _ in range(state["position"]):
                next(self._iter)
                self.position += 1
        finally:
            torch.set_rng_state(saved)
