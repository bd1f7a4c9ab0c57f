"""Checkpoints: exact resume, atomic writes, safe loading (``torch.load(weights_only=True)``).

A checkpoint holds every module, optimizer and scheduler state, the schedule's counters, each data
loader's position and the random generators, so a resumed run continues as if never stopped.
Checkpoints are written only between unroll windows of differentiable problems (a pending save waits
for the next boundary), and never with non-finite parameters.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
    >>> atomic_save({"a": 1}, path)
    >>> safe_load(path)
    {'a': 1}
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.step import all_finite

if TYPE_CHECKING:
    from mlopt.engine import Engine

__all__ = [
    "atomic_save",
    "safe_load",
    "engine_state",
    "load_engine_state",
    "save",
    "load",
    "at_boundary",
    "rng_state",
    "set_rng_state",
]

_FORMAT = 1


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint without running code from it (``weights_only=True``).

    Raises:
        ConfigError: the file holds objects other than tensors and plain Python values.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"refusing to load {path!r}: it holds objects other than tensors and plain values "
            f"(weights_only loading; nothing in it was run). Details: {str(err).splitlines()[0]}"
        ) from err


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain values and tensors."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def at_boundary(engine: Engine) -> bool:
    """Whether no problem is inside an unroll window or between gradient-accumulation steps."""
    return not _busy(engine)


def _busy(engine: Engine) -> list[str]:
    """Problems with transient state a checkpoint cannot hold: inside an unroll window (graph,
    task batch, meta-initialization, method memory) or between gradient-accumulation steps."""
    st = engine.stepper
    return [
        n
        for n in st.problems
        if (st.uppers[n] and st.scheduler.window_count[n]) or st.accumulated[n]
    ]


def engine_state(engine: Engine) -> dict:
    """The engine's full state (tensors and plain values only)."""
    st = engine.stepper
    if not at_boundary(engine):
        raise ConfigError(
            f"cannot checkpoint in the middle of an unroll window or a gradient accumulation of "
            f"{_busy(engine)}; checkpoint between windows (Engine.run() waits for one)"
        )
    st.sync_modules()
    problems = {}
    for name, p in engine.problems_by_name.items():
        entry: dict[str, Any] = {"data": p._data_state()}
        if p._module is not None:
            entry["module"] = p._module.state_dict()
        if p.optimizer is not None:
            entry["optimizer"] = p.optimizer.state_dict()
        if p.scheduler is not None and hasattr(p.scheduler, "state_dict"):
            entry["scheduler"] = p.scheduler.state_dict()
        if name in st.scalers:
            entry["scaler"] = st.scalers[name].state_dict()
        problems[name] = entry
    return {
        "format": _FORMAT,
        "iteration": engine.iteration,
        "best_metric": float(engine.best_metric),
        "bad_validations": engine.bad_validations,
        "stopped": engine.stopped,
        "history": engine.history,
        "schedule": st.scheduler.state_dict(),
        "accumulated": dict(st.accumulated),
        "updates": dict(st.updates),
        "problems": problems,
        "rng": rng_state(),
    }


def load_engine_state(engine: Engine, state: dict) -> None:
    """Restore an engine from :func:`engine_state`'s output."""
    if state.get("format") != _FORMAT:
        raise ConfigError(f"unsupported checkpoint format {state.get('format')!r}")
    missing = set(engine.problems_by_name) - set(state["problems"])
    if missing:
        raise ConfigError(f"checkpoint has no state for problems {sorted(missing)}")
    st = engine.stepper
    for name, p in engine.problems_by_name.items():
        entry = state["problems"][name]
        p._set_fast(None)
        if p._module is not None:
            p._module.load_state_dict(entry["module"])
        if p.optimizer is not None:
            p.optimizer.load_state_dict(entry["optimizer"])
        if p.scheduler is not None and "scheduler" in entry:
            p.scheduler.load_state_dict(entry["scheduler"])
        if name in st.scalers and "scaler" in entry:
            st.scalers[name].load_state_dict(entry["scaler"])
        p._load_data_state(entry["data"])
        st.opt_state[name] = None
        st.opened[name] = False
    engine.iteration = state["iteration"]
    engine.best_metric = state["best_metric"]
    engine.bad_validations = state["bad_validations"]
    engine.stopped = state["stopped"]
    engine.history = list(state["history"])
    st.scheduler.load_state_dict(state["schedule"])
    st.accumulated.update(state["accumulated"])
    st.updates.update(state["updates"])
    set_rng_state(state["rng"])


def save(engine: Engine, name: str | None = None) -> str | None:
    """Write ``iter_<iteration, 8 digits>.pt`` (or ``name``) and ``last.pt`` into the folder."""
    folder = engine.config.checkpoint_dir
    if folder is None:
        raise ConfigError("save_checkpoint needs EngineConfig(checkpoint_dir=...)")
    state = engine_state(engine)
    params = [
        t
        for p in engine.problems_by_name.values()
        if p._module is not None
        for t in p._module.parameters()
    ]
    if not all_finite([t.detach() for t in params]):
        raise HypergradientError(
            f"iteration {engine.iteration}: refusing to write a checkpoint with non-finite "
            "parameters; the previous checkpoint is kept"
        )
    dist = engine.distributed
    path = os.path.join(folder, name or f"iter_{engine.iteration:08d}.pt")
    if dist is None or dist.rank == 0:
        atomic_save(state, path)
        if name is None:
            atomic_save(state, os.path.join(folder, "last.pt"))
    if dist is not None:
        dist.barrier()
    return path


def load(engine: Engine, path: str | bool) -> None:
    """Resume ``engine`` from ``path`` or, for True, from ``checkpoint_dir/last.pt``."""
    if path is True:
        path = os.path.join(engine.config.checkpoint_dir, "last.pt")
    if not os.path.exists(path):
        raise ConfigError(f"resume: checkpoint {path!r} does not exist")
    load_engine_state(engine, safe_load(path, map_location=engine.device))
