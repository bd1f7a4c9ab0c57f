"""Time per meta-iteration and peak memory of MAML (second order, or FOMAML with
``--first-order``): mlopt (vmap, loop, Engine) against higher and learn2learn, on the same work
in the same run.

Workload (the issue's): Conv4 (64 filters, transductive batch norm), Omniglot 5-way 1-shot with
15 queries per class (real tasks from the minimal splits), 5 inner SGD steps (lr 0.4), meta-batch
of 16 tasks, float32. One meta-iteration = the mean meta-gradient of the 16 tasks.

- ``plain``: the floor, plain PyTorch: ``torch.func.functional_call`` through the
  differentiable inner steps task by task, ``torch.autograd.grad`` of the query loss;
- ``mlopt-vmap`` / ``mlopt-loop`` / ``mlopt-auto``: :func:`mlopt.meta.meta_gradients` with
  ``mode="vmap"``, ``"loop"`` or ``"auto"`` (per-task ``torch.func.grad`` of the whole inner loop
  and query loss), the chunk size chosen by mlopt (one task on the CPU);
  ``mlopt-vmap-chunk4``: vmap over 4 tasks at a time; ``mlopt-vmap-all``: all 16 in one vmap
  (mlopt before chunking);
- ``mlopt-engine``: the bilevel Problem/Engine program (lower ``type="reverse"``,
  ``initialize_from``, upper ``gradient_accumulation=16``): 16 x 5 Engine iterations;
- ``higher``: ``higher.innerloop_ctx`` per task, then ``backward`` (its MAML example's way);
- ``learn2learn``: ``l2l.algorithms.MAML(...).clone()`` and ``adapt`` per task, then
  ``backward``.

``--first-order`` times FOMAML instead (the same rows: plain takes the inner steps without a
graph and the query gradient at the adapted weights; mlopt ``maml_task_loss(first_order=True)``
and the Engine's ``type="first_order"``; higher ``track_higher_grads=False`` and the gradient at
its fast weights; learn2learn ``MAML(first_order=True)``).

Before timing, every implementation computes the meta-gradient of a small float64 version of
the workload and must agree with a plain-autograd reference (printed). Timing: one thread,
``OMP_NUM_THREADS=1``, one warm-up, then rounds in which every implementation runs once
(interleaved, so load changes on a shared machine hit all of them alike); the median over the
rounds is reported, with its ratios to plain and to the fastest peer. Memory: each one runs
one meta-iteration in a fresh Python process (same data and model); the reported peak is that
process's peak resident set size during the iteration (``VmHWM``, reset through
``/proc/self/clear_refs`` just before it) minus its resident size before the iteration (the same
measure for all; it includes the first call's one-time allocations, tens of MB, because a
warm-up would leave freed memory resident and hide the iteration's own).

Run (in the peers' environment, see benchmarks/README.md)::

    OMP_NUM_THREADS=1 .peers-venv/bin/python benchmarks/maml_benchmark.py --repeats 5
    OMP_NUM_THREADS=1 .peers-venv/bin/python benchmarks/maml_benchmark.py --repeats 5 --first-order
    .peers-venv/bin/python benchmarks/maml_benchmark.py --smoke
    OMP_NUM_THREADS=1 python benchmarks/maml_benchmark.py --memory-only \
        --only mlopt-loop mlopt-vmap mlopt-auto mlopt-vmap-chunk4 mlopt-vmap-all \
        --out docs/results/vmap_memory.json     # peak memory only, no timing
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
from pathlib import Path

import torch
import torch.nn.functional as F

import mlopt
from mlopt.data import EpisodicSampler, Task, meta_batch
from mlopt.meta import maml_task_loss, meta_gradients
from mlopt.models import Conv4

_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


# ---------------------------------------------------------------- implementations
def run_mlopt(mode, chunk_size=None, *, all_tasks=False):
    """``meta_gradients`` with ``mode``, ``chunk_size`` (None: chosen) or every task in one
    vmap (``all_tasks``: the unchunked vmap, as before chunking)."""

    def fn(net, tasks, steps, lr, first_order=False):
        params = dict(net.named_parameters())
        loss = maml_task_loss(net, steps, lr, first_order=first_order)
        chunk = len(tasks) if all_tasks else chunk_size
        out = meta_gradients(
            loss, params, meta_batch(tasks), mode=mode, chunk_size=chunk, has_aux=True
        )
        return list(out.gradients.values())

    return fn


class _Task(mlopt.Problem):
    def training_step(self, task):
        return F.cross_entropy(self(task[0]), task[1])


class _Meta(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        return F.cross_entropy(self.task(qx), qy)


def run_mlopt_engine(net, tasks, steps, lr, first_order=False):
    meta_net, inner = net, copy.deepcopy(net)
    opt = torch.optim.SGD(meta_net.parameters(), lr=0.0)
    grads = []
    opt.register_step_pre_hook(
        lambda o, a, k: grads.append([p.grad.clone() for p in meta_net.parameters()])
    )
    task = _Task(
        "task",
        inner,
        torch.optim.SGD(inner.parameters(), lr=lr),
        train_data_loader=tasks,
        config=mlopt.Config(
            type="first_order" if first_order else "reverse",
            unroll_steps=steps,
            initialize_from="meta",
        ),
    )
    meta = _Meta("meta", meta_net, opt, config=mlopt.Config(gradient_accumulation=len(tasks)))
    engine = mlopt.Engine(
        [meta, task],
        {"u2l": {meta: [task]}, "l2u": {task: [meta]}},
        mlopt.EngineConfig(train_iters=steps * len(tasks), strategy="cpu"),
    )
    engine.run()
    meta.__dict__["_engine"] = task.__dict__["_engine"] = None  # reusable in the next round
    return grads[0]


def run_higher(net, tasks, steps, lr, first_order=False):
    import higher

    net.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(net.parameters(), lr=lr)
    total = [torch.zeros_like(p) for p in net.parameters()]
    for sx, sy, qx, qy in tasks:
        with higher.innerloop_ctx(
            net, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
        ) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fnet(sx), sy))
            q = F.cross_entropy(fnet(qx), qy) / len(tasks)
            if not first_order:
                q.backward()
                continue
            # untracked: the adapted weights are fresh leaves, their gradient is FOMAML's
            for t, g in zip(total, torch.autograd.grad(q, list(fnet.parameters()))):
                t.add_(g)
    return [p.grad for p in net.parameters()] if not first_order else total


def run_l2l(net, tasks, steps, lr, first_order=False):
    import learn2learn as l2l

    net.zero_grad(set_to_none=True)
    maml = l2l.algorithms.MAML(net, lr=lr, first_order=first_order)
    for sx, sy, qx, qy in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        (F.cross_entropy(learner(qx), qy) / len(tasks)).backward()
    return [p.grad for p in net.parameters()]


def reference(net, tasks, steps, lr, first_order=False):
    """Plain PyTorch: ``functional_call`` through the differentiable inner steps, task by task
    (the floor the ratios are taken to, and the agreement check's reference). First order
    (FOMAML): the inner steps without a graph, the query gradient at the adapted weights."""
    names = [n for n, _ in net.named_parameters()]
    leaves = list(net.parameters())
    total = [torch.zeros_like(p) for p in leaves]
    for sx, sy, qx, qy in tasks:
        fast = list(leaves)
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, fast)), sx), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads)]
            if first_order:
                fast = [p.detach().requires_grad_() for p in fast]
        q = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, fast)), qx), qy)
        total = [
            t + g / len(tasks)
            for t, g in zip(total, torch.autograd.grad(q, fast if first_order else leaves))
        ]
    return total


IMPLEMENTATIONS = {
    "plain": reference,
    "mlopt-vmap": run_mlopt("vmap"),
    "mlopt-loop": run_mlopt("loop"),
    "mlopt-auto": run_mlopt("auto"),
    "mlopt-vmap-chunk4": run_mlopt("vmap", 4),
    "mlopt-vmap-all": run_mlopt("vmap", all_tasks=True),
    "mlopt-engine": run_mlopt_engine,
    "higher": run_higher,
    "learn2learn": run_l2l,
}


# ---------------------------------------------------------------- checks and measurements
def agreement(tasks, names, first_order=False):
    """Max |difference| to the autograd reference on a float64 Conv4 (8 filters, 2 tasks)."""
    torch.manual_seed(0)
    small = Conv4(1, 5, hidden=8).double()
    t64 = [Task(*(t.double() if t.is_floating_point() else t for t in task)) for task in tasks[:2]]
    ref = reference(small, t64, 2, 0.4, first_order)
    out = {}
    for name in names:
        got = IMPLEMENTATIONS[name](copy.deepcopy(small), t64, 2, 0.4, first_order)
        out[name] = max(float((g - r).abs().max()) for g, r in zip(got, ref))
    return out


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_memory_mb(name: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one meta-iteration of ``name`` in a fresh Python process."""
    cmd = [sys.executable, __file__, "--memory-of", name, "--data", args.data]
    cmd += ["--meta-batch", str(args.meta_batch), "--steps", str(args.steps)]
    cmd += ["--queries", str(args.queries), "--hidden", str(args.hidden)]
    cmd += ["--first-order"] if args.first_order else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _memory_of(args: argparse.Namespace) -> None:
    net, tasks = _workload(args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (Linux >= 4.0)
        f.write("5")
    before = _rss_kb()
    IMPLEMENTATIONS[args.memory_of](net, tasks, args.steps, 0.4, args.first_order)
    print(round((_peak_kb() - before) / 1024, 1))


def _workload(args: argparse.Namespace):
    from mlopt.meta.omniglot import load_minimal_splits

    data = load_minimal_splits(args.data)
    sampler = EpisodicSampler(data, 5, 1, args.queries, seed=0)
    tasks = [sampler[i] for i in range(args.meta_batch)]
    torch.manual_seed(0)
    return Conv4(1, 5, hidden=args.hidden), tasks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("MLOPT_OMNIGLOT_DIR", str(_DATA)))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--only", nargs="*", default=list(IMPLEMENTATIONS))
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--first-order", action="store_true", help="FOMAML instead of MAML")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="peak memory, no timing")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_of:
        return _memory_of(args)
    if args.smoke:
        args.repeats, args.meta_batch, args.steps, args.queries, args.hidden = 1, 2, 1, 2, 8
    torch.set_num_threads(1)
    names = [n for n in args.only if n in IMPLEMENTATIONS]
    for n in list(names):
        try:
            if n in ("higher", "learn2learn"):
                __import__("higher" if n == "higher" else "learn2learn")
        except ImportError:
            print(f"{n}: not installed, skipped (see benchmarks/README.md)")
            names.remove(n)
    net, tasks = _workload(args)
    agree = agreement(tasks, names, args.first_order)
    print("agreement with plain autograd (float64, max abs diff):", agree)
    wrong = {n: d for n, d in agree.items() if not d < 1e-10}
    if wrong:
        raise SystemExit(f"these implementations compute a different meta-gradient: {wrong}")

    if args.memory_only:
        memory = {n: peak_memory_mb(n, args) for n in names}
        loop = memory.get("mlopt-loop")
        for n in names:
            print(
                f"{n}: peak {memory[n]} MB" + (f" ({memory[n] / loop:.2f}x loop)" if loop else "")
            )
        result = {
            "workload": vars(args),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "threads": torch.get_num_threads(),
            "memory": "peak RSS growth of one meta-iteration in a fresh process (VmHWM reset by "
            "/proc/self/clear_refs), first call included",
            "agreement_max_abs_diff_float64": agree,
            "peak_mb": memory,
            "ratio_to_loop": {n: memory[n] / loop for n in names} if loop else None,
        }
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return result
    times = {n: [] for n in names}
    for n in names:  # warm-up
        IMPLEMENTATIONS[n](copy.deepcopy(net), tasks, args.steps, 0.4, args.first_order)
    for _ in range(args.repeats):
        for n in names:
            model = copy.deepcopy(net)
            t0 = time.perf_counter()
            IMPLEMENTATIONS[n](model, tasks, args.steps, 0.4, args.first_order)
            times[n].append(time.perf_counter() - t0)
    memory = {n: peak_memory_mb(n, args) for n in names}
    medians = {n: statistics.median(v) for n, v in times.items()}
    peers = [medians[n] for n in ("higher", "learn2learn") if n in medians]
    best_peer = min(peers) if peers else None
    plain = medians.get("plain")
    rows = []
    head = f"s / meta-iteration (median of {args.repeats})"
    print(f"\n| implementation | {head} | vs plain | vs best peer | peak MB |")
    print("| --- | --- | --- | --- | --- |")
    for n in names:
        ratio = f"{medians[n] / best_peer:.2f}x" if best_peer else "-"
        to_plain = f"{medians[n] / plain:.2f}x" if plain else "-"
        print(f"| {n} | {medians[n]:.3f} | {to_plain} | {ratio} | {memory[n]} |")
        rows.append({"name": n, "median_s": medians[n], "all_s": times[n], "peak_mb": memory[n]})
        rows[-1]["ratio_to_plain"] = medians[n] / plain if plain else None
    result = {
        "workload": vars(args),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "threads": torch.get_num_threads(),
        "results": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
