"""Engine overhead: mlopt's Engine against plain PyTorch (``torch.func.functional_call``) on the
same computation, same inputs, identical gradients; CPU, one thread, float32.

Workloads (one unit = one upper update, its lower updates included):

* ``rhg-T``: reverse-mode hypergradient of 128 per-example loss weights through ``T`` SGD steps of
  a 784-256-10 MLP (Franceschi et al. 2017's data reweighting shape), T = 10, 50, 200;
* ``rhg-wd-T``: the same with one log weight decay as the hyperparameter;
* ``hpo-cg``: per-feature log weight decay of a logistic regression (784 features), 100 inner SGD
  steps, then the implicit hypergradient by CG with exactly 10 iterations (``CG(10, tol=None)``).

Each implementation runs in its own process (``--worker``), warms up, and reports the median
time of ``--units`` units; the table gives the median over ``--processes`` processes and the
ratio to the plain implementation, and the peak resident memory the units add above the built
program (``peak_mb``: the process's ``ru_maxrss`` minus its RSS before the first unit; the
allocator's cached blocks count, so it is an upper bound on what the units hold). Before timing,
the first hypergradient of both is compared.

Run::

    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --peers \
        --out docs/results/engine_overhead.json
    python benchmarks/engine_overhead.py --smoke      # seconds, for the tests

``--interleaved R`` also runs every implementation in one process (per process of
``--processes``), one unit of each in turn for ``R`` rounds, and records the median ratio to
plain within a round (``interleaved_ratio``): the between-process variance (allocator layout,
clock) cancels there. ``--peers`` adds TorchOpt and higher (benchmarks/engine_peers.py), run
by the interpreter of the environment that benchmarks/setup_peers.sh builds
(``$MLOPT_PEERS_VENV``, default /work/peers-venv; the interleaved run then uses it for all);
without it they are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_workloads import SMOKE, WORKLOADS  # noqa: E402

__all__ = ["WORKLOADS", "main", "peak_rss_mb", "peers_python", "rss_mb"]


def _factory(name: str, impl: str, smoke: bool):
    if impl in ("plain", "mlopt"):
        plain, engine = (SMOKE if smoke else WORKLOADS)[name]
        return plain if impl == "plain" else engine
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import engine_peers

    return (engine_peers.SMOKE_PEERS if smoke else engine_peers.PEERS)[name][impl]


def peers_python() -> str | None:
    """The peers environment's interpreter (benchmarks/setup_peers.sh), or None."""
    venv = os.environ.get("MLOPT_PEERS_VENV", "/work/peers-venv")
    path = os.path.join(venv, "bin", "python")
    return path if os.path.exists(path) else None


def rss_mb() -> float:
    """This process's resident memory now (Linux ``/proc/self/status``), in MB; 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (``getrusage``; 0 where unavailable)."""
    try:
        import resource
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, impl: str, units: int, smoke: bool) -> dict:
    torch.set_num_threads(1)
    unit = _factory(name, impl, smoke)()
    baseline = rss_mb()  # (model, data and program built; nothing run yet)
    first = unit()
    for _ in range(1 if smoke else 2):  # warm-up
        unit()
    times = []
    for _ in range(units):
        t0 = time.perf_counter()
        unit()
        times.append(time.perf_counter() - t0)
    return {
        "first": first.tolist(),
        "median_s": statistics.median(times),
        "units": units,
        "peak_mb": peak_rss_mb() - baseline,  # the units' peak above the built program
    }


