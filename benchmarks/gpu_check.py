"""GPU check: the CUDA tests and the GPU figures of mlopt in one run, written to one JSON file.

Sections (each written to the JSON as soon as it is done, so a run cut short keeps the rest):

- ``tests`` (``--pytest``): ``pytest -m cuda tests/test_cuda.py``: exit code, summary, failures.
- ``maml``: second-order MAML, Conv4 (64 filters, transductive batch norm), 5-way 1-shot with 15
  queries per class, 5 inner SGD steps (lr 0.4), meta-batch 16, float32: seconds per
  meta-iteration (median) and peak CUDA memory of the mlopt Engine (the bilevel program), the
  ``mlopt.meta`` vmap and loop paths, and higher / TorchOpt where they import ("not installed"
  otherwise). The implementations are ``benchmarks/maml_benchmark.py``'s; every one first
  computes a float64 meta-gradient on the device that must match plain autograd.
- ``rhg``: reverse-mode hypergradient of 128 per-example loss weights through T=200 SGD steps of
  a 784-256-10 MLP (``benchmarks/engine_overhead.py``'s RHG workload) with ``Reverse()`` and
  ``Reverse(checkpoint=k)``: seconds per hypergradient, peak CUDA memory, and the agreement of
  the hypergradients.
- ``amp``: for each hypergradient method of ``tests/test_cuda.py`` (an HPO program), the relative
  error of the first hypergradient under ``Config(precision="bf16")`` against float32 and both
  against float64, all on the device.
- ``host_syncs`` (CUDA): synchronizing CUDA calls per method during one window
  (``torch.cuda.set_sync_debug_mode``); the documented ones are the non-finite guard of each
  update, solver stopping tests and the finite-difference step sizes.

Timing: ``torch.cuda.synchronize()`` around every timed call, a warm-up, median of ``--repeats``.
Memory: ``torch.cuda.max_memory_allocated()`` during the call, minus the allocation before it.

Run (on a machine with an NVIDIA GPU, < 8 minutes; or ``bash benchmarks/gpu_check.sh``)::

    python benchmarks/gpu_check.py --pytest --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/g.json   # seconds, CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "benchmarks"), str(_ROOT / "tests"), str(_ROOT)]

import maml_benchmark as mb  # noqa: E402
from test_cuda import METHODS, first_hypergradient, hpo_program, relative_error  # noqa: E402

import mlopt  # noqa: E402
from mlopt.data import EpisodicSampler, Task  # noqa: E402
from mlopt.hypergrad import Reverse  # noqa: E402
from mlopt.models import Conv4  # noqa: E402
from mlopt.testing import capture_gradients  # noqa: E402

__all__ = ["main", "maml_section", "rhg_section", "amp_section", "host_syncs_section"]


# ---------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """One warm-up call, then ``repeats`` synchronized calls: median and all times (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "all_s": times}


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before (MiB)."""
    if device.type != "cuda":
        return None  # (CPU peak memory: benchmarks/maml_benchmark.py measures RSS per process)
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------- MAML
def run_torchopt(net: nn.Module, tasks: list, steps: int, lr: float) -> list[torch.Tensor]:
    """TorchOpt's MAML example: ``MetaSGD`` steps on the module, state recovered per task."""
    import torchopt

    net.zero_grad(set_to_none=True)
    inner = torchopt.MetaSGD(net, lr=lr)
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner, by="reference")
    for sx, sy, qx, qy in tasks:
        for _ in range(steps):
            inner.step(F.cross_entropy(net(sx), sy))
        (F.cross_entropy(net(qx), qy) / len(tasks)).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner, opt_state)
    return [p.grad for p in net.parameters()]


def run_engine(net: nn.Module, tasks: list, steps: int, lr: float) -> list[torch.Tensor]:
    """maml_benchmark's Engine program (it asks for ``strategy="cpu"``) on the net's device."""
    device = next(net.parameters()).device
    with mock.patch("mlopt.engine.choose_device", lambda run: device):
        return mb.run_mlopt_engine(net, tasks, steps, lr)


MAML: dict[str, Callable[..., list[torch.Tensor]]] = {
    "mlopt-engine": run_engine,
    "mlopt-vmap": mb.run_mlopt("vmap"),
    "mlopt-loop": mb.run_mlopt("loop"),
    "higher": mb.run_higher,
    "torchopt": run_torchopt,
}


