"""Accuracy and cost of every hypergradient method, against the exact (IFT) hypergradient.

Two problems, float64, through the public Problem/Engine API:

* ridge: per-feature log weight decay of a ridge regression (``mlopt.testing.RidgeHPO``); the
  exact hypergradient is the implicit-function-theorem one at the exact solution.
* mlp: per-tensor log weight decay of a 2-layer tanh MLP regression; the lower problem is solved
  to a gradient norm below 1e-10 (L-BFGS) and the exact hypergradient uses the dense Hessian.

Implicit methods (cg, neumann, fixed_point) start the lower at the solution and vary their solver
iterations; unrolled methods (reverse, truncated and checkpointed reverse, forward, first_order,
finite_difference, sama) start from a fixed initial point and vary the unroll length T (lr = 1/L).
For each: relative error and cosine to the exact hypergradient, median wall time of one
hypergradient (one upper step, lower updates included), and peak tensor memory (CUDA: max
allocated; CPU: the running sum of the profiler's allocation events). When betty-ml is
importable (the peers environment, see benchmarks/README.md), Betty 0.2.1's darts, neumann and cg
run on the same ridge problem in the same process.

Run::

    python benchmarks/hypergrad_accuracy.py                 # mlopt only
    .peers-venv/bin/python benchmarks/hypergrad_accuracy.py --out table.md   # with Betty
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import mlopt
from mlopt.hypergrad import CG, SAMA, FiniteDifference, FixedPoint, Forward, Neumann, Reverse
from mlopt.testing import RidgeHPO, capture_gradients

F64 = torch.float64


class Vector(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone())


class RidgeLower(mlopt.Problem):
    def training_step(self, batch):
        return self.task.lower_loss(self.module.weight, self.hyper.module.weight)


class RidgeUpper(mlopt.Problem):
    def training_step(self, batch):
        return self.task.upper_loss(self.lower.module.weight)


class MLPTask:
    """Per-tensor log weight decay of a small tanh MLP regression."""

    def __init__(self, seed: int = 0, n: int = 64, d: int = 8, hidden: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x_tr, self.x_val = (torch.randn(n, d, generator=g, dtype=F64) for _ in range(2))
        w = torch.randn(d, 1, generator=g, dtype=F64)
        self.y_tr = torch.tanh(self.x_tr @ w) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
        self.y_val = torch.tanh(self.x_val @ w) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(F64)
        self.names = [k for k, _ in self.net.named_parameters()]
        self.shapes = [p.shape for p in self.net.parameters()]
        self.init = torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])

    def unflat(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(self.names, self.shapes):
            n = math.prod(s)
            out[k] = flat[i : i + n].reshape(s)
            i += n
        return out

    def predict(self, flat, x):
        return torch.func.functional_call(self.net, self.unflat(flat), (x,))

    def lower_loss(self, flat, lam):
        fit = 0.5 * ((self.predict(flat, self.x_tr) - self.y_tr) ** 2).mean()
        decay = sum(lam[i].exp() * t.pow(2).sum() for i, t in enumerate(self.unflat(flat).values()))
        return fit + 0.5 * decay

    def upper_loss(self, flat):
        return 0.5 * ((self.predict(flat, self.x_val) - self.y_val) ** 2).mean()

    def solution(self, lam):
        w = self.init.clone().requires_grad_()
        opt = torch.optim.LBFGS(
            [w],
            max_iter=5000,
            tolerance_grad=1e-13,
            tolerance_change=0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = self.lower_loss(w, lam)
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    def hessian(self, lam):
        w = self.solution(lam)
        return torch.autograd.functional.hessian(lambda v: self.lower_loss(v, lam), w)

    def hypergradient(self, lam):
        w = self.solution(lam).requires_grad_()
        lam = lam.clone().requires_grad_()
        v = torch.autograd.grad(self.upper_loss(w), w)[0]
        H = torch.autograd.functional.hessian(
            lambda u: self.lower_loss(u, lam.detach()), w.detach()
        )
        z = torch.linalg.solve(H, v)
        g = torch.autograd.grad(self.lower_loss(w, lam), w, create_graph=True)[0]
        return -torch.autograd.grad(g @ z, lam)[0]


def run_mlopt(task, lam, method, w0, lr, steps):
    """One hypergradient through the Engine; returns it."""
    low, hyp = Vector(w0), Vector(lam)
    lower = RidgeLower(
        "lower",
        low,
        torch.optim.SGD(low.parameters(), lr=lr),
        config=mlopt.Config(type=method, unroll_steps=steps),
    )
    opt = torch.optim.SGD(hyp.parameters(), lr=0.0)
    upper = RidgeUpper("hyper", hyp, opt)
    lower.task = upper.task = task
    seen = capture_gradients(opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=steps, strategy="cpu"),
    ).run()
    return seen[0][0]


def run_betty(task, lam, kind, w_star, lr, iterations, alpha):
    """Betty 0.2.1's hypergradient on the ridge task, lower at its solution."""
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    logging.disable(logging.CRITICAL)
    seen = []

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            return task.lower_loss(self.module.weight, self.outer.module.weight)

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            return task.upper_loss(self.inner.module.weight)

        def grad_callback(self):
            seen.append(self.module.weight.grad.detach().clone())

    low, hyp = Vector(w_star), Vector(lam)
    opts = {
        "darts": {},
        "neumann": {"neumann_iterations": iterations, "neumann_alpha": alpha},
        "cg": {"cg_iterations": iterations},
    }[kind]
    inner = Inner(
        "inner",
        Config(type=kind, unroll_steps=1, **opts),
        module=low,
        optimizer=torch.optim.SGD(low.parameters(), lr=lr),
        train_data_loader=[(torch.zeros(1),)],
    )
    outer = Outer(
        "outer",
        Config(),
        module=hyp,
        optimizer=torch.optim.SGD(hyp.parameters(), lr=0),
        train_data_loader=[(torch.zeros(1),)],
    )
    Engine(
        problems=[outer, inner],
        config=EngineConfig(strategy="cpu", train_iters=1),
        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
    ).run()
    return seen[0]


