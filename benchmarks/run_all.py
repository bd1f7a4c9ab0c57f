"""Run the CPU benchmarks and write their table into docs/benchmarks.md.

One command for the Engine-overhead table (mlopt, plain PyTorch, TorchOpt and higher in the same
run; benchmarks/engine_overhead.py), written between the markers
``<!-- begin: engine-overhead -->`` and ``<!-- end: engine-overhead -->`` of docs/benchmarks.md
with the machine, the versions and the date, and the raw numbers in
docs/results/engine_overhead.json; then the measured cost model (benchmarks/cost_model.py)
between ``<!-- begin: cost-model -->`` and ``<!-- end: cost-model -->``, raw numbers in
docs/results/cost_model.json. Run it on a quiet machine (nothing else running)::

    OMP_NUM_THREADS=1 python benchmarks/run_all.py             # about 10 minutes
    python benchmarks/run_all.py --from-json docs/results/engine_overhead.json   # re-render

Example (rendering only)::

    text = render({"workloads": {}, "torch": "2.13.0", "machine": "x", "date": "d"})
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

__all__ = ["machine", "render", "write_section", "main"]

LABELS = {
    "rhg-10": "RHG, 128 per-example weights, MLP 784-256-10, T = 10",
    "rhg-50": "RHG, same, T = 50",
    "rhg-200": "RHG, same, T = 200",
    "rhg-wd-10": "RHG, scalar log weight decay, same MLP, T = 10",
    "rhg-wd-50": "RHG, scalar log weight decay, T = 50",
    "rhg-wd-200": "RHG, scalar log weight decay, T = 200",
    "hpo-cg": "implicit HPO: logistic regression (784), 100 inner SGD steps + CG(10, tol=None)",
    "darts": "DARTS step (finite difference, unroll 1), 784-128-10 with 2 mixed layers of 3 ops",
}
IMPLS = ("mlopt", "torchopt", "higher")
BEGIN, END = "<!-- begin: engine-overhead -->", "<!-- end: engine-overhead -->"


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the Python version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _cell(row: dict, impl: str) -> str:
    r = row.get(impl)
    if r is None:
        return "-"
    if "median_s" not in r:
        return "not run"
    mem = f", {r['peak_mb']:.0f} MB" if "peak_mb" in r else ""
    both = f"{r['ratio']:.2f}x"
    if "interleaved_ratio" in r:
        both += f" / {r['interleaved_ratio']:.2f}x"
    return f"{r['median_s'] * 1e3:.1f} ms ({both}{mem})"


def render(results: dict) -> str:
    """The markdown of the engine-overhead table from engine_overhead.py's results."""
    lines = [
        f"Measured {results.get('date', '?')} on {results.get('machine', '?')}; torch "
        f"{results.get('torch', '?')}, one thread, float32; median over "
        f"{results.get('processes', '?')} processes of the median of "
        f"{results.get('units', '?')} timed units after 2 warm-up units. Ratios: time / plain, "
        "each implementation in its own processes / all of them in one process, one unit of "
        f"each in turn ({results.get('interleaved', '?')} rounds, median of the per-round "
        "ratios, median over the processes); MB: peak resident memory the units add above the "
        "built program (median over the processes).",
        "",
        "| workload | plain | mlopt | TorchOpt | higher | first hypergradient vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["workloads"].items():
        diffs = ", ".join(
            f"{impl} {row[impl]['first_hypergradient_max_rel_diff']:.0e}"
            for impl in IMPLS
            if "first_hypergradient_max_rel_diff" in row.get(impl, {})
        )
        plain = f"{row['plain']['median_s'] * 1e3:.1f} ms"
        if "peak_mb" in row["plain"]:
            plain += f", {row['plain']['peak_mb']:.0f} MB"
        cells = " | ".join(_cell(row, impl) for impl in IMPLS)
        lines.append(f"| {LABELS.get(name, name)} | {plain} | {cells} | {diffs} |")
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` in ``path`` by ``text``."""
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: the markers {begin} / {end} are missing")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _: f"{begin}\n{text}{end}", doc)
    with open(path, "w") as f:
        f.write(doc)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-json", default=None, help="render these results, run nothing")
    p.add_argument("--units", type=int, default=5)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--interleaved", type=int, default=7, help="rounds of the one-process run")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "engine_overhead.json"))
    p.add_argument("--cost-out", default=os.path.join(ROOT, "docs", "results", "cost_model.json"))
    p.add_argument("--no-cost-model", action="store_true", help="only the overhead table")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        import engine_overhead

        run = ["--units", str(args.units), "--processes", str(args.processes), "--peers"]
        run += ["--interleaved", str(args.interleaved)]
        results = engine_overhead.main(run + (["--smoke"] if args.smoke else []))
        results.update(
            machine=machine(),
            date=datetime.date.today().isoformat(),
            units=args.units,
            processes=args.processes,
            interleaved=args.interleaved,
        )
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    write_section(args.doc, render(results))
    if not args.no_cost_model:
        import cost_model

        if args.from_json:
            with open(args.cost_out) as f:
                cost = json.load(f)
        else:
            run = ["--units", str(args.units), "--processes", str(args.processes)]
            cost = cost_model.main(run + (["--smoke"] if args.smoke else []))
            cost.update(machine=results.get("machine"), date=results.get("date"))
            with open(args.cost_out, "w") as f:
                json.dump(cost, f, indent=1)
        write_section(args.doc, cost_model.render(cost), cost_model.BEGIN, cost_model.END)
        results["cost_model"] = cost
    return results


if __name__ == "__main__":
    main()
