"""The checkpoint file: sealed payloads, safe reads that name what is wrong, atomic writes.

File format 3 (:func:`seal`): ``{"mlopt": "checkpoint", "format": 3, "sha256": hex, "payload":
uint8 tensor}``, the payload being the state's ``torch.save`` bytes. Reading (``weights_only=True``,
:func:`read_torch`) turns every failure into a :class:`~mlopt.errors.ConfigError` that says what
the file is (a directory, empty, text, truncated, other objects than tensors); :func:`unseal`
checks the envelope and the digest before loading the payload. :func:`atomic_save` writes to a
locked temporary file and renames it over the target, and removes the temporary files of killed
writers. What the state inside must hold and fit is :mod:`mlopt.runtime.fit`'s concern.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
    >>> atomic_save(seal({"a": 1}), path)
    >>> safe_load(path)
    {'a': 1}
    >>> read_sealed(path)
    {'a': 1}
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch

from mlopt.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are recognized by their age only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT",
    "STALE_TMP_S",
    "atomic_save",
    "first_line",
    "read_sealed",
    "read_torch",
    "safe_load",
    "seal",
    "unseal",
]

FORMAT = 3
STALE_TMP_S = 3600.0  # without file locks: a temporary file untouched this long is stale
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")  # zip, legacy pickle


# ---------------------------------------------------------------- writing
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


# ---------------------------------------------------------------- reading
def _what_is(head: bytes) -> str:
    """What a file that is not a torch file looks like, from its first bytes."""
    text = head.decode("utf-8", "ignore")
    if len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"it is a text file (it starts with {head[:40]!r})"
    return f"its bytes are not a torch file's (it starts with 0x{head[:8].hex()})"


def read_torch(path: str, map_location: Any) -> Any:
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
            f"(weights_only loading; nothing in it was run). Details: {first_line(err)}"
        ) from err
    except Exception as err:  # zip reader, EOF, damaged pickle: no raw error escapes
        raise ConfigError(
            f"{where} is truncated or damaged: it starts like a torch file but cannot be read "
            f"({size} bytes; {type(err).__name__}: {first_line(err)})"
        ) from err


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, at most 200 characters (for error messages)."""
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


def unseal(obj: Mapping, where: str, map_location: Any) -> Any:
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
            f"plain values (nothing in it was run). Details: {first_line(err)}"
        ) from err
    except Exception as err:
        raise ConfigError(f"{where}: its payload cannot be loaded ({first_line(err)})") from err


def safe_load(path: str, map_location: Any = "cpu") -> Any:
    """Load a file without running code from it (``weights_only=True``); of a sealed checkpoint
    (:func:`seal`), the integrity-checked state.

    Raises:
        ConfigError: the file is a directory, empty, truncated, not a torch file, holds objects
            other than tensors and plain values, or fails its integrity check (naming which).
    """
    obj = read_torch(path, map_location)
    sealed = isinstance(obj, Mapping) and obj.get("mlopt") == "checkpoint"
    return unseal(obj, f"checkpoint {path!r}", map_location) if sealed else obj


def read_sealed(path: str, map_location: Any = "cpu") -> Any:
    """The integrity-checked state in the sealed checkpoint file ``path`` (:func:`seal`).

    Raises:
        ConfigError: as :func:`safe_load`, or the file is another torch file or an mlopt
            checkpoint of an older format (naming the path and what it is).
    """
    obj, where = read_torch(path, "cpu"), f"checkpoint {path!r}"  # (the payload: bytes)
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
    return unseal(obj, where, map_location)