def peak_bytes(fn) -> float:
    """Peak tensor memory of ``fn()``: CUDA's allocator statistics, or on the CPU the running sum
    of the profiler's allocation/free events (tensor memory only, not the Python heap)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return float(torch.cuda.max_memory_allocated() - base)
    from torch import profiler

    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def measure(fn, repeats):
    """(result, median seconds, peak bytes) of ``fn()`` after a warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times), peak_bytes(fn)


def row(problem, library, method, knob, got, exact, seconds, peak):
    rel = float((got - exact).norm() / exact.norm())
    cos = float(got @ exact / (got.norm() * exact.norm() + 1e-300))
    mem = f"{peak / 2**10:.0f}"
    return (
        f"| {problem} | {library} | {method} | {knob} | {rel:.2e} | {cos:.6f} | "
        f"{seconds * 1e3:.2f} | {mem} |"
    )


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description="hypergradient accuracy and cost table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer settings")
    parser.add_argument("--smoke", action="store_true", help="ridge only, tiny (for the tests)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    ks = (1, 5, 20) if args.quick else (1, 2, 5, 10, 20, 50, 100, 200)
    ts = (1, 10, 100) if args.quick else (1, 10, 30, 100, 300, 1000)
    if args.smoke:
        ks, ts, args.repeats = (2,), (1, 12), 1
    lines = [
        "| problem | library | method | iterations / unroll T | rel. error | cosine | "
        "ms per hypergradient | peak KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]

    ridge = RidgeHPO.random(n_train=100, n_val=100, d=10, seed=0)
    mlp = MLPTask()
    problems = [
        (
            "ridge",
            ridge,
            torch.linspace(-3.0, 1.0, ridge.d, dtype=F64),
            torch.zeros(ridge.d, dtype=F64),
        )
    ]
    mlp_lam = torch.tensor([-0.5, -1.0, -0.5, -1.0], dtype=F64)  # condition number 99
    if not args.smoke:
        problems.append(("mlp", mlp, mlp_lam, mlp.init.clone()))
    for name, task, lam, w0 in problems:
        exact = task.hypergradient(lam)
        w_star = task.solution(lam)
        lmax = float(torch.linalg.eigvalsh(task.hessian(lam)).max())
        lr = 1.0 / lmax
        print(
            f"{name}: {w_star.numel()} lower parameters, {lam.numel()} hyperparameters, "
            f"lr = 1/L = {lr:.3g}",
            file=sys.stderr,
        )

        def add(method, knob, fn, lib="mlopt", name=name, exact=exact):
            got, sec, peak = measure(fn, args.repeats)
            lines.append(row(name, lib, method, knob, got, exact, sec, peak))
            print(lines[-1], file=sys.stderr)

        run = functools.partial(run_mlopt, task, lam)
        for k in ks:
            add("cg", k, functools.partial(run, CG(iterations=k, tol=0.0), w_star, lr, 1))
        for k in ks:
            add("neumann", k, functools.partial(run, Neumann(k, alpha=lr), w_star, lr, 1))
        for k in ks:
            add("fixed_point", k, functools.partial(run, FixedPoint(k, tol=0.0), w_star, lr, 1))
        for t in ts:
            add("reverse", t, functools.partial(run, Reverse(), w0, lr, t))
        for t in ts[1:]:
            add("reverse truncate=10", t, functools.partial(run, Reverse(truncate=10), w0, lr, t))
        for t in ts[1:]:
            k = max(1, round(math.sqrt(t)))
            add(
                f"reverse checkpoint=√T ({k})",
                t,
                functools.partial(run, Reverse(checkpoint=k), w0, lr, t),
            )
        for t in ts[:4]:
            add("forward", t, functools.partial(run, Forward(), w0, lr, t))
        add(
            "finite_difference (DARTS)",
            "1 from w*",
            functools.partial(run, FiniteDifference(0.01), w_star, lr, 1),
        )
        add("sama", "1 from w*", functools.partial(run, SAMA(), w_star, lr, 1))
        add("first_order", "1 from w*", functools.partial(run, "first_order", w_star, lr, 1))
        if name == "ridge":
            try:
                import betty  # noqa: F401
            except ImportError:
                print("betty-ml not importable: Betty rows skipped", file=sys.stderr)
                continue
            betty_run = functools.partial(run_betty, task, lam)
            add(
                "darts",
                "1 from w*",
                functools.partial(betty_run, "darts", w_star, lr, 1, 1.0),
                lib="betty 0.2.1",
            )
            for k in ks:
                add(
                    "neumann",
                    k,
                    functools.partial(betty_run, "neumann", w_star, lr, k, lr),
                    lib="betty 0.2.1",
                )
            for k in ks:
                add(
                    "cg",
                    k,
                    functools.partial(betty_run, "cg", w_star, lr, k, 1.0),
                    lib="betty 0.2.1",
                )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        print(f"table written to {args.out}", file=sys.stderr)
    return lines


if __name__ == "__main__":
    main()