def interleaved_worker(name: str, impls: list[str], units: int, smoke: bool) -> dict:
    """All ``impls`` in one process, one unit of each in turn per round: the ratio of each to
    plain within a round, median over the rounds. Between-process variance (allocator layout,
    frequency) cancels; what is left is each implementation's own work."""
    torch.set_num_threads(1)
    built = {impl: _factory(name, impl, smoke)() for impl in impls}
    for unit in built.values():
        for _ in range(1 if smoke else 3):  # first hypergradient and warm-up
            unit()
    ratios: dict[str, list[float]] = {impl: [] for impl in impls if impl != "plain"}
    for _ in range(units):
        took = {}
        for impl, unit in built.items():
            t0 = time.perf_counter()
            unit()
            took[impl] = time.perf_counter() - t0
        for impl in ratios:
            ratios[impl].append(took[impl] / took["plain"])
    return {impl: statistics.median(r) for impl, r in ratios.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", type=int, default=5, help="timed upper updates per process")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--peers", action="store_true", help="also TorchOpt and higher (peers venv)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also run every implementation in one process, ROUNDS alternating units each",
    )
    p.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        name, impl = args.worker
        if "," in impl:
            out = interleaved_worker(name, impl.split(","), args.units, args.smoke)
        else:
            out = worker(name, impl, args.units, args.smoke)
        print(json.dumps(out))
        return {}
    table = SMOKE if args.smoke else WORKLOADS
    names = args.only or list(table)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict = {"torch": torch.__version__, "threads": 1, "workloads": {}}
    peers_py = peers_python() if args.peers else None
    if args.peers:
        results["peers_python"] = peers_py or "not found: run benchmarks/setup_peers.sh"
    for name in names:
        row: dict = {}
        impls = [("plain", sys.executable), ("mlopt", sys.executable)]
        if args.peers:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import engine_peers

            peers = (engine_peers.SMOKE_PEERS if args.smoke else engine_peers.PEERS).get(name, {})
            impls += [(impl, peers_py) for impl in peers]
        for impl, python in impls:
            if python is None:
                row[impl] = {"skipped": "the peers environment was not found"}
                continue
            runs = []
            for _ in range(args.processes):
                cmd = [python, __file__, "--worker", name, impl, "--units", str(args.units)]
                out = subprocess.run(
                    cmd + (["--smoke"] if args.smoke else []),
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row[impl] = {
                "median_s": statistics.median(r["median_s"] for r in runs),
                "per_process_s": [r["median_s"] for r in runs],
                "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                "first": runs[0]["first"],
            }
        if args.interleaved:
            together = [impl for impl, python in impls if python is not None]
            python = peers_py if len(together) > 2 else sys.executable
            runs = []
            for _ in range(args.processes):
                cmd = [python, __file__, "--worker", name, ",".join(together)]
                cmd += ["--units", str(args.interleaved)] + (["--smoke"] if args.smoke else [])
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            for impl in together[1:]:
                row[impl]["interleaved_ratio"] = statistics.median(r[impl] for r in runs)
            row["interleaved_rounds"] = args.interleaved
        a = torch.tensor(row["plain"]["first"])
        for impl, _ in impls[1:]:
            if "median_s" not in row[impl]:
                continue
            b = torch.tensor(row[impl]["first"])
            row[impl]["first_hypergradient_max_rel_diff"] = float(
                (a - b).abs().max() / a.abs().max()
            )
            row[impl]["ratio"] = row[impl]["median_s"] / row["plain"]["median_s"]
        row["first_hypergradient_max_rel_diff"] = row["mlopt"]["first_hypergradient_max_rel_diff"]
        row["ratio"] = row["mlopt"]["ratio"]
        if "interleaved_ratio" in row["mlopt"]:
            row["interleaved_ratio"] = row["mlopt"]["interleaved_ratio"]
        row["units_per_process"] = args.units
        results["workloads"][name] = row
        shown = ", ".join(
            f"{impl} {row[impl]['median_s'] * 1e3:.1f} ms"
            + (
                ""
                if impl == "plain"
                else f" ({row[impl]['ratio']:.3f}x"
                + (
                    f", {row[impl]['interleaved_ratio']:.3f}x interleaved"
                    if "interleaved_ratio" in row[impl]
                    else ""
                )
                + ", first hypergradient "
                f"rel. diff {row[impl]['first_hypergradient_max_rel_diff']:.1e})"
            )
            for impl, _ in impls
            if "median_s" in row[impl]
        )
        print(f"{name}: {shown}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