def _maml_tasks(args: argparse.Namespace, device: torch.device) -> tuple[list[Task], str]:
    """Omniglot tasks from the minimal splits when found (not in smoke mode), else random images
    of the same shapes (the timings and memory do not depend on the pixels)."""
    tasks, source = [], "random images (smoke)"
    if not args.smoke:
        try:
            from mlopt.meta.omniglot import load_minimal_splits

            sampler = EpisodicSampler(load_minimal_splits(args.data), 5, 1, args.queries, seed=0)
            tasks, source = [sampler[i] for i in range(args.meta_batch)], "omniglot"
        except (OSError, ValueError, mlopt.MLOptError) as err:
            tasks, source = [], f"random images (Omniglot not read from {args.data}: {err})"
    if args.smoke or not tasks:
        g, ys, q = torch.Generator().manual_seed(0), torch.arange(5), args.queries
        images = [torch.rand(5 * (1 + q), 1, 28, 28, generator=g) for _ in range(args.meta_batch)]
        tasks = [Task(x[:5], ys, x[5:], ys.repeat_interleave(q)) for x in images]
    return [Task(*(t.to(device) for t in task)) for task in tasks], source


def maml_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    tasks, source = _maml_tasks(args, device)
    torch.manual_seed(0)
    small = Conv4(1, 5, hidden=8).double().to(device)
    t64 = [Task(*(t.double() if t.is_floating_point() else t for t in task)) for task in tasks[:2]]
    ref = mb.reference(small, t64, 2, 0.4)
    torch.manual_seed(0)
    net = Conv4(1, 5, hidden=args.hidden).to(device)
    rows: dict[str, Any] = {}
    for name, fn in MAML.items():
        try:
            got = fn(copy.deepcopy(small), t64, 2, 0.4)
        except ImportError:
            rows[name] = "not installed"
            continue
        except Exception as err:  # a peer that breaks on this torch: say so, time the rest
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        diff = max(float((g - r).abs().max()) for g, r in zip(got, ref))
        row: dict[str, Any] = {"agreement_f64": diff, "agrees": diff < 1e-10}  # (else: no MAML)
        row["on_device"] = all(g.device.type == device.type for g in got)

        def call(fn: Callable = fn) -> None:
            fn(copy.deepcopy(net), tasks, args.steps, 0.4)

        row.update(timed(call, device, args.repeats))
        row["peak_mb"] = peak_mb(call, device)
        rows[name] = row
        print(f"maml {name}: {row['median_s']:.4f} s, peak {row['peak_mb']} MB", flush=True)
    workload = {"ways": 5, "shots": 1, "queries": args.queries, "meta_batch": args.meta_batch}
    workload.update({"steps": args.steps, "hidden": args.hidden, "data": source})
    return {"workload": workload, "results": rows}


# ---------------------------------------------------------------------- RHG and checkpointing
class _Fit(mlopt.Problem):
    def training_step(self, batch: tuple) -> torch.Tensor:
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return (torch.sigmoid(self.reweight.module.weights) * losses).mean()


class _Reweight(mlopt.Problem):
    def training_step(self, batch: tuple) -> torch.Tensor:
        return F.cross_entropy(self.fit(batch[0]), batch[1])


def rhg_unit(method: Any, T: int, device: torch.device, d: int, hidden: int) -> Callable:
    """``unit() -> hypergradient``: T Engine steps of the lower, then one upper step."""
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(128, d, generator=g), torch.randint(0, 10, (128,), generator=g))
    val = (torch.randn(128, d, generator=g), torch.randint(0, 10, (128,), generator=g))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    hyper = nn.Module()
    hyper.weights = nn.Parameter(torch.zeros(128))
    cfg = mlopt.Config(type=method, unroll_steps=T)
    fit = _Fit("fit", net, torch.optim.SGD(net.parameters(), lr=0.1), [train], cfg)
    up_opt = torch.optim.SGD(hyper.parameters(), lr=1.0)
    up = _Reweight("reweight", hyper, up_opt, [val])
    seen = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [up, fit],
        {"u2l": {up: [fit]}, "l2u": {fit: [up]}},
        mlopt.EngineConfig(train_iters=10**9, progress=False, device=str(device)),
    )

    def unit() -> torch.Tensor:
        for _ in range(T):
            engine.step()
        return seen[-1][0]

    return unit


