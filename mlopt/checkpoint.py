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

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
    >>> atomic_save({"a": 1}, path)
    >>> safe_load(path)
    {'a': 1}
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import pickle
import random
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.runtime.state import REQUIRED_KEYS
from mlopt.step import all_finite

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are recognized by their age only
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mlopt.graph import Graph
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

FORMAT = 3
STALE_TMP_S = 3600.0  # without file locks: a temporary file untouched this long is stale
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")  # zip, legacy pickle
_RUN = ("iteration", "best_metric", "bad_validations", "stopped", "history")
_RNG = ("python", "numpy", "torch", "cuda")
_DESC = ("module", "optimizer", "param_groups", "scheduler", "scaler")


# ---------------------------------------------------------------- files
def _lock(fd: int, wait: bool) -> bool | None:
    """``flock`` ``fd`` exclusively: True if locked, False if another process holds it, None
    where locks are unsupported (no ``fcntl``, some network filesystems)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _remove_if_abandoned(path: str) -> None:
    """Delete the temporary file ``path`` if no live writer holds it: its lock is free (the
    system releases a killed writer's; deleted while locked, so no writer can take it over),
    or, without locks, it was untouched for ``STALE_TMP_S``."""
    fd = os.open(path, os.O_RDWR)
    try:
        free = _lock(fd, wait=False)
        if free:
            os.unlink(path)
    finally:
        os.close(fd)
    if free is None and time.time() - os.path.getmtime(path) > STALE_TMP_S:
        os.unlink(path)


def _remove_stale_temps(folder: str, name: str) -> None:
    """Delete the ``.<name>.*.tmp`` files that writers killed mid-write left behind."""
    for f in os.listdir(folder):
        if f.startswith(f".{name}.") and f.endswith(".tmp"):
            with contextlib.suppress(OSError):
                _remove_if_abandoned(os.path.join(folder, f))


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary ``.<name>.*.tmp`` in the same folder (locked while being
    written), then rename it over ``path``: a crash leaves ``path`` as it was. The temporary
    file is removed on errors and interrupts; a killed writer's, by the next save of ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(folder, name)
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        locked = _lock(fd, wait=True)
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)  # another save removed it as abandoned in the instant before the lock
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            if locked:  # rename while still locked (POSIX); else after closing (Windows)
                os.replace(tmp, path)
        if not locked:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _what_is(head: bytes) -> str:
    """What a file that is not a torch file looks like, from its first bytes."""
    text = head.decode("utf-8", "ignore")
    if len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"it is a text file (it starts with {head[:40]!r})"
    return f"its bytes are not a torch file's (it starts with 0x{head[:8].hex()})"


def _read_torch(path: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; every failure is a ConfigError."""
    where = f"checkpoint {path!r}"
    if os.path.isdir(path):
        raise ConfigError(f"{where} is a directory, not a checkpoint file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err}") from err
    if size == 0:
        raise ConfigError(f"{where} is empty (0 bytes): it was never written completely")
    if not head.startswith(_TORCH_MAGIC):
        raise ConfigError(f"{where} is not a torch file: {_what_is(head)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"refusing to load {path!r}: it holds objects other than tensors and plain values "
            f"(weights_only loading; nothing in it was run). Details: {_first_line(err)}"
        ) from err
    except Exception as err:  # zip reader, EOF, damaged pickle: no raw error escapes
        raise ConfigError(
            f"{where} is truncated or damaged: it starts like a torch file but cannot be read "
            f"({size} bytes; {type(err).__name__}: {_first_line(err)})"
        ) from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _digest(payload: torch.Tensor) -> str:
    return hashlib.sha256(payload.cpu().contiguous().numpy()).hexdigest()


def seal(state: Any) -> dict[str, Any]:
    """The file form of ``state``: its ``torch.save`` bytes as a uint8 tensor and their sha256."""
    buf = io.BytesIO()
    # the in-memory serialization; torch.save (which crash tests patch) is the file write
    torch.serialization.save(state, buf)
    payload = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
    return {"mlopt": "checkpoint", "format": FORMAT, "sha256": _digest(payload), "payload": payload}


def _unseal(obj: Mapping, where: str, map_location: Any) -> Any:
    """Check the envelope and the digest, and load the payload."""
    if obj.get("format") != FORMAT:
        raise ConfigError(f"{where}: unsupported format {obj.get('format')!r} (expected {FORMAT})")
    if lacking := [k for k in ("sha256", "payload") if k not in obj]:
        raise ConfigError(f"{where} lacks entries {lacking}: the file is damaged or was edited")
    payload, stored = obj["payload"], obj["sha256"]
    if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8):
        raise ConfigError(f"{where}: its payload is not a uint8 tensor; the file is damaged")
    if (found := _digest(payload)) != stored:
        raise ConfigError(
            f"{where}: integrity check failed: sha256 mismatch (stored {str(stored)[:16]}..., "
            f"computed {found[:16]}...); the file is corrupted"
        )
    try:
        data = io.BytesIO(payload.cpu().numpy().tobytes())
        return torch.load(data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{where}: refusing to load its payload: it holds objects other than tensors and "
            f"plain values (nothing in it was run). Details: {_first_line(err)}"
        ) from err
    except Exception as err:
        raise ConfigError(f"{where}: its payload cannot be loaded ({_first_line(err)})") from err


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """Load a file without running code from it (``weights_only=True``); of a sealed checkpoint
    (:func:`seal`), the integrity-checked state.

    Raises:
        ConfigError: the file is a directory, empty, truncated, not a torch file, holds objects
            other than tensors and plain values, or fails its integrity check (naming which).
    """
    obj = _read_torch(path, map_location)
    sealed = isinstance(obj, Mapping) and obj.get("mlopt") == "checkpoint"
    return _unseal(obj, f"checkpoint {path!r}", map_location) if sealed else obj


