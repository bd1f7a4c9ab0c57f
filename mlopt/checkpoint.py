"""Checkpoints: exact resume, atomic writes, integrity-checked loads that fit or change nothing.

A checkpoint holds the program's state objects (each problem's
:class:`~mlopt.runtime.state.ProblemState`, the :class:`~mlopt.runtime.state.RunState`, the
random generators), so a resumed run continues as if never stopped, and a description of the
program it fits (dependency edges; module entry shapes, optimizer class and param groups,
scheduler class, scaler of each problem). It is written between unroll windows only, never with
non-finite parameters. File format 3 (:func:`seal`): ``{"mlopt": "checkpoint", "format": 3,
"sha256": hex, "payload": uint8 tensor}``, the payload being the state's ``torch.save`` bytes.
Loading (``weights_only=True``) checks the file, the digest, the entries, then the fit, and only
then restores (rolled back if it still fails); formats 1-2 (no digest) are refused.

The file itself (sealing, safe reads, atomic writes) is :mod:`mlopt.checkpoint_io`'s, what a
checkpoint must fit is :mod:`mlopt.runtime.fit`'s; their public names are importable from here.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
    >>> atomic_save({"a": 1}, path)
    >>> safe_load(path)
    {'a': 1}
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlopt.checkpoint_io import (
    FORMAT,
    atomic_save,
    first_line,
    read_sealed,
    safe_load,
    seal,
)
from mlopt.checkpoint_io import STALE_TMP_S as STALE_TMP_S  # (read it there; not in __all__)
from mlopt.errors import ConfigError, HypergradientError
from mlopt.runtime.fit import describe_program, misfits, missing_entries
from mlopt.step import all_finite

if TYPE_CHECKING:
    from mlopt.runtime.plan import Plan
    from mlopt.runtime.state import ProblemState, RunState

__all__ = [
    "FORMAT",
    "atomic_save",
    "safe_load",
    "seal",
    "read_checkpoint",
    "describe_program",
    "missing_entries",
    "misfits",
    "program_state",
    "load_program_state",
    "save",
    "resolve",
    "at_boundary",
    "busy",
    "rng_state",
    "set_rng_state",
]


# ---------------------------------------------------------------- program state
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
    if state["cuda"] and torch.cuda.is_available():  # (the devices both runs have)
        for i, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, i)


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
    """The program's full state: each problem's state, the run's, the generators, and the
    description of the program it fits."""
    if not at_boundary(plan, states):
        raise ConfigError(
            f"cannot checkpoint in the middle of an unroll window or a gradient accumulation of "
            f"{busy(plan, states)}; checkpoint between windows (Engine.run() waits for one)"
        )
    return {
        "format": FORMAT,
        "run": run.state_dict(),
        "problems": {n: st.state_dict() for n, st in states.items()},
        "rng": rng_state(),
        "program": describe_program(plan, states),
    }


def _check_entries(state: Any, where: str) -> None:
    if not isinstance(state, Mapping):
        raise ConfigError(f"{where} is not a program state (a {type(state).__name__})")
    if state.get("format") != FORMAT:
        raise ConfigError(
            f"{where}: unsupported checkpoint format {state.get('format')!r} (expected {FORMAT})"
        )
    if lacking := missing_entries(state):
        raise ConfigError(f"{where} lacks entries {lacking}: it is damaged or was edited")


def read_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The state in the mlopt checkpoint ``path``, integrity-checked and with all its entries.

    Raises:
        ConfigError: as :func:`safe_load`, or the file is another torch file, an older format,
            or lacks entries (naming the path and what is wrong).
    """
    state = read_sealed(path, map_location)
    _check_entries(state, f"checkpoint {path!r}")
    return state


def _restore(states: Mapping[str, ProblemState], run: RunState, state: Mapping, where: str) -> None:
    """Load every state object; if one fails, undo those already loaded, then raise."""
    undo, rng, saved_run = [], rng_state(), copy.deepcopy(run.state_dict())
    try:
        for name, st in states.items():
            part = f"problem {name!r}"
            undo.append(st.restorer())
            st.load_state_dict(state["problems"][name])
        part = "the run state"
        run.load_state_dict(state["run"])
        part = "the random generators"
        set_rng_state(state["rng"])
    except BaseException as err:
        for step in reversed(undo):
            step()
        run.load_state_dict(saved_run)
        set_rng_state(rng)
        if not isinstance(err, Exception):
            raise
        raise ConfigError(
            f"{where}: restoring {part} failed ({type(err).__name__}: {first_line(err)}); "
            "everything was put back as before the load"
        ) from err


def load_program_state(
    plan: Plan,
    states: Mapping[str, ProblemState],
    run: RunState,
    state: Mapping[str, Any],
    source: str = "the state dict",
) -> None:
    """Restore what :func:`program_state` returned, all or nothing.

    ``state`` is checked first (format, entries, then its fit to the program: problems, graph,
    shapes, optimizers, schedulers, scalers); nothing is touched unless every check passes.

    Raises:
        ConfigError: naming ``source`` and every mismatch; the program is unchanged.
    """
    _check_entries(state, source)
    try:
        found = misfits(state["program"], describe_program(plan, states))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ConfigError(
            f"{source}: its program description is malformed ({type(err).__name__}: "
            f"{first_line(err)}); it is damaged or was edited"
        ) from err
    if found:
        raise ConfigError(
            f"{source} does not fit the program (nothing was restored):\n  - "
            + "\n  - ".join(found)
        )
    _restore(states, run, state, source)


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
    """Atomically write ``state`` (sealed, :func:`seal`) as ``folder/name``, and as ``last.pt``
    when ``latest``.

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
        sealed = seal(state)
        atomic_save(sealed, path)
        if latest:
            atomic_save(sealed, os.path.join(folder, "last.pt"))
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
