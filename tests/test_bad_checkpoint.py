"""Bad checkpoints: every malformed file and every misfit is a ConfigError that changes nothing.

A malformed file (a directory, empty, truncated, text, random bytes, a foreign torch file, an
older format, missing entries, corrupted bytes) is refused naming the path and what is wrong; a
checkpoint of another program (a problem added or removed, another graph, other shapes, another
optimizer, other param groups, scheduler or scaler) is refused naming the problem and the
mismatch. After a refusal the modules, optimizers, schedulers, counters and random generators
are bit for bit what they were; a restore that fails midway is rolled back. Writes are atomic:
an interrupted or killed writer leaves the previous checkpoint intact and no file that resume
could mistake for a checkpoint.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mlopt
from mlopt import checkpoint as ckpt
from mlopt import checkpoint_io as ckpt_io
from mlopt.errors import ConfigError

F64 = torch.float64
_G = torch.Generator().manual_seed(3)
TARGET = torch.randn(4, generator=_G, dtype=F64)
XS = [torch.randn(4, generator=_G, dtype=F64) for _ in range(5)]


class Net(nn.Module):
    """``weight`` (size n) and, optionally, ``bias`` (size 1)."""

    def __init__(self, n: int, bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n, generator=g, dtype=F64))
        if bias:
            self.bias = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self) -> torch.Tensor:
        return self.weight + (self.bias if hasattr(self, "bias") else 0.0)


class Lower(mlopt.Problem):
    def training_step(self, batch):
        w, up = self.module.weight, self.upper.module.weight
        noise = 0.01 * torch.randn(w.shape[0], dtype=F64)
        return ((w - up[: w.shape[0]] - batch[: w.shape[0]] - noise) ** 2).sum()


class Upper(mlopt.Problem):
    def training_step(self, batch):
        low = self.lower()
        return ((low - TARGET[: low.shape[0]]) ** 2).sum() + 0.1 * (self.module() ** 2).sum()


class Aux(mlopt.Problem):
    def training_step(self, batch):
        return ((self.module.weight - 1.0) ** 2).sum()


def program(
    iters: int = 6,
    *,
    n: int = 3,
    upper_opt: str = "adam",
    groups: int = 1,
    bias: bool = False,
    scheduler: bool = True,
    aux: bool = False,
    aux_edge: bool = False,
    fp16: bool = False,
    **engine_kw,
) -> mlopt.Engine:
    """A reverse-mode bilevel program (and an independent ``aux`` problem) with knobs that
    change what a checkpoint must fit."""
    low_mod, up_mod = Net(n, seed=1), Net(n, bias=bias or groups == 2, seed=2)
    low_opt = torch.optim.SGD(low_mod.parameters(), lr=0.1, momentum=0.9)
    params = (
        [{"params": [up_mod.weight]}, {"params": [up_mod.bias], "lr": 0.01}]
        if groups == 2
        else up_mod.parameters()
    )
    up_opt = (
        torch.optim.Adam(params, lr=0.05)
        if upper_opt == "adam"
        else torch.optim.SGD(params, lr=0.05, momentum=0.5)
    )
    sched = torch.optim.lr_scheduler.StepLR(up_opt, step_size=2, gamma=0.5) if scheduler else None
    lower = Lower(
        "lower",
        low_mod,
        low_opt,
        train_data_loader=XS,
        config=mlopt.Config(type="reverse", unroll_steps=2),
    )
    upper = Upper(
        "upper",
        up_mod,
        up_opt,
        scheduler=sched,
        train_data_loader=XS,
        config=mlopt.Config(precision="fp16" if fp16 else "fp32"),
    )
    problems = [upper, lower]
    if aux:
        aux_mod = Net(2, seed=3)
        problems.append(Aux("aux", aux_mod, torch.optim.SGD(aux_mod.parameters(), lr=0.1)))
    l2u = {lower: [upper], **({problems[-1]: [upper]} if aux_edge else {})}
    deps = {"u2l": {upper: [lower]}, "l2u": l2u}
    cfg = mlopt.EngineConfig(train_iters=iters, strategy="cpu", seed=0, **engine_kw)
    return mlopt.Engine(problems, deps, cfg)


def snapshot(engine: mlopt.Engine) -> dict:
    """Everything a refused load must leave alone (deep copies)."""
    out: dict = {
        "iteration": engine.iteration,
        "steps": engine.step_counts,
        "updates": engine.update_counts,
        "history": copy.deepcopy(engine.history),
        "best": engine.best_metric,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }
    for name, st in engine.states.items():
        out[f"{name}/module"] = copy.deepcopy(st.module.state_dict())
        out[f"{name}/optimizer"] = copy.deepcopy(st.optimizer.state_dict())
        if st.scheduler is not None:
            out[f"{name}/scheduler"] = copy.deepcopy(st.scheduler.state_dict())
        if st.scaler is not None:
            out[f"{name}/scaler"] = copy.deepcopy(st.scaler.state_dict())
        out[f"{name}/counters"] = (st.window_count, st.steps, st.updates, st.accumulated)
        out[f"{name}/data"] = (st.data.epoch, st.data.position)
        out[f"{name}/ready"] = dict(st.ready)
    return out


def assert_equal(a, b, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def trained(iters: int = 4, **kw) -> mlopt.Engine:
    """An engine that has run ``iters`` iterations (so optimizers have state)."""
    engine = program(iters, **kw)
    engine.run()
    return engine


def refused(engine: mlopt.Engine, path, match: str) -> ConfigError:
    """``engine.load_checkpoint(path)`` raises a ConfigError matching ``match`` and changes
    nothing."""
    before = snapshot(engine)
    with pytest.raises(ConfigError, match=match) as info:
        engine.load_checkpoint(str(path))
    assert_equal(snapshot(engine), before)
    return info.value


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A folder with last.pt of the default program at iteration 6."""
    folder = tmp_path_factory.mktemp("saved")
    program(6, checkpoint_dir=str(folder)).run()
    return folder / "last.pt"