def rhg_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rows, first = {}, {}
    variants = {"reverse": Reverse()}
    variants.update({f"checkpoint={k}": Reverse(checkpoint=k) for k in args.checkpoint})
    for name, method in variants.items():
        unit = rhg_unit(method, args.T, device, args.d, args.hidden_rhg)
        first[name] = unit().detach().clone()  # also the warm-up
        row: dict[str, Any] = {"peak_mb": peak_mb(unit, device)}
        row.update(timed(unit, device, args.repeats))
        row["first_hypergradient_rel_diff"] = relative_error(first[name], first["reverse"])
        rows[name] = row
        print(f"rhg {name}: {row['median_s']:.3f} s, peak {row['peak_mb']} MB", flush=True)
    workload = {"T": args.T, "mlp": [args.d, args.hidden_rhg, 10], "examples": 128}
    return {"workload": workload, "results": rows}


# ---------------------------------------------------------------------- AMP and host syncs
def amp_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size = dict(args.amp_size)
    rows = {}
    for name in sorted(METHODS):
        ref = first_hypergradient(name, device, torch.float64, **size)
        fp32 = first_hypergradient(name, device, torch.float32, **size)
        bf16 = first_hypergradient(name, device, torch.float32, precision="bf16", **size)
        rows[name] = {
            "bf16_vs_fp32": relative_error(bf16, fp32),
            "bf16_vs_fp64": relative_error(bf16, ref),
            "fp32_vs_fp64": relative_error(fp32, ref),
            "hypergradient_norm_fp64": float(ref.norm()),
        }
        print(f"amp {name}: {rows[name]}", flush=True)
    return {"workload": size, "results": rows}


def host_syncs_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"results": None, "note": "CUDA only (torch.cuda.set_sync_debug_mode)"}
    size = dict(args.amp_size)
    rows = {}
    for name in sorted(METHODS):
        factory, options = METHODS[name]
        options = {**options, **size}
        engine, _ = hpo_program(factory(), device=device, **options)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                engine.run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        updates = sum(engine.update_counts.values())
        rows[name] = {"syncs": len(syncs), "updates": updates, "where": where}
    return {"results": rows}


# ---------------------------------------------------------------------- the run
def run_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    cmd.append(str(_ROOT / "tests" / "test_cuda.py"))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, cwd=_ROOT, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        return {
            "returncode": None,
            "summary": f"timed out after {timeout} s",
            "tail": str(err.stdout)[-4000:],
        }
    lines = out.stdout.strip().splitlines()
    return {
        "returncode": out.returncode,
        "summary": lines[-1] if lines else "",
        "failed": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
        "tail": (out.stdout + out.stderr)[-4000:],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = os.path.join(os.environ.get("OUT") or ".", "gpu_check.json")
    p.add_argument("--out", default=default, help="the JSON file ($OUT/gpu_check.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU)")
    p.add_argument(
        "--pytest", action="store_true", help="first run pytest -m cuda tests/test_cuda.py"
    )
    p.add_argument("--only", nargs="*", default=["maml", "rhg", "amp", "host_syncs"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", default=str(mb._DATA), help="the Omniglot folder (minimal splits)")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--T", type=int, default=200)
    p.add_argument("--checkpoint", type=int, nargs="*", default=[10, 50])
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--hidden-rhg", type=int, default=256)
    args = p.parse_args(argv)
    args.amp_size = {"d": 64, "hidden": 128, "n": 256, "batch": 64}
    if args.smoke:
        args.repeats, args.meta_batch, args.steps, args.queries, args.hidden = 1, 2, 1, 2, 8
        args.T, args.checkpoint, args.d, args.hidden_rhg = 4, [2], 16, 8
        args.amp_size = {"d": 4, "hidden": 8, "n": 16, "batch": 8}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "python": platform.python_version(),
        "smoke": args.smoke,
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "figures_measured_on_a_gpu": device.type == "cuda",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=2, default=str))

    if args.pytest:
        result["tests"] = run_tests(timeout=240)
        print("tests:", result["tests"]["summary"], flush=True)
        save()
    sections = {
        "maml": maml_section,
        "rhg": rhg_section,
        "amp": amp_section,
        "host_syncs": host_syncs_section,
    }
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # (small-op loops stall with two threads on these machines)
    try:
        for name in args.only:
            try:
                result[name] = sections[name](args, device)
            except Exception as err:  # keep the other sections' figures
                result[name] = {"error": f"{type(err).__name__}: {err}"}
                print(f"{name}: {type(err).__name__}: {err}", flush=True)
            save()
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {out} ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
