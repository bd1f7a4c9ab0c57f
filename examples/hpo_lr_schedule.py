"""HPO: learn a learning-rate schedule by hypergradient through the unroll, against a grid search.

The lower problem trains an MLP (64-32-10) on scikit-learn's digits for ``T = --horizon``
full-batch SGD steps, always from the same initialization. The upper problem holds one
log-learning-rate per step, ``η_t = exp(s_t)``, and minimizes the validation cross-entropy after
the ``T`` steps, differentiating through the whole unroll (``Config(type="reverse",
unroll_steps=T)``). The lower's :meth:`~mlopt.Problem.learning_rates` returns the upper's
``η_k`` for its ``k``-th update of the window (:func:`mlopt.dynamics.window_step`).

The upper's Adam learning rate follows a cosine decay, and the schedule kept is the best one
seen: the upper's loss at each of its steps is exactly the validation loss after ``T`` steps
with that window's schedule, so the selection costs nothing. Every window restarts from the same
weights: the initialization is a submodule of the upper
problem (``Config(initialize_from="schedule.init")``) held in an optimizer group with learning
rate 0, so it never moves.

Baseline: a grid search of equal cost over exponentially decaying schedules
``η_t = η_0 γ^(t-1)`` (log-spaced ``η_0``, and ``γ`` from 0.9 to 1, i.e. constant rates
included). Cost unit: one lower gradient evaluation; a reverse-mode window of ``T`` steps counts
``3T``, a grid candidate ``T``, the final evaluation of the learned schedule ``T``.

Run::

    python examples/hpo_lr_schedule.py --smoke
    python examples/hpo_lr_schedule.py --seeds 0 1 2 3 4          # a few minutes on a CPU
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.dynamics import window_step
from mlopt.models import MLP

try:
    from seed_summary import save_json, summarize
except ImportError:
    from examples.seed_summary import save_json, summarize


class Schedule(nn.Module):
    """The upper's parameters: per-step log learning rates, and the (frozen) initialization."""

    def __init__(self, init: nn.Module, horizon: int, lr: float) -> None:
        super().__init__()
        self.log_lrs = nn.Parameter(torch.full((horizon,), math.log(lr)))
        self.init = copy.deepcopy(init)


