"""Worker for tests/test_crash_resume.py: a small bilevel program that can SIGKILL itself.

Usage::

    python crash_worker.py KIND CKPT_DIR OUT --iters N [--resume] [--kill-at K]
                           [--kill-in-save-after K [--writes-before-kill M]]
    torchrun --standalone --nproc_per_node 2 crash_worker.py ddp CKPT_DIR OUT ...
    python crash_worker.py chains PLAN.json RESULT.json TIMEOUT_S   # runs forked: see chains()

``KIND`` picks the program (all float64, tiny modules, a few milliseconds per iteration, several
epochs of every loader within the run):

- ``shuffle``: reverse-mode HPO whose loaders are ``DataLoader(shuffle=True)`` without a
  generator (the order comes from torch's global generator);
- ``generator``: the same program with ``DataLoader(shuffle=True, generator=...)``;
- ``bda``: a :class:`~mlopt.dynamics.BDAProblem` lower whose upper has a shuffled loader (BDA
  draws ``F``'s batches from it through a stream of its own);
- ``ddp``: the ``shuffle`` program under ``torchrun`` with 2 ranks (gloo), ``strategy="ddp"``.

The run checkpoints into ``CKPT_DIR`` every ``SPECS[KIND].checkpoint_step`` iterations
(the Engine moves a save inside an unroll window to the window's end) and, with ``--resume``,
starts from the latest checkpoint there (``EngineConfig(resume=True)``). At the end it writes
``torch.save({name: tensor})`` of everything that must match an uninterrupted run bit for bit
(module parameters and buffers, optimizer and scheduler state, the loaders' own generators,
torch's global generator, counters) to ``OUT`` (under ddp: ``OUT.rank<r>``).

Crashes (a real ``SIGKILL``: no ``finally``, no ``atexit``, no flushing):

- ``--kill-at K``: once iteration ``K`` is complete (its validation and checkpoint included),
  before iteration ``K + 1`` starts. Single process: the process kills itself. Under ddp every
  rank writes ``OUT.killpoint.rank<r>`` holding its pid and waits; the test SIGKILLs torchrun
  and the ranks (so all ranks stop at exactly iteration ``K``). Each rank also writes its pid to
  ``OUT.rank<r>.pid`` when it starts.
- ``--kill-in-save-after K``: in the middle of the first ``torch.save`` to a file made once
  iteration ``K`` is complete (a checkpoint write; ``--writes-before-kill M``: let ``M`` such
  writes complete first, e.g. 1 for the second file of a checkpoint, ``last.pt``): half of the
  bytes are written to the file, then the process kills itself (single process only).

Example:
    >>> SPECS["shuffle"].unroll, SPECS["shuffle"].lower_batches
    (2, 3)
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlopt
from mlopt.dynamics import BDA, BDAProblem

__all__ = ["KINDS", "SPECS", "Spec", "build", "final_state", "main"]

F64 = torch.float64
KINDS = ("shuffle", "generator", "bda", "ddp")
_REAL_SAVE = torch.save  # the worker's own output never goes through the crash hook
ORPHAN_S = 120.0  # a ddp rank waiting at its kill point kills itself after this long


@dataclass(frozen=True)
class Spec:
    """The shape of a program's schedule, for choosing kill points.

    Attributes:
        iters: iterations of an uninterrupted run.
        unroll: the lower's unroll window (the upper steps at every multiple of it).
        checkpoint_step: ``EngineConfig.checkpoint_step``.
        lower_batches: batches per epoch of the lower's loader.
        draws_per_iter: batches the lower's stream yields per iteration (the world size: every
            rank walks the whole stream and keeps its share).
        upper_batches: batches per epoch of the upper's loader.
    """

    iters: int
    unroll: int
    checkpoint_step: int
    lower_batches: int
    draws_per_iter: int = 1
    upper_batches: int = 3


SPECS = {
    # lower: 8 samples / batch 3 -> 3 batches (3, 3, 2); upper: 5 / 2 -> 3 batches (2, 2, 1)
    "shuffle": Spec(iters=24, unroll=2, checkpoint_step=1, lower_batches=3),
    "generator": Spec(iters=24, unroll=2, checkpoint_step=1, lower_batches=3),
    # lower: 10 / 3 -> 4 batches (3, 3, 3, 1); upper: 9 / 2 -> 5 batches, BDA's stream draws one
    # per lower update (epochs every 5 updates), the upper's own one per window
    "bda": Spec(iters=24, unroll=3, checkpoint_step=2, lower_batches=4, upper_batches=5),
    # lower: 12 / 2 -> 6 batches, 2 drawn per iteration (one per rank): an epoch every 3
    # iterations; upper: 8 / 2 -> 4 batches, 2 per upper step
    "ddp": Spec(iters=16, unroll=2, checkpoint_step=4, lower_batches=6, draws_per_iter=2),
}


def _regression(seed: int, n: int, d: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(d, 1, generator=g, dtype=F64)
    return TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64))


class _Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([value], dtype=F64))


def _decay(problem: mlopt.Problem) -> torch.Tensor:
    """Weight decay exp(log-decay of the upper) times the squared weights of ``problem``."""
    return (
        0.5
        * torch.exp(problem.hp.module.weight).sum()
        * sum((p**2).sum() for p in problem.parameters())
    )


class Fit(mlopt.Problem):
    """Lower: noisy MSE (the noise comes from torch's global generator) plus the upper's decay."""

    def training_step(self, batch):
        x, y = batch
        noise = 0.01 * torch.randn(y.shape, dtype=F64)  # the global stream must resume too
        return ((self.module(x) + noise - y) ** 2).mean() + _decay(self)


class BDAFit(BDAProblem):
    """BDA lower: f is Fit's loss; F is the upper's loss on a batch of the upper's loader."""

    def lower_loss(self, batch):
        x, y = batch
        noise = 0.01 * torch.randn(y.shape, dtype=F64)
        return ((self.module(x) + noise - y) ** 2).mean() + _decay(self)


class HP(mlopt.Problem):
    """Upper: validation MSE of the lower's current model."""

    def training_step(self, batch):
        x, y = batch
        return ((self.fit(x) - y) ** 2).mean() + 1e-3 * (self.module.weight**2).sum()


class CrashEngine(mlopt.Engine):
    """An Engine that crashes before the iteration after ``kill_at`` (see the module notes)."""

    kill_at: int | None = None
    marker: str | None = None

    def step(self) -> list[str]:
        if self.kill_at is not None and self.iteration == self.kill_at:
            _crash(self.marker)
        return super().step()


def _write_pid(path: str) -> None:
    """Write this process's pid to ``path`` atomically."""
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def _crash(marker: str | None) -> None:
    if marker is not None:  # ddp: tell the test, which SIGKILLs every rank and torchrun
        _write_pid(marker)
        deadline = time.monotonic() + ORPHAN_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_crash_in_save(engine: mlopt.Engine, after: int, skip: int) -> None:
    """SIGKILL in the middle of the ``skip + 1``-th torch.save to a file once iteration
    ``after`` is complete."""
    passed = 0

    def crashing_save(obj, f, *args, **kwargs):
        nonlocal passed
        if engine.iteration < after or isinstance(f, io.BytesIO):  # in-memory: not a write
            return _REAL_SAVE(obj, f, *args, **kwargs)
        if passed < skip:
            passed += 1
            return _REAL_SAVE(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        _REAL_SAVE(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(half)
                out.flush()
                os.fsync(out.fileno())
        else:
            f.write(half)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = crashing_save


def _loader(dataset: TensorDataset, batch: int, seed: int | None) -> DataLoader:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch, shuffle=True, generator=gen)


def build(kind: str, ckpt_dir: str | None, iters: int, resume: bool) -> CrashEngine:
    """The program ``kind`` (built from scratch: every run starts from the same objects);
    ``ckpt_dir=None``: no checkpoints."""
    if kind not in KINDS:
        raise SystemExit(f"unknown kind {kind!r}; use one of {KINDS}")
    spec = SPECS[kind]
    torch.manual_seed(1)  # module initialisation
    net = nn.Linear(3, 1).double()
    hp_mod = _Scalar(-2.0)
    seeds = (11, 12) if kind == "generator" else (None, None)
    if kind == "ddp":
        low_data, up_data = (
            _loader(_regression(0, 12), 2, None),
            _loader(_regression(1, 8), 2, None),
        )
    elif kind == "bda":
        low_data, up_data = (
            _loader(_regression(0, 10), 3, None),
            _loader(_regression(1, 9), 2, None),
        )
    else:
        low_data = _loader(_regression(0, 8), 3, seeds[0])
        up_data = _loader(_regression(1, 5), 2, seeds[1])
    cfg = mlopt.Config(type="reverse", unroll_steps=spec.unroll)
    low_opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if kind == "bda":
        fit = BDAFit("fit", net, low_opt, low_data, cfg, bda=BDA(upper="hp", alpha=0.5))
    else:
        fit = Fit("fit", net, low_opt, low_data, cfg)
    hp_opt = torch.optim.Adam(hp_mod.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(hp_opt, step_size=3, gamma=0.7)
    hp = HP("hp", hp_mod, hp_opt, up_data, scheduler=sched)
    config = mlopt.EngineConfig(
        train_iters=iters,
        seed=0,
        strategy="ddp" if kind == "ddp" else "cpu",
        checkpoint_dir=ckpt_dir,
        checkpoint_step=spec.checkpoint_step if ckpt_dir is not None else 0,
        resume=True if resume else None,
    )
    return CrashEngine([hp, fit], {"u2l": {hp: [fit]}, "l2u": {fit: [hp]}}, config)


def final_state(engine: mlopt.Engine) -> dict[str, torch.Tensor]:
    """Every tensor that must match an uninterrupted run bit for bit."""
    out: dict[str, torch.Tensor] = {}
    for name, problem in engine.problems_by_name.items():
        st = engine.state(name)  # the real module and optimizer (problem.module is a view)
        for key, value in st.module.state_dict().items():
            out[f"{name}.module.{key}"] = value.detach().clone()
        for index, state in st.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{name}.optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
        out[f"{name}.lr"] = torch.tensor([g["lr"] for g in st.optimizer.param_groups])
        if st.scheduler is not None:
            out[f"{name}.scheduler.last_epoch"] = torch.tensor(st.scheduler.last_epoch)
        loader = problem.train_data_loader
        if getattr(loader, "generator", None) is not None:
            out[f"{name}.loader_generator"] = loader.generator.get_state()
    out["rng.torch"] = torch.get_rng_state()
    out["iteration"] = torch.tensor(engine.iteration)
    out["steps"] = torch.tensor([engine.step_counts[n] for n in sorted(engine.step_counts)])
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("ckpt_dir", help="checkpoint folder ('-': an uninterrupted run without)")
    parser.add_argument("out")
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--kill-in-save-after", type=int, default=None)
    parser.add_argument("--writes-before-kill", type=int, default=0)
    parser.add_argument(
        "--reference",
        default=None,
        help="first run the program uninterrupted and without checkpoints, saved here",
    )
    return parser


def _run(kind: str, ckpt_dir: str | None, out: str, iters: int, resume: bool, args) -> None:
    engine = build(kind, ckpt_dir, iters, resume)
    rank = engine.distributed.rank if engine.distributed is not None else None
    if rank is not None:
        out = f"{out}.rank{rank}"
        _write_pid(f"{out}.pid")  # the test kills what is left of a failed launch
    if args is not None:
        engine.kill_at = args.kill_at
        if rank is not None:
            engine.marker = f"{args.out}.killpoint.rank{rank}"
        if args.kill_in_save_after is not None:
            if rank is not None:
                raise SystemExit("--kill-in-save-after is for single-process runs")
            _arm_crash_in_save(engine, args.kill_in_save_after, args.writes_before_kill)
    engine.run()
    _REAL_SAVE(final_state(engine), out)


def main(argv: list[str] | None = None) -> None:
    """One run (see the module notes)."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.reference is not None:
        _run(args.kind, None, args.reference, args.iters, False, None)
    ckpt = None if args.ckpt_dir == "-" else args.ckpt_dir
    _run(args.kind, ckpt, args.out, args.iters, args.resume, args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def chains(plan_path: str, result_path: str, timeout_s: int) -> None:
    """Run the worker invocations listed in ``plan_path`` one after another, each in a forked
    child process (so that torch is imported once); write each child's fate to ``result_path``.

    The plan is a JSON list of ``{"argv": [...], "list": folder or null}``; the result is a JSON
    list of ``{"status": exit code, or -signal number, "files": sorted listing of "list" right
    after the child ended}``. A child that runs longer than ``timeout_s`` gets SIGALRM.
    """
    import contextlib
    import json

    with contextlib.suppress(ImportError):  # what the first torch.optim use imports: once, here
        import torch._dynamo  # noqa: F401

    with open(plan_path) as f:
        plan = json.load(f)
    results = []
    for entry in plan:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one training process
            code = 1
            try:
                signal.alarm(timeout_s)
                main(entry["argv"])
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        folder = entry.get("list")
        files = sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else None
        results.append({"status": code, "files": files})
    with open(result_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["chains"]:
        chains(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main(sys.argv[1:])
