"""Crash and resume: a training process SIGKILLed at random steps, then resumed, ends bit for bit
where an uninterrupted run ends (CPU, float64).

Unlike tests/test_checkpoint.py (checkpoint, then a new Engine in the same process), every run
here is its own process (tests/crash_worker.py) and the crash is a real ``SIGKILL``: nothing of
the killed process survives but what it had written to its checkpoint folder. Programs: shuffled
DataLoaders without (``shuffle``) and with (``generator``) their own generator, a BDA lower whose
upper has a shuffled loader (``bda``), and the ``shuffle`` program on 2 ranks under torchrun
(``ddp``, gloo). Each is compared with the same program run uninterrupted and without any
checkpoint: every module parameter and buffer, optimizer and scheduler state, loader generator,
torch's global generator and the counters, with ``torch.equal``.

Kill points are drawn by ``random.Random(SEED)`` (reproducible; change SEED to draw others), one
from each kind of place a crash can hit, and applied one after the other to the same checkpoint
folder (kill, resume, kill again, ..., resume to the end):

- inside an epoch: just after a checkpoint taken in the middle of the lower loader's epoch;
- at an epoch boundary: just after a checkpoint taken when the epoch's last batch was drawn (the
  resumed stream must start the next epoch with the next shuffle);
- inside an unroll window: the checkpoint is the window's start (saves wait for window
  boundaries), so the resumed run redoes the window's first updates, on the same batches.

A crash can also hit a checkpoint write: the ``shuffle`` program is killed in the middle of the
first file a save writes, resumed, and killed in the middle of the second file (``last.pt``) of a
later save; it must resume from the previous complete checkpoint, exactly, and the temporary
files of the killed writes must be gone once the resumed run has saved again.

The single-process runs are forked one after another from one worker process (``crash_worker.py
chains``: torch is imported once, not once per run) and each torchrun launch is a fresh set of
processes. POSIX only (fork, SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash_worker as W
import pytest
import torch

HERE = Path(__file__).resolve().parent
SEED = 20240607  # the kill points below are drawn from random.Random(SEED)
TIMEOUT_S = 120  # one subprocess (all forked single-process runs together, or one torchrun)
CHILD_TIMEOUT_S = 60  # one forked run (SIGALRM)
SINGLE = ("shuffle", "generator", "bda")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs POSIX fork and SIGKILL"
)


# ---------------------------------------------------------------------- the schedule
def save_iterations(spec: W.Spec) -> list[int]:
    """Iterations after which a checkpoint is written: a save due every checkpoint_step waits
    for the end of the lower's unroll window."""
    out, pending = [], False
    for it in range(1, spec.iters + 1):
        pending = pending or it % spec.checkpoint_step == 0
        if pending and it % spec.unroll == 0:
            out.append(it)
            pending = False
    return out


def last_save(spec: W.Spec, iteration: int) -> int:
    """The checkpoint a run killed after ``iteration`` resumes from."""
    return max(s for s in save_iterations(spec) if s <= iteration)


def at_epoch_end(spec: W.Spec, iteration: int) -> bool:
    """Whether the lower's stream has just drawn the last batch of an epoch."""
    return (iteration * spec.draws_per_iter) % spec.lower_batches == 0


def places(spec: W.Spec) -> dict[str, list[int]]:
    """Candidate kill points by kind (after the first checkpoint, before the last iteration)."""
    saves = save_iterations(spec)
    first = saves[0]
    return {
        "inside an epoch": [s for s in saves if s < spec.iters and not at_epoch_end(spec, s)],
        "at an epoch boundary": [s for s in saves if s < spec.iters and at_epoch_end(spec, s)],
        "inside an unroll window": [i for i in range(first + 1, spec.iters) if i % spec.unroll],
    }


def draw_kill_points(rng: random.Random) -> dict[str, list[tuple[str, int]]]:
    """Per program: ``[(kind of place, iteration)]`` in the order the kills happen."""
    out = {}
    for kind in SINGLE:
        picks = [(where, rng.choice(c)) for where, c in places(W.SPECS[kind]).items()]
        out[kind] = sorted(picks, key=lambda p: p[1])
    # ddp: a kill just after the checkpoint at an epoch boundary of the shared stream, and one
    # inside a window past an epoch boundary since the checkpoint it resumes from (the redone
    # updates cross a reshuffle)
    spec = W.SPECS["ddp"]
    crossing = [
        i
        for i in places(spec)["inside an unroll window"]
        if any(at_epoch_end(spec, j) for j in range(last_save(spec, i) + 1, i + 1))
    ]
    picks = [
        ("at an epoch boundary", rng.choice(places(spec)["at an epoch boundary"])),
        ("inside an unroll window, across an epoch boundary", rng.choice(crossing)),
    ]
    out["ddp"] = sorted(picks, key=lambda p: p[1])
    # kills inside a checkpoint write (shuffle program), at two saves but the first: in the
    # first file it writes (the iteration's file), then in the second one (last.pt)
    saves = rng.sample(save_iterations(W.SPECS["shuffle"])[1:], 2)
    out["mid-save"] = [
        ("inside the 1st file write of the checkpoint of", min(saves)),
        ("inside the 2nd file write of the checkpoint of", max(saves)),
    ]
    return out


