"""Checkpoints: exact resume, atomic writes, safe loading (``torch.load(weights_only=True)``).

A checkpoint is exactly the program's state objects: each problem's
:class:`~mlopt.runtime.state.ProblemState` (module, optimizer, scheduler, scaler, counters, data
position, method extras), the :class:`~mlopt.runtime.state.RunState` and the random generators,
so a resumed run continues as if never stopped. Checkpoints are written only between unroll
windows of differentiable problems (a pending save waits for the next boundary), and never with
non-finite parameters.

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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.step import all_finite

if TYPE_CHECKING:
    from mlopt.runtime.plan import Plan
    from mlopt.runtime.state import ProblemState, RunState

__all__ = [
    "atomic_save",
    "safe_load",
    "program_state",
    "load_program_state",
    "save",
    "resolve",
    "at_boundary",
    "busy",
    "rng_state",
    "set_rng_state",
]

_FORMAT = 2


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


def busy(plan: Plan, states: Mapping[str, ProblemState]) -> list[str]:
    """Problems with transient state a checkpoint cannot hold: inside an unroll window (graph,
    task batch, meta-initialization, method memory) or between gradient-accumulation steps."""
    return [
        n
        for n, st in states.items()
        if (plan.problems[n].uppers and st.window_count) or st.accumulated
    ]


def at_boundary(plan: Plan, states: Mapping[str, ProblemState]) -> bool:
    """Whether no problem is inside an unroll window or between gradient-accumulation steps."""
    return not busy(plan, states)


def program_state(plan: Plan, states: Mapping[str, ProblemState], run: RunState) -> dict[str, Any]:
    """The program's full state: each problem's state, the run's, and the generators."""
    if not at_boundary(plan, states):
        raise ConfigError(
            f"cannot checkpoint in the middle of an unroll window or a gradient accumulation of "
            f"{busy(plan, states)}; checkpoint between windows (Engine.run() waits for one)"
        )
    return {
        "format": _FORMAT,
        "run": run.state_dict(),
        "problems": {n: st.state_dict() for n, st in states.items()},
        "rng": rng_state(),
    }


def load_program_state(
    states: Mapping[str, ProblemState], run: RunState, state: Mapping[str, Any]
) -> None:
    """Restore what :func:`program_state` returned."""
    if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ConfigError(f"unsupported checkpoint format {found!r} (expected {_FORMAT})")
    missing = set(states) - set(state["problems"])
    extra = set(state["problems"]) - set(states)
    if missing or extra:
        raise ConfigError(
            f"checkpoint does not fit the program: no state for problems {sorted(missing)}, "
            f"state for unknown problems {sorted(extra)}"
        )
    for name, st in states.items():
        st.load_state_dict(state["problems"][name])
    run.load_state_dict(state["run"])
    set_rng_state(state["rng"])


def save(
    state: dict[str, Any],
    folder: str | None,
    name: str,
    *,
    latest: bool,
    parameters: list[torch.Tensor],
    write: bool = True,
    barrier: Any = None,
) -> str:
    """Atomically write ``state`` as ``folder/name``, and as ``last.pt`` when ``latest``.

    Raises:
        HypergradientError: some parameter is NaN/Inf (the previous checkpoint is kept).
    """
    if folder is None:
        raise ConfigError("save_checkpoint needs EngineConfig(checkpoint_dir=...)")
    if not all_finite([t.detach() for t in parameters]):
        raise HypergradientError(
            f"iteration {state['run']['iteration']}: refusing to write a checkpoint with "
            "non-finite parameters; the previous checkpoint is kept"
        )
    path = os.path.join(folder, name)
    if write:
        atomic_save(state, path)
        if latest:
            atomic_save(state, os.path.join(folder, "last.pt"))
    if barrier is not None:
        barrier()
    return path


def resolve(path: str | bool, folder: str | None) -> str:
    """The checkpoint file for ``EngineConfig(resume=...)`` (True: ``checkpoint_dir/last.pt``).

    Raises:
        ConfigError: the file does not exist.
    """
    if path is True:
        if folder is None:
            raise ConfigError("EngineConfig(resume=True) needs checkpoint_dir=... to find last.pt")
        path = os.path.join(folder, "last.pt")
    if not os.path.exists(path):
        raise ConfigError(f"resume: checkpoint {path!r} does not exist")
    return path