def write_sealed(path: Path, state) -> Path:
    ckpt.atomic_save(ckpt.seal(state), str(path))
    return path


def good_state(saved: Path) -> dict:
    return ckpt.read_checkpoint(str(saved))


# ---------------------------------------------------------------- malformed files
def _directory(tmp: Path, saved: Path) -> Path:
    (tmp / "dir.pt").mkdir()
    return tmp / "dir.pt"


def _empty(tmp: Path, saved: Path) -> Path:
    (tmp / "empty.pt").write_bytes(b"")
    return tmp / "empty.pt"


def _truncated_half(tmp: Path, saved: Path) -> Path:
    data = saved.read_bytes()
    (tmp / "half.pt").write_bytes(data[: len(data) // 2])
    return tmp / "half.pt"


def _truncated_tail(tmp: Path, saved: Path) -> Path:
    (tmp / "tail.pt").write_bytes(saved.read_bytes()[:-10])
    return tmp / "tail.pt"


def _text(tmp: Path, saved: Path) -> Path:
    (tmp / "notes.pt").write_text("iteration: 6\nthis is not a checkpoint\n")
    return tmp / "notes.pt"


def _random_bytes(tmp: Path, saved: Path) -> Path:
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    (tmp / "noise.pt").write_bytes(bytes(data.to(torch.uint8).tolist()))
    return tmp / "noise.pt"


def _foreign_dict(tmp: Path, saved: Path) -> Path:
    torch.save(nn.Linear(2, 2).state_dict(), tmp / "model.pt")
    return tmp / "model.pt"


def _foreign_tensor(tmp: Path, saved: Path) -> Path:
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    return tmp / "tensor.pt"


def _older_format(tmp: Path, saved: Path) -> Path:
    state = good_state(saved)
    state["format"] = 2
    del state["program"]
    torch.save(state, tmp / "v2.pt")  # how format 2 was written: the bare state
    return tmp / "v2.pt"


def _unknown_envelope_format(tmp: Path, saved: Path) -> Path:
    sealed = ckpt.seal(good_state(saved))
    sealed["format"] = 99
    torch.save(sealed, tmp / "v99.pt")
    return tmp / "v99.pt"


def _envelope_without_digest(tmp: Path, saved: Path) -> Path:
    sealed = ckpt.seal(good_state(saved))
    del sealed["sha256"]
    torch.save(sealed, tmp / "nodigest.pt")
    return tmp / "nodigest.pt"


def _missing_top_entry(tmp: Path, saved: Path) -> Path:
    state = good_state(saved)
    del state["rng"]
    return write_sealed(tmp / "norng.pt", state)


def _missing_nested_entries(tmp: Path, saved: Path) -> Path:
    state = good_state(saved)
    del state["problems"]["upper"]["optimizer"]
    del state["problems"]["lower"]["steps"]
    del state["run"]["iteration"]
    return write_sealed(tmp / "holes.pt", state)


def _flipped_tensor_byte(tmp: Path, saved: Path) -> Path:
    weight = good_state(saved)["problems"]["lower"]["module"]["weight"]
    data = bytearray(saved.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0  # the tensor's bytes are stored verbatim in the payload
    data[at + 3] ^= 0x10
    (tmp / "flipped.pt").write_bytes(bytes(data))
    return tmp / "flipped.pt"


def _flipped_last_byte_of_payload(tmp: Path, saved: Path) -> Path:
    payload = torch.load(saved, weights_only=True)["payload"].numpy().tobytes()
    data = bytearray(saved.read_bytes())
    at = bytes(data).find(payload[-64:])
    data[at + 63] ^= 0x01
    (tmp / "flipped_end.pt").write_bytes(bytes(data))
    return tmp / "flipped_end.pt"


MALFORMED = {
    "directory": (_directory, r"dir\.pt'? is a directory"),
    "empty": (_empty, r"empty\.pt'? is empty \(0 bytes\)"),
    "truncated_half": (_truncated_half, r"half\.pt'? is truncated or damaged"),
    "truncated_tail": (_truncated_tail, r"tail\.pt'? is truncated or damaged"),
    "text": (_text, r"notes\.pt'? is not a torch file: it is a text file .*iteration: 6"),
    "random_bytes": (_random_bytes, r"noise\.pt'? is not a torch file: its bytes are not"),
    "foreign_dict": (
        _foreign_dict,
        r"model\.pt'? is a torch file but not an mlopt checkpoint "
        r"\(keys \['bias', 'weight'\]\)",
    ),
    "foreign_tensor": (
        _foreign_tensor,
        r"tensor\.pt'? is a torch file but not an mlopt "
        r"checkpoint \(it holds a Tensor\)",
    ),
    "older_format": (_older_format, r"v2\.pt'? has the format 2 of an older mlopt"),
    "unknown_format": (_unknown_envelope_format, r"v99\.pt'?: unsupported format 99"),
    "no_digest": (_envelope_without_digest, r"nodigest\.pt'? lacks entries \['sha256'\]"),
    "missing_top_entry": (_missing_top_entry, r"norng\.pt'? lacks entries \['rng'\]"),
    "missing_nested_entries": (
        _missing_nested_entries,
        r"holes\.pt'? lacks entries \['run/iteration', 'problems/upper/optimizer', "
        r"'problems/lower/steps'\]",
    ),
    "flipped_tensor_byte": (
        _flipped_tensor_byte,
        r"flipped\.pt'?: integrity check failed: sha256 mismatch .* the file is corrupted",
    ),
    "flipped_payload_end": (
        _flipped_last_byte_of_payload,
        r"flipped_end\.pt'?: integrity check failed: sha256 mismatch",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_file_is_refused_naming_the_path_and_changes_nothing(kind, tmp_path, saved):
    make, match = MALFORMED[kind]
    path = make(tmp_path, saved)
    engine = trained(4)
    err = refused(engine, path, match)
    assert str(path) in str(err)


@pytest.mark.parametrize("kind", ["empty", "truncated_half", "flipped_tensor_byte"])
def test_malformed_resume_is_a_config_error_at_engine_build(kind, tmp_path, saved):
    make, match = MALFORMED[kind]
    path = make(tmp_path, saved)
    with pytest.raises(ConfigError, match=match):
        program(6, resume=str(path))


def test_safe_load_reports_the_same_errors(tmp_path, saved):
    with pytest.raises(ConfigError, match="integrity check failed"):
        ckpt.safe_load(str(_flipped_tensor_byte(tmp_path, saved)))
    with pytest.raises(ConfigError, match="is empty"):
        ckpt.safe_load(str(_empty(tmp_path, saved)))
    assert ckpt.safe_load(str(saved))["run"]["iteration"] == 6  # a good one: the state


_EXECUTED: list[str] = []


def _mark(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return (_mark, ("code ran",))


def test_code_inside_a_sealed_payload_is_not_run(tmp_path, saved):
    state = good_state(saved)
    state["run"]["history"] = [Payload()]
    path = write_sealed(tmp_path / "evil.pt", state)  # a correct digest over evil bytes
    refused(trained(2), path, r"evil\.pt'?: refusing to load its payload.*[Ww]eights only")
    assert _EXECUTED == []


# ---------------------------------------------------------------- checkpoints of other programs
MISFITS = {
    "problem_added": (
        {"aux": True},
        {},
        r"problems \['aux'\] are in the program but not in the checkpoint \(added\)",
    ),
    "problem_removed": (
        {},
        {"aux": True},
        r"problems \['aux'\] are in the checkpoint but not in the program \(removed\)",
    ),
    "graph_changed": (
        {"aux": True, "aux_edge": True},
        {"aux": True},
        r"the dependency graph changed: l2u edges \[\] only in the checkpoint, "
        r"\['aux -> upper'\] only in the program",
    ),
    "parameter_shape": (
        {"n": 4},
        {},
        r"problem 'upper': parameter/buffer 'weight' has shape \(3,\) in the checkpoint but "
        r"\(4,\) in the program",
    ),
    "parameter_added": (
        {"bias": True},
        {},
        r"problem 'upper': module entries \['bias'\] only in the program",
    ),
    "optimizer_type": (
        {"upper_opt": "sgd"},
        {},
        r"problem 'upper': optimizer Adam in the checkpoint but SGD in the program",
    ),
    "param_groups": (
        {"groups": 2},
        {"bias": True},
        r"problem 'upper': optimizer param groups of sizes \[2\] in the checkpoint but \[1, 1\]",
    ),
    "scheduler_removed": (
        {"scheduler": False},
        {},
        r"problem 'upper': scheduler StepLR in the checkpoint but None in the program",
    ),
    "scaler_added": (
        {"fp16": True},
        {},
        r"problem 'upper': fp16 GradScaler False in the checkpoint but True in the program",
    ),
}


@pytest.mark.parametrize("kind", sorted(MISFITS))
def test_misfit_is_refused_naming_the_problem_and_the_mismatch(kind, tmp_path):
    program_kw, saved_kw, match = MISFITS[kind]
    program(6, checkpoint_dir=str(tmp_path), **saved_kw).run()
    engine = trained(4, **program_kw)
    err = refused(engine, tmp_path / "last.pt", match)
    assert "does not fit the program (nothing was restored)" in str(err)
    assert str(tmp_path / "last.pt") in str(err)


def test_misfit_resume_is_refused_before_the_engine_exists(tmp_path):
    program(6, checkpoint_dir=str(tmp_path)).run()
    with pytest.raises(ConfigError, match=r"(?s)last\.pt'? does not fit.*shape \(3,\).*\(5,\)"):
        program(6, n=5, resume=True, checkpoint_dir=str(tmp_path))


def test_every_misfit_is_listed(tmp_path):
    program(6, checkpoint_dir=str(tmp_path), aux=True, aux_edge=True).run()
    engine = trained(2, upper_opt="sgd", scheduler=False)
    err = refused(engine, tmp_path / "last.pt", "does not fit")
    lines = [ln for ln in str(err).splitlines() if ln.startswith("  - ")]
    assert len(lines) == 4, str(err)  # removed problem, graph, optimizer, scheduler


def test_in_memory_state_is_validated_too():
    engine = trained(4)
    state = engine.state_dict()
    other = trained(2, upper_opt="sgd")
    before = snapshot(other)
    with pytest.raises(ConfigError, match="(?s)the state dict does not fit.*optimizer Adam"):
        other.load_state_dict(state)
    del state["problems"]["lower"]["data"]
    with pytest.raises(ConfigError, match=r"the state dict lacks entries \['problems/lower/data'"):
        other.load_state_dict(state)
    assert_equal(snapshot(other), before)


# ---------------------------------------------------------------- all-or-nothing restore
def test_restore_failing_at_the_generators_rolls_everything_back(tmp_path, saved):
    state = good_state(saved)
    state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)  # fits, but cannot be set
    path = write_sealed(tmp_path / "badrng.pt", state)
    refused(trained(4), path, r"restoring the random generators failed.*put back")


def test_restore_failing_in_the_second_problem_rolls_the_first_back(tmp_path, saved):
    state = good_state(saved)
    state["problems"]["lower"]["optimizer"]["param_groups"] = []  # upper is restored first
    path = write_sealed(tmp_path / "badopt.pt", state)
    engine = trained(4)
    assert list(engine.states) == ["upper", "lower"]
    refused(engine, path, r"restoring problem 'lower' failed \(ValueError.*put back")


@pytest.mark.parametrize("broken", ["generators", "second_problem"])
def test_training_after_a_rolled_back_load_is_bitwise_unchanged(broken, tmp_path, saved):
    state = good_state(saved)
    if broken == "generators":
        state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    else:
        state["problems"]["lower"]["optimizer"]["param_groups"] = []
    path = write_sealed(tmp_path / "bad.pt", state)
    reference = program(8)  # (the global generator is shared: one program at a time)
    reference.run()
    expected = snapshot(reference)
    engine = program(8)
    for _ in range(4):
        engine.step()
    with pytest.raises(ConfigError, match="put back"):
        engine.load_checkpoint(str(path))
    engine.run()
    assert_equal(snapshot(engine), expected)


def test_a_good_checkpoint_still_resumes_after_a_refused_one(tmp_path, saved):
    engine = trained(4)
    refused(engine, _truncated_half(tmp_path, saved), "truncated")
    engine.load_checkpoint(str(saved))
    assert engine.iteration == 6


# ---------------------------------------------------------------- interrupted writes
def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    engine = program(8, checkpoint_dir=str(tmp_path))
    engine.run()
    before, last = sorted(os.listdir(tmp_path)), (tmp_path / "last.pt").read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    engine.run_state.iteration += 1
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "last.pt").read_bytes() == last


_KILLED_WRITER = """
import os, signal, sys, torch
from mlopt import checkpoint as ckpt
def dying(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying
ckpt.atomic_save({"x": torch.zeros(3)}, sys.argv[1])
"""


def _backdate(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def _temps(folder: Path) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


def test_killed_writer_keeps_last_and_its_leftover_is_removed_by_the_next_save(tmp_path):
    program(6, checkpoint_dir=str(tmp_path)).run()
    last = (tmp_path / "last.pt").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "last.pt")],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = _temps(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.")  # hidden, not *.pt
    assert (tmp_path / "last.pt").read_bytes() == last
    resumed = program(8, checkpoint_dir=str(tmp_path), resume=True)  # not confused by it
    assert resumed.iteration == 6
    resumed.save_checkpoint()  # its writer is dead (its lock is free): removed
    assert _temps(tmp_path) == []
    assert ckpt.read_checkpoint(str(tmp_path / "last.pt"))["run"]["iteration"] == 6


@pytest.mark.skipif(ckpt_io.fcntl is None, reason="needs file locks (fcntl)")
def test_a_live_writers_temporary_file_is_kept(tmp_path):
    engine = program(6, checkpoint_dir=str(tmp_path))
    engine.run()
    live = tmp_path / ".last.pt.writing.tmp"
    with open(live, "wb") as f:
        # what atomic_save holds while writing
        ckpt_io.fcntl.flock(f.fileno(), ckpt_io.fcntl.LOCK_EX)
        _backdate(live, 2 * ckpt_io.STALE_TMP_S)
        engine.save_checkpoint()
        assert _temps(tmp_path) == [live.name]
    engine.save_checkpoint()  # the lock is released: an abandoned file
    assert _temps(tmp_path) == []


def test_without_file_locks_only_old_temporary_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_io, "fcntl", None)  # e.g. a filesystem without flock
    engine = program(6, checkpoint_dir=str(tmp_path))
    engine.run()
    leftover = tmp_path / ".last.pt.dead.tmp"
    leftover.write_bytes(b"PK\x03\x04 half")
    engine.save_checkpoint()
    assert _temps(tmp_path) == [leftover.name]  # it could be a live writer's
    _backdate(leftover, ckpt_io.STALE_TMP_S + 10)
    engine.save_checkpoint()
    assert _temps(tmp_path) == []
    assert ckpt.read_checkpoint(str(tmp_path / "last.pt"))["run"]["iteration"] == 6


# ---------------------------------------------------------------- damage anywhere
def test_random_damage_to_the_file_is_refused_or_harmless(tmp_path, saved):
    """Flipped bits, cuts and overwritten runs anywhere in the file: a ConfigError, or (zip
    header bytes that torch ignores) exactly the saved state."""
    good, ref = saved.read_bytes(), good_state(saved)
    gen = random.Random(0)
    refusals = 0
    for t in range(120):
        data = bytearray(good)
        at = gen.randrange(len(data))
        if t % 3 == 0:
            data[at] ^= 1 << gen.randrange(8)
        elif t % 3 == 1:
            data = data[:at]
        else:
            data[at : at + 8] = bytes(gen.randrange(256) for _ in range(8))
        path = tmp_path / f"damaged{t}.pt"
        path.write_bytes(bytes(data))
        try:
            assert_equal(ckpt.read_checkpoint(str(path)), ref)
        except ConfigError as err:
            assert str(path) in str(err)
            refusals += 1
    assert refusals > 100


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))


def test_any_broken_program_description_is_refused_and_changes_nothing():
    engine = trained(4)
    base = engine.state_dict()
    before = snapshot(engine)
    cases = [("program", *p) for p in _paths(base["program"])] + [(k,) for k in base]
    for path in cases:
        for value in ("del", None, "x", [1]):
            state = copy.deepcopy(base)
            parent = state
            for key in path[:-1]:
                parent = parent[key]
            if value == "del":
                del parent[path[-1]]
            elif parent[path[-1]] == value:
                continue
            else:
                parent[path[-1]] = value
            with pytest.raises(ConfigError):
                engine.load_state_dict(state)
    assert_equal(snapshot(engine), before)


# ---------------------------------------------------------------- the pure checks
def test_misfits_and_missing_entries_of_a_fitting_state_are_empty():
    engine = trained(4)
    state = engine.state_dict()
    assert ckpt.missing_entries(state) == []
    assert ckpt.misfits(state["program"], ckpt.describe_program(engine.plan, engine.states)) == []
    assert state["program"]["graph"] == {"u2l": [["upper", "lower"]], "l2u": [["lower", "upper"]]}
    assert state["program"]["problems"]["upper"] == {
        "module": {"weight": [3]},
        "optimizer": "Adam",
        "param_groups": [[[3]]],
        "scheduler": "StepLR",
        "scaler": False,
    }


def test_seal_digest_covers_the_payload():
    sealed = ckpt.seal({"a": torch.arange(4.0)})
    assert sealed["format"] == ckpt.FORMAT == 3 and len(sealed["sha256"]) == 64
    sealed["payload"][-1] ^= 1
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        ckpt_io.unseal(sealed, "x", "cpu")
