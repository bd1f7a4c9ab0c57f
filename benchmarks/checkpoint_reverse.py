"""Checkpointed reverse against plain reverse on RHG: time, peak memory and recomputed updates.

The workload is ``benchmarks/engine_overhead.py``'s RHG (Franceschi et al. 2017's data
reweighting): 128 per-example loss weights, a 784-256-10 MLP, ``T`` SGD steps per hypergradient,
float32, one thread. One unit = one hypergradient (``T`` engine steps, the upper step included).

What is measured, per method and ``T``:

* **peak memory**: peak resident memory of one unit above the resident memory before it, in a
  fresh process per measurement (after one warm-up unit), with glibc mapping every block of 64
  KiB or more on its own (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave the
  resident set at once; the peak (``VmHWM``) is reset just before the unit through
  ``/proc/self/clear_refs`` (Linux). (The CPU profiler's allocation events, summed in time
  order, under-count here: frees are attributed to the enclosing operator's start.)
* **recomputed updates**: calls of the lower's ``training_step`` per unit beyond the ``T`` of
  the forward pass (deterministic: a cost proxy that a busy machine does not perturb);
* **time**: every method runs in the same process, units interleaved (A, B, A, B, ...), medians,
  reported as ratios to plain reverse. Ratios on a busy machine are indicative only.

Run::

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_reverse.py \
        --out docs/results/checkpoint_reverse.json
    python benchmarks/checkpoint_reverse.py --smoke      # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from mlopt.hypergrad import Reverse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_workloads import rhg_mlopt  # noqa: E402

__all__ = ["rhg_program", "peak_bytes", "memory_worker", "measure", "main"]


def rhg_program(
    method: Reverse, T: int, d: int = 784, hidden: int = 256
) -> tuple[Callable[[], torch.Tensor], dict[str, int]]:
    """``unit() -> hypergradient`` for RHG with ``method`` (the Engine-overhead workload,
    benchmarks/overhead_workloads.py), and a counter of lower losses.

    Example:
        >>> unit, calls = rhg_program(Reverse(checkpoint=2), T=3, d=5, hidden=4)
        >>> unit().shape, calls["n"]
        (torch.Size([128]), 5)
    """
    calls = {"n": 0}
    return rhg_mlopt(T, d, hidden, method=method, calls=calls), calls


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object]) -> float:
    """Peak resident memory of ``fn()`` above the resident memory before it (Linux): the peak
    (``VmHWM``) is reset to the current size (``/proc/self/clear_refs``) just before. Exact for
    tensor memory when large blocks are mapped and unmapped one by one, which
    :func:`memory_worker`'s process arranges (``MALLOC_MMAP_THRESHOLD_``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    return float((_status_kb("VmHWM") - base) * 1024)


def memory_worker(T: int, checkpoint: str, d: int, hidden: int) -> dict:
    """In a fresh process: peak memory and recomputed updates of one unit, after a warm-up."""
    torch.set_num_threads(1)
    method = Reverse(checkpoint=_parse(checkpoint))
    unit, calls = rhg_program(method, T, d, hidden)
    unit()
    before = calls["n"]
    peak = peak_bytes(unit)
    plan = unit.engine.plan.problems["fit"].checkpoint  # as measured (a budget is calibrated)
    return {
        "peak_bytes": peak,
        "recomputed_updates": calls["n"] - before - T,
        "segment": None if plan is None else plan.segment,
        "live_updates": T if plan is None else T - plan.live_from,
    }


def _parse(c: str) -> int | float | str | None:
    if c in ("none", "auto"):
        return None if c == "none" else c
    return float(c) if "." in c else int(c)


def _memory(T: int, checkpoint: str, smoke: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-of", str(T), checkpoint]
    out = subprocess.run(
        cmd + (["--smoke"] if smoke else []), env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(T: int, checkpoints: list[str], units: int, smoke: bool) -> dict:
    """Memory and recomputation (a fresh process each) and interleaved time ratios of
    ``Reverse(checkpoint=c)`` for each ``c`` (``"none"`` first: plain reverse, the reference)."""
    d, hidden = (20, 8) if smoke else (784, 256)
    rows = {c: _memory(T, c, smoke) for c in checkpoints}
    programs = {c: rhg_program(Reverse(checkpoint=_parse(c)), T, d, hidden) for c in checkpoints}
    first = {c: unit() for c, (unit, _) in programs.items()}
    times: dict[str, list[float]] = {c: [] for c in programs}
    for _ in range(units):  # interleaved: A, B, A, B, ...
        for c, (unit, _) in programs.items():
            t0 = time.perf_counter()
            unit()
            times[c].append(time.perf_counter() - t0)
    ref = checkpoints[0]
    ref_time = statistics.median(times[ref])
    for c, row in rows.items():
        row["median_s"] = statistics.median(times[c])
        row["time_ratio"] = row["median_s"] / ref_time
        ref_peak = rows[ref]["peak_bytes"]
        row["memory_ratio"] = row["peak_bytes"] / ref_peak if ref_peak else None
        diff = (first[c] - first[ref]).abs().max() / first[ref].abs().max()
        row["first_hypergradient_max_rel_diff"] = float(diff)
    return {"T": T, "updates_per_unit": T, "timed_units": units, "methods": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="*", default=[50, 200])
    p.add_argument(
        "--checkpoint",
        nargs="*",
        default=["auto", "sqrt", "14"],
        help="Reverse(checkpoint=...) values: k, a budget like 0.4, 'auto', or 'sqrt' (round √T)",
    )
    p.add_argument("--units", type=int, default=5, help="timed units per method")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--memory-of", nargs=2, metavar=("T", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    d, hidden = (20, 8) if args.smoke else (784, 256)
    if args.memory_of:
        print(json.dumps(memory_worker(int(args.memory_of[0]), args.memory_of[1], d, hidden)))
        return {}
    torch.set_num_threads(1)
    Ts = [4] if args.smoke else args.T
    if args.smoke:
        args.checkpoint = ["2"]
    units = 1 if args.smoke else args.units
    results: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "workload": "RHG: 128 per-example weights, MLP 784-256-10, SGD lr 0.1, float32",
        "memory": "peak RSS above the RSS before one unit (VmHWM reset by /proc/self/clear_refs), "
        "a fresh process per measurement, MALLOC_MMAP_THRESHOLD_=65536, after one warm-up unit",
        "recomputed_updates": "lower training_step calls per unit beyond the T of the forward pass",
        "time": "interleaved units in one process, medians (valid on a quiet machine only)",
        "quiet": os.environ.get("MLOPT_BENCH_QUIET", "unknown"),
        "runs": [],
    }
    for T in Ts:
        cs = ["none"] + [str(round(T**0.5)) if c == "sqrt" else c for c in args.checkpoint]
        run = measure(T, list(dict.fromkeys(cs)), units, args.smoke)
        results["runs"].append(run)
        for c, row in run["methods"].items():
            mem = row["memory_ratio"]
            print(
                f"T={T} checkpoint={c}: {row['median_s'] * 1e3:.0f} ms ({row['time_ratio']:.2f}x), "
                f"peak {row['peak_bytes'] / 2**20:.1f} MiB ({mem or 0:.2f}x), "
                f"recomputed {row['recomputed_updates']}, rel. diff "
                f"{row['first_hypergradient_max_rel_diff']:.1e}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