KILLS = draw_kill_points(random.Random(SEED))


# ---------------------------------------------------------------------- running the worker
def _env() -> dict[str, str]:
    path = os.pathsep.join(
        filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")])
    )
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _chain(kind: str, folder: Path, out: Path, kills: list[int], *, in_save: bool = False):
    """Worker invocations: run with a kill, resume with the next kill, ..., resume to the end
    (``in_save``: kill ``n``, counted from 0, is in file write ``n`` of the first save at or
    after its iteration)."""
    iters = str(W.SPECS[kind].iters)
    runs = []
    for n, k in enumerate([*kills, None]):
        argv = [kind, str(folder), str(out), "--iters", iters]
        if n:
            argv.append("--resume")
        if k is not None and in_save:
            argv += ["--kill-in-save-after", str(k), "--writes-before-kill", str(n)]
        elif k is not None:
            argv += ["--kill-at", str(k)]
        runs.append({"argv": argv, "list": str(folder)})
    return runs


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """All single-process runs (references and kill chains), forked from one worker process.

    Returns ``{name: {"ref": path, "out": path, "runs": [{"status", "files"}]}}``.
    """
    root = tmp_path_factory.mktemp("crash")
    plan, index = [], {}
    chains = [(kind, kind, False) for kind in SINGLE] + [("mid-save", "shuffle", True)]
    for kind in SINGLE:
        plan.append(
            {"argv": [kind, "-", str(root / f"{kind}_ref.pt"), "--iters", str(W.SPECS[kind].iters)]}
        )
    for name, kind, in_save in chains:
        kills = [k for _, k in KILLS[name]]
        runs = _chain(kind, root / f"{name}_ckpt", root / f"{name}.pt", kills, in_save=in_save)
        index[name] = (len(plan), len(runs), root / f"{kind}_ref.pt", root / f"{name}.pt")
        plan += runs
    (root / "plan.json").write_text(json.dumps(plan))
    cmd = [
        sys.executable,
        str(HERE / "crash_worker.py"),
        "chains",
        str(root / "plan.json"),
        str(root / "result.json"),
        str(CHILD_TIMEOUT_S),
    ]
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the crash worker did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")
    assert proc.returncode == 0, (
        f"crash worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    results = json.loads((root / "result.json").read_text())
    out = {"log": proc.stderr}
    for name, (start, count, ref, final) in index.items():
        out[name] = {"ref": ref, "out": final, "runs": results[start : start + count]}
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    assert path.is_file(), f"{path} was not written"
    return torch.load(path, weights_only=True)


def assert_bitwise_equal(ref: Path, got: Path, context: str) -> None:
    a, b = _load(ref), _load(got)
    assert a.keys() == b.keys(), context
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{context}: {differ} differ from the uninterrupted run"


def _temp_files(files: list[str] | None) -> list[str]:
    return [f for f in files or [] if ".tmp" in f]


def _check_statuses(chain: dict, kills: list[tuple[str, int]], log: str) -> None:
    statuses = [r["status"] for r in chain["runs"]]
    expected = [-signal.SIGKILL] * len(kills) + [0]
    assert statuses == expected, f"kills {kills}: exit statuses {statuses}\n{log[-3000:]}"


# ---------------------------------------------------------------------- single process
def test_kill_points_cover_every_kind_of_place():
    for kind in (*SINGLE, "ddp", "mid-save"):
        its = [k for _, k in KILLS[kind]]
        assert its == sorted(set(its)), kind  # distinct, increasing: each resume passes the next
    for kind in SINGLE:
        wheres = [w for w, _ in KILLS[kind]]
        assert sorted(wheres) == sorted(places(W.SPECS[kind])), kind


@pytest.mark.parametrize("kind", SINGLE)
def test_sigkill_and_resume_is_bitwise_exact(single, kind):
    chain, kills = single[kind], KILLS[kind]
    _check_statuses(chain, kills, single["log"])
    for (where, k), run in zip(kills, chain["runs"]):
        # killed between two checkpoint writes: no temporary file is left behind
        assert not _temp_files(run["files"]), f"killed after {k} ({where}): {run['files']}"
        assert run["files"], f"killed after {k}: no checkpoint to resume from"
    assert_bitwise_equal(chain["ref"], chain["out"], f"{kind}, killed after {kills}")


def test_sigkill_inside_a_checkpoint_write_resumes_from_the_previous_checkpoint(single):
    chain, kills = single["mid-save"], KILLS["mid-save"]
    _check_statuses(chain, kills, single["log"])
    assert_bitwise_equal(chain["ref"], chain["out"], f"shuffle, killed inside the save {kills}")


def test_temporary_file_of_a_killed_write_is_gone_after_the_next_saves(single):
    # a killed write may leave a temporary file (it does with mkstemp + rename); the resumed run
    # writes the same checkpoint files again, and those writes must clear it
    chain = single["mid-save"]
    listings = [r["files"] for r in chain["runs"]]
    first, second, final = (_temp_files(f) for f in listings)
    assert not set(first) & set(second), f"after kill 1: {listings[0]}; after kill 2: {listings[1]}"
    assert chain["runs"][-1]["status"] == 0
    assert not final, f"after the kills: {first}, {second}; at the end: {listings[-1]}"


# ---------------------------------------------------------------------- 2 ranks, torchrun
def _torchrun() -> str | None:
    near = Path(sys.executable).with_name("torchrun")
    if near.is_file():
        return str(near)
    return shutil.which("torchrun")


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie whose parent is gone counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _launch(torchrun: str, argv: list[str], log: Path) -> subprocess.Popen:
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "crash_worker.py"), *argv]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen, folder: Path) -> None:
    """SIGKILL torchrun and every rank it started (ranks run in sessions of their own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for pid_file in folder.glob("*.pid"):
        pid = int(pid_file.read_text())
        pid_file.unlink()
        try:  # only a rank of ours (the pid of one that ended may have been reused)
            ours = b"crash_worker.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            ours = False
        if ours and not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def _kill_job_at_marker(proc: subprocess.Popen, markers: list[Path], log: Path) -> list[int]:
    """Wait until every rank reached its kill point, then SIGKILL torchrun and the ranks."""
    deadline = time.monotonic() + TIMEOUT_S
    while not all(m.is_file() for m in markers):
        if proc.poll() is not None:
            pytest.fail(
                f"torchrun ended (rc {proc.returncode}) before the kill point:\n"
                f"{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no kill point within {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pids = [int(m.read_text()) for m in markers]
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher first: it must not restart or reap
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), f"ranks {pids} survived SIGKILL"
    return pids


def test_ddp_sigkill_and_resume_is_bitwise_exact(tmp_path):
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter nor on PATH")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    spec, kills = W.SPECS["ddp"], KILLS["ddp"]
    folder, out, ref = tmp_path / "ckpt", tmp_path / "ddp.pt", tmp_path / "ddp_ref.pt"
    common = ["ddp", str(folder), str(out), "--iters", str(spec.iters)]
    markers = [Path(f"{out}.killpoint.rank{r}") for r in (0, 1)]
    for n, (where, kill) in enumerate(kills):
        # launch 1 first runs the uninterrupted reference (no checkpoints); then each launch
        # (resuming but the first) is killed once every rank has completed iteration `kill`
        extra = ["--resume"] if n else ["--reference", str(ref)]
        log = tmp_path / f"launch{n + 1}.log"
        proc = _launch(torchrun, [*common, *extra, "--kill-at", str(kill)], log)
        try:
            _kill_job_at_marker(proc, markers, log)
        finally:
            _stop(proc, tmp_path)
        for m in markers:
            m.unlink()
        files = sorted(os.listdir(folder))
        assert files and not _temp_files(files), f"killed after {kill} ({where}): {files}"
    # the last launch resumes to the end in fresh processes
    log = tmp_path / "launch_final.log"
    proc = _launch(torchrun, [*common, "--resume"], log)
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed torchrun did not finish within {TIMEOUT_S} s")
    finally:
        _stop(proc, tmp_path)
    assert rc == 0, f"resumed torchrun failed:\n{log.read_text()[-3000:]}"
    for r in (0, 1):
        assert_bitwise_equal(
            Path(f"{ref}.rank{r}"), Path(f"{out}.rank{r}"), f"ddp rank {r}, killed after {kills}"
        )
