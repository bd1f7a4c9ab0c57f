"""HPO: one weight-decay coefficient per feature by hypergradient, against a grid search.

The lower problem fits a logistic regression with penalty ``Σ_j c_j w_j² / n`` by SGD, with
``c_j = c_max · σ(λ_j)``; ``c_max = 0.9 · n / (2 · lr)`` keeps plain SGD stable for every ``λ``
(an unbounded ``exp(λ_j)`` lets a refit from scratch diverge). The upper tunes the 40 logits
``λ`` on the validation loss with reverse-mode hypergradients through each window of
``--unroll`` lower updates (warm-started lower, as in ``examples/quickstart.py``). Data are
generated: 5 of 40 features carry signal.

The baseline is a grid search over ONE shared coefficient ``c`` (log-spaced in
``[1e-4 c_max, c_max]``; a per-feature grid is out of reach) of equal cost. Cost unit: one
lower gradient evaluation (forward + backward). A reverse-mode window of K updates counts 3K
(the unroll keeps a graph and its backward pass differentiates every update again, about twice
a plain step); each candidate, and the final refit of the learned coefficients, is trained with
``--fit-steps`` plain SGD updates from the same initialization. Both report the validation loss
of that refit (what the search optimizes) and the test loss. Wall-clock times are reported too.

Run::

    python examples/hpo_weight_decay.py --smoke
    python examples/hpo_weight_decay.py --seeds 0 1 2 3 4         # about a minute on a CPU
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlopt

try:
    from seed_summary import save_json, summarize
except ImportError:
    from examples.seed_summary import save_json, summarize


def make_data(seed: int, n_train: int = 60, n_val: int = 200, d: int = 40, informative: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(d)
    w[:informative] = 3.0 * torch.randn(informative, generator=g)

    def sample(n):
        x = torch.randn(n, d, generator=g)
        return x, torch.bernoulli(torch.sigmoid(x @ w), generator=g)

    return sample(n_train), sample(n_val), sample(2000)


class DecayLogits(nn.Module):
    """``λ``: the coefficients are ``c_max · σ(λ)``."""

    def __init__(self, d: int, init: float, c_max: float) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((d,), init))
        self.c_max = c_max

    def forward(self) -> torch.Tensor:
        return self.c_max * torch.sigmoid(self.logits)


def penalized_loss(model_out, y, weight, coefficients):
    bce = F.binary_cross_entropy_with_logits(model_out.squeeze(-1), y)
    return bce + (coefficients * weight.pow(2)).sum() / len(y)


class Classifier(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return penalized_loss(self(x), y, self.module.weight, self.decay())


class Decay(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


def fresh_model(d: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, 1)


def fit(train, coefficients, steps, lr, seed) -> nn.Linear:
    """Plain SGD with fixed coefficients (every grid candidate and the final refit)."""
    model = fresh_model(train[0].shape[1], seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = train
    for _ in range(steps):
        opt.zero_grad()
        penalized_loss(model(x), y, model.weight, coefficients).backward()
        opt.step()
    return model


def bce(model, data) -> float:
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(model(data[0]).squeeze(-1), data[1]))


def run_seed(args, seed: int) -> dict:
    train, val, test = make_data(seed)
    d = train[0].shape[1]
    c_max = 0.9 * len(train[1]) / (2 * args.lr)
    # hypergradient
    start = time.perf_counter()
    init = math.log(args.init / (1 - args.init))  # σ(init logit) = args.init
    net, hyper = fresh_model(d, seed), DecayLogits(d, init, c_max)
    classifier = Classifier(
        "classifier",
        net,
        torch.optim.SGD(net.parameters(), lr=args.lr),
        [train],
        mlopt.Config(type="reverse", unroll_steps=args.unroll),
    )
    decay = Decay("decay", hyper, torch.optim.Adam(hyper.parameters(), lr=args.outer_lr), [val])
    mlopt.Engine(
        [decay, classifier],
        {"u2l": {decay: [classifier]}, "l2u": {classifier: [decay]}},
        mlopt.EngineConfig(train_iters=args.outer_steps * args.unroll, seed=seed),
    ).run()
    with torch.no_grad():
        learned = hyper()
    refit = fit(train, learned, args.fit_steps, args.lr, seed)
    hyper_seconds = time.perf_counter() - start
    hyper_cost = 3 * args.outer_steps * args.unroll + args.fit_steps
    # grid search of equal cost
    points = max(1, hyper_cost // args.fit_steps)
    grid = (c_max * torch.logspace(-4, 0, points)).tolist()
    start = time.perf_counter()
    best = None
    for value in grid:
        model = fit(train, torch.full((d,), value), args.fit_steps, args.lr, seed)
        loss = bce(model, val)
        if best is None or loss < best[0]:
            best = (loss, value, model)
    grid_seconds = time.perf_counter() - start
    return {
        "seed": seed,
        "hyper_val": bce(refit, val),
        "hyper_test": bce(refit, test),
        "hyper_cost": hyper_cost,
        "hyper_seconds": hyper_seconds,
        "grid_val": best[0],
        "grid_test": bce(best[2], test),
        "grid_best_decay": best[1],
        "grid_points": points,
        "grid_cost": points * args.fit_steps,
        "grid_seconds": grid_seconds,
        "decay_informative": float(learned[:5].mean()),
        "decay_noise": float(learned[5:].mean()),
        "c_max": c_max,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, for tests")
    parser.add_argument("--outer-steps", type=int, default=150)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--init", type=float, default=0.01, help="initial c / c_max")
    parser.add_argument("--fit-steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.outer_steps, args.unroll, args.fit_steps = 3, 3, 10
    torch.set_num_threads(1)
    rows = [run_seed(args, seed) for seed in args.seeds]
    for r in rows:
        print(
            f"seed {r['seed']}: hypergradient val {r['hyper_val']:.4f} test {r['hyper_test']:.4f} "
            f"({r['hyper_seconds']:.1f}s) | grid ({r['grid_points']} points) val "
            f"{r['grid_val']:.4f} test {r['grid_test']:.4f} ({r['grid_seconds']:.1f}s)"
        )
    summary = summarize(rows, ("hyper_val", "hyper_test", "grid_val", "grid_test"))
    print("mean over seeds:", {k: round(v, 4) for k, v in summary.items()})
    result = {"args": vars(args), "rows": rows, "summary": summary}
    assert all(math.isfinite(v) for v in summary.values())
    save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