def read_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The state in the mlopt checkpoint ``path``, integrity-checked and with all its entries.

    Raises:
        ConfigError: as :func:`safe_load`, or the file is another torch file, an older format,
            or lacks entries (naming the path and what is wrong).
    """
    obj, where = _read_torch(path, "cpu"), f"checkpoint {path!r}"  # (the payload: bytes)
    if not isinstance(obj, Mapping):
        raise ConfigError(
            f"{where} is a torch file but not an mlopt checkpoint (it holds a {type(obj).__name__})"
        )
    if obj.get("mlopt") != "checkpoint":
        if "problems" in obj and obj.get("format") in (1, 2):
            raise ConfigError(
                f"{where} has the format {obj['format']} of an older mlopt (no integrity "
                f"digest); this version reads format {FORMAT} only"
            )
        keys = sorted(map(str, obj))[:8]
        raise ConfigError(f"{where} is a torch file but not an mlopt checkpoint (keys {keys})")
    state = _unseal(obj, where, map_location)
    _check_entries(state, where)
    return state


# ---------------------------------------------------------------- what a checkpoint must fit
def _edges(graph: Graph) -> dict[str, list[list[str]]]:
    return {
        kind: sorted([a, b] for a, bs in getattr(graph, kind).items() for b in bs)
        for kind in ("u2l", "l2u")
    }


def _describe(st: ProblemState) -> dict[str, Any]:
    """What a checkpoint must match to fit one problem, as plain values: module entry shapes,
    optimizer class, param groups (parameter shapes), scheduler class, scaler or not."""
    opt, mod, sched = st.optimizer, st.module, st.scheduler
    return {
        "module": None if mod is None else {k: list(v.shape) for k, v in mod.state_dict().items()},
        "optimizer": None if opt is None else type(opt).__name__,
        "param_groups": []
        if opt is None
        else [[list(q.shape) for q in g["params"]] for g in opt.param_groups],
        "scheduler": type(sched).__name__ if hasattr(sched, "state_dict") else None,
        "scaler": st.scaler is not None,
    }


def describe_program(plan: Plan, states: Mapping[str, ProblemState]) -> dict[str, Any]:
    """What a checkpoint must match to fit the program: the dependency edges and, for each
    problem, its module entry shapes, optimizer class and param groups (parameter shapes),
    scheduler class and whether it has an fp16 scaler (plain values)."""
    return {"graph": _edges(plan.graph), "problems": {n: _describe(st) for n, st in states.items()}}


def _lacking(value: Any, need: Any, path: str) -> list[str]:
    """The paths that ``value`` lacks of ``need`` (a tuple of keys or a dict of sub-needs)."""
    if need is None:
        return []
    if not isinstance(value, Mapping):
        return [f"{path} (a {type(value).__name__}, not a dict)"]
    if isinstance(need, tuple):
        return [f"{path}{k}" for k in need if k not in value]
    return [
        m
        for k, sub in need.items()
        for m in (_lacking(value[k], sub, f"{path}{k}/") if k in value else [f"{path}{k}"])
    ]


def _promised(desc: Any) -> tuple[str, ...]:
    """The entries of a saved problem state that its description promises."""
    if not isinstance(desc, Mapping):
        return REQUIRED_KEYS
    has = [k for k in ("module", "optimizer", "scheduler") if desc.get(k) is not None]
    return (*REQUIRED_KEYS, *has, *(("scaler",) if desc.get("scaler") else ()))


def missing_entries(state: Mapping[str, Any]) -> list[str]:
    """The entries (``a/b/c`` paths) that a program state lacks; [] for a complete one."""
    program, problems = state.get("program"), state.get("problems")
    desc = program.get("problems") if isinstance(program, Mapping) else None
    desc = desc if isinstance(desc, Mapping) else {}
    saved = problems if isinstance(problems, Mapping) else {}
    names = [*desc, *(n for n in saved if n not in desc)]
    need = {
        **dict.fromkeys(("format", "run", "problems", "rng", "program")),
        "run": _RUN,
        "rng": _RNG,
        "program": {"graph": ("u2l", "l2u"), "problems": dict.fromkeys(names, _DESC)},
        "problems": {n: _promised(desc.get(n)) for n in names},
    }
    return _lacking(state, need, "")


def _but(what: str, saved: Any, live: Any) -> str:
    return f"{what} {saved} in the checkpoint but {live} in the program"


def _problem_misfits(saved: Mapping, live: Mapping) -> list[str]:
    """How one problem's saved description differs from its live one."""
    out, sm, lm = [], saved["module"], live["module"]
    if (sm is None) != (lm is None):
        out.append(f"a module only in the {'program' if sm is None else 'checkpoint'}")
    elif sm is not None:
        for a, b, side in ((lm, sm, "program"), (sm, lm, "checkpoint")):
            if only := sorted(set(a) - set(b)):
                out.append(f"module entries {only} only in the {side}")
        out += [
            _but(f"parameter/buffer {k!r} has shape", tuple(sm[k]), tuple(lm[k]))
            for k in lm
            if k in sm and tuple(sm[k]) != tuple(lm[k])
        ]
    sizes, shapes = (
        [[f(g) for g in d["param_groups"]] for d in (saved, live)]
        for f in (len, lambda g: [tuple(s) for s in g])
    )
    if saved["optimizer"] != live["optimizer"]:
        out.append(_but("optimizer", saved["optimizer"], live["optimizer"]))
    elif sizes[0] != sizes[1]:
        out.append(_but("optimizer param groups of sizes", *sizes))
    elif shapes[0] != shapes[1] and not out:  # (a module reshape is reported already)
        out.append(_but("optimizer param groups of parameter shapes", *shapes))
    for key, what in (("scheduler", "scheduler"), ("scaler", "fp16 GradScaler")):
        if saved[key] != live[key]:
            out.append(_but(what, saved[key], live[key]))
    return out


def misfits(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """How a saved program description (:func:`describe_program`) differs from the live one:
    problems added or removed, changed edges, then each problem's mismatches; [] if it fits."""
    out, sp, lp = [], saved["problems"], live["problems"]
    if only := sorted(set(lp) - set(sp)):
        out.append(f"problems {only} are in the program but not in the checkpoint (added)")
    if only := sorted(set(sp) - set(lp)):
        out.append(f"problems {only} are in the checkpoint but not in the program (removed)")
    for kind in ("u2l", "l2u"):
        a, b = ({f"{u} -> {v}" for u, v in d["graph"][kind]} for d in (saved, live))
        if a != b:
            out.append(
                f"the dependency graph changed: {kind} edges {sorted(a - b)} only in the "
                f"checkpoint, {sorted(b - a)} only in the program"
            )
    for name in (n for n in lp if n in sp):
        out += [f"problem {name!r}: {m}" for m in _problem_misfits(sp[name], lp[name])]
    return out


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
            f"{where}: restoring {part} failed ({type(err).__name__}: {_first_line(err)}); "
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
            f"{_first_line(err)}); it is damaged or was edited"
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
