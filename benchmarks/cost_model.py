"""The cost model measured: each hypergradient method's time per upper update against its
analytic floor, and its peak memory.

Workload: one log weight decay (the upper) of a 784-256-10 MLP fitted by ``T`` SGD steps
(lr 0.1) on 128 examples, validation loss on 128 others (``overhead_workloads.rhg_mlopt`` with
``hyper="decay"``), float32, one thread. The floor is written in units measured with plain
PyTorch in the same process, interleaved with the method's own units:

* ``g``: one lower gradient and SGD update, no graph (a step of the non-differentiable loop);
* ``hvp``: one Hessian-vector product of the lower loss (a graph built once, reused);
* ``up``: the upper's own gradient (the validation loss, forward and backward);
* ``jvp`` (forward mode only): ``torch.func.jvp`` of the update map (forward-over-reverse),
  the price torch.func puts on one forward-mode step; the forward row also gives the floor
  ``T g + T jvp`` (``ratio_jvp``).

Floors (docs/benchmarks.md, "Cost model"): reverse ``T g + T hvp``, checkpointed reverse
``2T g + T hvp`` (every update replayed once), truncated ``T g + K hvp``, CG / MINRES / Neumann /
fixed point with ``K`` iterations ``T g + (K+1) hvp``, finite differences and SAMA ``(T+2) g``,
forward (one upper coordinate) ``T g + T hvp``, first order ``T g``; each plus ``up``. The
ratio time / floor is what the method costs beyond the analytic work: graph building
(``create_graph``), Python, the Engine.

Run::

    OMP_NUM_THREADS=1 python benchmarks/cost_model.py --out docs/results/cost_model.json
    python benchmarks/cost_model.py --smoke

Each method runs in its own processes (``--processes``, median); memory is the units' peak
resident memory above the built program (``ru_maxrss``), as in engine_overhead.py.
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_overhead import peak_rss_mb, rss_mb  # noqa: E402
from overhead_workloads import _rhg_setup, rhg_loss, rhg_mlopt  # noqa: E402

from mlopt.hypergrad import CG, MINRES, FixedPoint, Neumann, Reverse  # noqa: E402

__all__ = ["BEGIN", "END", "METHODS", "floor_units", "main", "measure_units", "render"]

BEGIN, END = "<!-- begin: cost-model -->", "<!-- end: cost-model -->"

K = 10  # iterations of the implicit methods, steps kept by the truncated reverse
#: name -> (Config type, floor in units (g, hvp) as a function of T)
METHODS = {
    "reverse": (lambda: "reverse", lambda T: (T, T)),
    "reverse checkpoint=5": (lambda: Reverse(checkpoint=5), lambda T: (2 * T, T)),
    f"reverse truncate={K}": (lambda: Reverse(truncate=K), lambda T: (T, K)),
    f"cg {K}": (lambda: CG(iterations=K, tol=None), lambda T: (T, K + 1)),
    f"minres {K}": (lambda: MINRES(iterations=K, tol=None), lambda T: (T, K + 1)),
    f"neumann {K}": (lambda: Neumann(iterations=K, alpha=0.1), lambda T: (T, K + 1)),
    f"fixed_point {K}": (lambda: FixedPoint(iterations=K, tol=0.0), lambda T: (T, K + 1)),
    "finite_difference": (lambda: "finite_difference", lambda T: (T + 2, 0)),
    "sama": (lambda: "sama", lambda T: (T + 2, 0)),
    "forward": (lambda: "forward", lambda T: (T, T)),
    "first_order": (lambda: "first_order", lambda T: (T, 0)),
}


def floor_units(d: int, hidden: int):
    """Plain-PyTorch callables for the units ``g``, ``hvp`` and ``up`` on the workload."""
    net, start, xt, yt, xv, yv = _rhg_setup(d, hidden, "decay")
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    value = start.clone().requires_grad_()
    call = torch.func.functional_call

    def lower(ps):
        losses = F.cross_entropy(call(net, ps, (xt,)), yt, reduction="none")
        return rhg_loss("decay", losses, value.detach(), ps.values())

    stepped = {k: v.detach().clone().requires_grad_() for k, v in params.items()}

    def g():  # (its own copy: the HVP's graph holds ``params``)
        grads = torch.autograd.grad(lower(stepped), list(stepped.values()))
        with torch.no_grad():
            for p, q in zip(stepped.values(), grads):
                p.sub_(0.1 * q)

    gw = torch.autograd.grad(lower(params), list(params.values()), create_graph=True)
    v = [torch.randn_like(t) for t in gw]

    def hvp():
        torch.autograd.grad(gw, list(params.values()), v, retain_graph=True)

    def up():
        torch.autograd.grad(F.cross_entropy(call(net, params, (xv,)), yv), list(params.values()))

    def step_map(ps, lam):  # the SGD update as a function of (θ, φ), for torch.func.jvp
        grads = torch.func.grad(lambda q: rhg_loss_of(q, lam))(ps)
        return {k: ps[k] - 0.1 * grads[k] for k in ps}

    def rhg_loss_of(ps, lam):
        losses = F.cross_entropy(call(net, ps, (xt,)), yt, reduction="none")
        return rhg_loss("decay", losses, lam, ps.values())

    plain = {k: t.detach() for k, t in params.items()}
    zeros = {k: torch.zeros_like(t) for k, t in plain.items()}

    def jvp():  # forward-over-reverse by torch.func: what forward mode pays per update
        torch.func.jvp(step_map, (plain, value.detach()), (zeros, torch.ones_like(value)))

    return {"g": g, "hvp": hvp, "up": up, "jvp": jvp}


def measure_units(method: str, T: int, units: int, d: int, hidden: int) -> dict:
    """One process: the method's unit and the floor's units, interleaved, medians."""
    torch.set_num_threads(1)
    floors = floor_units(d, hidden)
    if method != "forward":
        del floors["jvp"]
    mlopt_unit = rhg_mlopt(T, d, hidden, method=METHODS[method][0](), hyper="decay")
    baseline = rss_mb()
    for _ in range(2):
        mlopt_unit()
    peak = peak_rss_mb() - baseline  # (before the floors' own transients)
    for _ in range(2):
        for f in floors.values():
            f()
    took: dict[str, list[float]] = {k: [] for k in ("mlopt", *floors)}
    for _ in range(units):
        for name, f in (("mlopt", mlopt_unit), *floors.items()):
            t0 = time.perf_counter()
            f()
            took[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in took.items()}
    n_g, n_hvp = METHODS[method][1](T)
    floor = n_g * med["g"] + n_hvp * med["hvp"] + med["up"]
    extra = {}
    if "jvp" in med:  # the floor with torch.func's forward-over-reverse price per update
        extra["floor_jvp_s"] = n_g * med["g"] + T * med["jvp"] + med["up"]
        extra["ratio_jvp"] = med["mlopt"] / extra["floor_jvp_s"]
    return {
        **med,
        **extra,
        "floor_s": floor,
        "ratio": med["mlopt"] / floor,
        "peak_mb": peak,
        "floor_units": {"g": n_g, "hvp": n_hvp, "up": 1},
    }


def _floor_text(units: dict) -> str:
    parts = [f"{n} g" if n != 1 else "g" for n in [units["g"]] if n]
    parts += [f"{units['hvp']} hvp"] if units["hvp"] else []
    return " + ".join(parts + ["up"])


def render(results: dict) -> str:
    """The markdown table of :func:`main`'s results (docs/benchmarks.md, "Cost model")."""
    T, units = results["T"], results["methods"]
    lines = [
        f"T = {T} lower updates per upper update, K = {results['K']}; median over "
        f"{results['processes']} processes of the median of {results['units']} units. Units "
        "(plain PyTorch, same process): g = one lower gradient and SGD update, hvp = one "
        "Hessian-vector product, up = the upper's gradient.",
        "",
        "| method | mlopt per upper update | floor | floor (ms) | mlopt / floor | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in units.items():
        ratio = f"{r['ratio']:.2f}x"
        if "ratio_jvp" in r:
            ratio += f" ({r['ratio_jvp']:.2f}x against T g + T jvp: jvp = {r['jvp'] * 1e3:.1f} ms)"
        lines.append(
            f"| {name} | {r['mlopt'] * 1e3:.1f} ms | {_floor_text(r['floor_units'])} | "
            f"{r['floor_s'] * 1e3:.1f} | {ratio} | {r['peak_mb']:.0f} |"
        )
    first = next(iter(units.values()), None)
    if first is not None:
        lines += [
            "",
            f"Units in the first row's processes: g {first['g'] * 1e3:.2f} ms, hvp "
            f"{first['hvp'] * 1e3:.2f} ms, up {first['up'] * 1e3:.2f} ms.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=20, help="lower updates per upper update")
    p.add_argument("--units", type=int, default=5)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    d, hidden = (20, 8) if args.smoke else (784, 256)
    if args.worker:
        print(json.dumps(measure_units(args.worker, args.T, args.units, d, hidden)))
        return {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict = {"torch": torch.__version__, "T": args.T, "K": K, "units": args.units}
    results["processes"], results["methods"] = args.processes, {}
    for method in args.only or list(METHODS):
        runs = []
        for _ in range(args.processes):
            cmd = [sys.executable, __file__, "--worker", method, "--T", str(args.T)]
            cmd += ["--units", str(args.units)] + (["--smoke"] if args.smoke else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "floor_units"}
        row["floor_units"] = runs[0]["floor_units"]
        results["methods"][method] = row
        jvp = f", vs T g + T jvp {row['ratio_jvp']:.2f}x" if "ratio_jvp" in row else ""
        print(
            f"{method}: {row['mlopt'] * 1e3:.1f} ms, floor {row['floor_s'] * 1e3:.1f} ms{jvp} "
            f"({row['ratio']:.2f}x), peak {row['peak_mb']:.0f} MB; units g {row['g'] * 1e3:.2f} "
            f"ms, hvp {row['hvp'] * 1e3:.2f} ms, up {row['up'] * 1e3:.2f} ms"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