class Learner(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def learning_rates(self):
        rate = self.schedule.module.log_lrs[window_step(self) - 1].exp()
        return [rate] * len(self.parameters())


class ScheduleProblem(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.learner(x), y)


def digits_splits(seed: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:300], perm[300:600], perm[600:]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def train_with(init: nn.Module, rates: list[float], train) -> nn.Module:
    """Plain full-batch SGD from ``init`` with the given per-step rates."""
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = train
    for rate in rates:
        opt.param_groups[0]["lr"] = rate
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def evaluate(model: nn.Module, data) -> tuple[float, float]:
    with torch.no_grad():
        out = model(data[0])
        loss = float(F.cross_entropy(out, data[1]))
        return (loss if math.isfinite(loss) else float("inf")), float(
            (out.argmax(-1) == data[1]).float().mean()
        )


def run_seed(args, seed: int) -> dict:
    train, val, test = digits_splits(seed)
    torch.manual_seed(seed)
    init = MLP([64, 32, 10])
    T = args.horizon
    net, schedule = copy.deepcopy(init), Schedule(init, T, args.init_lr)
    learner = Learner(
        "learner",
        net,
        torch.optim.SGD(net.parameters(), lr=args.init_lr),
        [train],
        mlopt.Config(
            type="reverse", unroll_steps=T, initialize_from="schedule.init", resample="step"
        ),
    )
    outer_opt = torch.optim.Adam(
        [
            {"params": [schedule.log_lrs], "lr": args.outer_lr},
            {"params": list(schedule.init.parameters()), "lr": 0.0},  # frozen start
        ]
    )
    upper = ScheduleProblem(
        "schedule",
        schedule,
        outer_opt,
        [val],
        mlopt.Config(gradient_clipping=args.clip),
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(outer_opt, args.outer_steps),
    )
    start = time.perf_counter()
    engine = mlopt.Engine(
        [upper, learner],
        {"u2l": {upper: [learner]}, "l2u": {learner: [upper]}},
        mlopt.EngineConfig(train_iters=args.outer_steps * T, seed=seed),
    )
    # The upper's loss at each of its steps is the validation loss after T steps with the
    # schedule of that window: keep the best one seen (free: no extra training run).
    best_seen = (math.inf, schedule.log_lrs.detach().clone())
    while engine.iteration < engine.config.train_iters:
        used = schedule.log_lrs.detach().clone()
        if "schedule" in engine.step():
            loss = float(engine.last_losses["schedule"])
            if loss < best_seen[0]:
                best_seen = (loss, used)
    rates = best_seen[1].exp().tolist()
    hyper_model = train_with(init, rates, train)
    hyper_seconds = time.perf_counter() - start
    hyper_cost = 3 * args.outer_steps * T + T
    # grid search of equal cost over η_t = η0 γ^(t-1)
    points = max(1, hyper_cost // T)
    n_gamma = min(points, args.grid_gammas)
    n_lr = max(1, points // n_gamma)
    gammas = torch.linspace(0.9, 1.0, n_gamma).tolist() if n_gamma > 1 else [1.0]
    lrs = torch.logspace(-2, 1, n_lr).tolist()
    start = time.perf_counter()
    best = None
    for lr0 in lrs:
        for gamma in gammas:
            cand = [lr0 * gamma**t for t in range(T)]
            model = train_with(init, cand, train)
            loss = evaluate(model, val)[0]
            if best is None or loss < best[0]:
                best = (loss, lr0, gamma, model)
    grid_seconds = time.perf_counter() - start
    hv, ht = evaluate(hyper_model, val), evaluate(hyper_model, test)
    gv, gt = evaluate(best[3], val), evaluate(best[3], test)
    return {
        "seed": seed,
        "hyper_val_loss": hv[0],
        "hyper_test_loss": ht[0],
        "hyper_test_acc": ht[1],
        "hyper_cost": hyper_cost,
        "hyper_seconds": hyper_seconds,
        "learned_rates": rates,
        "grid_val_loss": gv[0],
        "grid_test_loss": gt[0],
        "grid_test_acc": gt[1],
        "grid_best": {"lr0": best[1], "gamma": best[2]},
        "grid_points": n_lr * len(gammas),
        "grid_cost": n_lr * len(gammas) * T,
        "grid_seconds": grid_seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, for tests")
    parser.add_argument("--horizon", type=int, default=50, help="T, lower steps per run")
    parser.add_argument("--outer-steps", type=int, default=100)
    parser.add_argument("--init-lr", type=float, default=0.1)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=0.0, help="upper gradient clipping")
    parser.add_argument("--grid-gammas", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.horizon, args.outer_steps = 4, 3
    torch.set_num_threads(1)
    rows = [run_seed(args, seed) for seed in args.seeds]
    for r in rows:
        print(
            f"seed {r['seed']}: learned schedule val loss {r['hyper_val_loss']:.4f}, test loss "
            f"{r['hyper_test_loss']:.4f}, acc {r['hyper_test_acc']:.4f} ({r['hyper_seconds']:.1f}s)"
            f" | grid ({r['grid_points']} schedules) val loss {r['grid_val_loss']:.4f}, test "
            f"loss {r['grid_test_loss']:.4f}, acc {r['grid_test_acc']:.4f} "
            f"({r['grid_seconds']:.1f}s)"
        )
    keys = (
        "hyper_val_loss",
        "hyper_test_loss",
        "hyper_test_acc",
        "grid_val_loss",
        "grid_test_loss",
        "grid_test_acc",
    )
    summary = summarize(rows, keys)
    print("mean over seeds:", {k: round(v, 4) for k, v in summary.items()})
    result = {"args": vars(args), "rows": rows, "summary": summary}
    save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
