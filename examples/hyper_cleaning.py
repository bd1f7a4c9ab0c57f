"""Data hyper-cleaning: learn one weight per training example to undo label noise.

The BDA / BOML benchmark (Franceschi et al. 2017; Liu et al. 2020, arXiv 2006.04045). Half of
the training labels are corrupted (a corrupted label always differs from the true one). The
upper problem holds one logit ``x_i`` per training example; the lower trains a classifier on
``mean_i σ(x_i) · CE_i`` (full batch); the upper minimizes the cross-entropy of the lower's
classifier on clean validation data. An example is declared clean when ``x_i >= 0``; we report
the F1 score of that prediction against the true corruption mask, and test accuracy.

Methods (``--method``): ``rhg`` (reverse through each window), ``trhg`` (reverse through its last
``--truncate`` updates), ``bda`` (BDA dynamics with RHG), ``cg`` (implicit, conjugate gradient)
and ``first_order`` (drops the second-order term; for this problem that leaves no signal at all,
since the validation loss does not depend on ``x`` directly). The lower is warm-started: each
window of ``--unroll`` updates continues from the previous one.

Data (``--data``): ``digits`` (scikit-learn's 1797 8x8 images, split 449/449/899 in the MNIST
protocol's 1:1:2 proportions, offline), ``mnist`` / ``fashion`` (5000/5000/10000 from the idx
files in ``--root``, downloaded with torchvision when available), or ``auto`` (MNIST, else digits).

Run::

    python examples/hyper_cleaning.py --smoke                       # seconds (tests)
    python examples/hyper_cleaning.py --method all --seeds 0 1 2    # digits: a few minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.data import CleaningData, load_digits_cleaning, load_mnist_cleaning
from mlopt.dynamics import BDA, BDAProblem
from mlopt.hypergrad import CG, Reverse
from mlopt.models import MLP

METHODS = ("rhg", "trhg", "bda", "cg", "first_order")


# ---------------------------------------------------------------------- problems
class ExampleWeights(nn.Module):
    """The upper problem's parameters: one logit per training example (σ(x_i) weights it)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))


def weighted_loss(problem: mlopt.Problem, batch) -> torch.Tensor:
    x, y = batch
    weights = torch.sigmoid(problem.cleaner.module.logits)
    return (weights * F.cross_entropy(problem(x), y, reduction="none")).mean()


class Classifier(mlopt.Problem):
    """Lower: the classifier trained on the weighted noisy training set."""

    def training_step(self, batch):
        return weighted_loss(self, batch)


class BDAClassifier(BDAProblem):
    """Lower with BDA dynamics: F is the cleaner's validation loss on the cleaner's own batch."""

    def lower_loss(self, batch):
        return weighted_loss(self, batch)


class Cleaner(mlopt.Problem):
    """Upper: validation cross-entropy of the lower's current classifier."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


# ---------------------------------------------------------------------- data and metrics
def load_data(name: str, root: str, seed: int, smoke: bool) -> tuple[CleaningData, str]:
    if name in ("mnist", "fashion", "auto"):
        dataset = "FashionMNIST" if name == "fashion" else "MNIST"
        sizes = (500, 500, 1000) if smoke else (5000, 5000, 10000)
        try:
            return load_mnist_cleaning(
                root, dataset, seed=seed, sizes=sizes, download=True
            ), dataset
        except Exception as err:  # no files, no torchvision, no network
            if name != "auto":
                raise
            print(f"{dataset} unavailable ({type(err).__name__}: {err}); using scikit-learn digits")
    data = load_digits_cleaning(seed=seed)
    if smoke:
        data = CleaningData(*(t[: len(t) // 3] for t in data))
    return data, "digits"


def f1_clean(logits: torch.Tensor, corrupted: torch.Tensor) -> dict:
    """Precision, recall and F1 of the prediction "clean = logit >= 0" (positive class: clean)."""
    pred, truth = logits >= 0, ~corrupted
    tp = float((pred & truth).sum())
    precision = tp / max(float(pred.sum()), 1.0)
    recall = tp / max(float(truth.sum()), 1.0)
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def make_model(kind: str, d: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(d, 10)
    return MLP([d, 300, 10])


def train_plain(kind, x, y, weights, steps, lr, seed) -> nn.Module:
    """Full-batch SGD on a weighted training set (baselines and retraining)."""
    model = make_model(kind, x.shape[1], seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (weights * F.cross_entropy(model(x), y, reduction="none")).mean()
        loss.backward()
        opt.step()
    return model


# ---------------------------------------------------------------------- one run
def run_method(method: str, data: CleaningData, args, seed: int) -> dict:
    torch.manual_seed(seed)
    n, d = data.x_train.shape
    net = make_model(args.model, d, seed)
    hyper = ExampleWeights(n)
    if method == "rhg":
        hg = "reverse"
    elif method in ("trhg",):
        hg = Reverse(truncate=args.truncate)
    elif method == "bda":
        hg = "reverse"
    elif method == "cg":
        hg = CG(iterations=args.cg_iterations, damping=args.cg_damping)
    elif method == "first_order":
        hg = "first_order"
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {METHODS}")
    config = mlopt.Config(type=hg, unroll_steps=args.unroll)
    inner_opt = torch.optim.SGD(net.parameters(), lr=args.inner_lr)
    train = [(data.x_train, data.y_train)]
    if method == "bda":
        settings = BDA(
            upper="cleaner", alpha=args.alpha, schedule=args.schedule, s=args.s, t=args.t
        )
        lower = BDAClassifier("classifier", net, inner_opt, train, config, bda=settings)
    else:
        lower = Classifier("classifier", net, inner_opt, train, config)
    upper = Cleaner(
        "cleaner",
        hyper,
        torch.optim.Adam(hyper.parameters(), lr=args.outer_lr),
        train_data_loader=[(data.x_val, data.y_val)],
    )
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=args.outer_steps * args.unroll, seed=seed, strategy="cpu"),
    )
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    logits = hyper.logits.detach()
    kept = (logits >= 0).float()
    retrained = train_plain(
        args.model, data.x_train, data.y_train, kept, args.retrain_steps, args.inner_lr, seed
    )
    return {
        "method": method,
        "seed": seed,
        "test_acc": accuracy(net, data.x_test, data.y_test),
        "test_acc_retrained": accuracy(retrained, data.x_test, data.y_test),
        **f1_clean(logits, data.corrupted),
        "seconds": seconds,
    }


def baselines(data: CleaningData, args, seed: int) -> list[dict]:
    """Training on every noisy example, and on the truly clean ones only (oracle)."""
    steps = args.outer_steps * args.unroll
    ones = torch.ones(len(data.y_train))
    out = []
    for name, weights in (
        ("no cleaning", ones),
        ("oracle (clean only)", (~data.corrupted).float()),
    ):
        model = train_plain(
            args.model, data.x_train, data.y_train, weights, steps, args.inner_lr, seed
        )
        out.append(
            {"method": name, "seed": seed, "test_acc": accuracy(model, data.x_test, data.y_test)}
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, for tests")
    parser.add_argument("--method", default="all", help=f"one of {METHODS} or 'all'")
    parser.add_argument("--data", default="digits", choices=["digits", "mnist", "fashion", "auto"])
    parser.add_argument("--root", default="~/data", help="folder of the MNIST idx files")
    parser.add_argument("--model", default="linear", choices=["linear", "mlp"])
    parser.add_argument("--outer-steps", type=int, default=300)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--truncate", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.5)
    parser.add_argument("--outer-lr", type=float, default=0.1)
    parser.add_argument("--retrain-steps", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.5, help="BDA's α (schedule α/k)")
    parser.add_argument(
        "--schedule", default="harmonic", choices=["harmonic", "geometric", "constant"]
    )
    parser.add_argument("--s", type=float, default=1.0)
    parser.add_argument("--t", type=float, default=1.0)
    parser.add_argument("--cg-iterations", type=int, default=20)
    parser.add_argument("--cg-damping", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.outer_steps, args.unroll, args.truncate, args.retrain_steps = 3, 3, 2, 20
        args.cg_iterations = 3
    torch.set_num_threads(1)
    methods = METHODS if args.method == "all" else (args.method,)
    rows = []
    dataset = args.data
    for seed in args.seeds:
        data, dataset = load_data(args.data, args.root, seed, args.smoke)
        rows.extend(baselines(data, args, seed))
        for method in methods:
            row = run_method(method, data, args, seed)
            rows.append(row)
            print(
                f"seed {seed} {method:12s} test acc {row['test_acc']:.4f} "
                f"(retrained {row['test_acc_retrained']:.4f})  F1 {row['f1']:.4f}  "
                f"{row['seconds']:.1f}s"
            )
    summary = summarize(rows)
    for name, stats in summary.items():
        print(f"{name:20s} " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    result = {"dataset": dataset, "args": vars(args), "rows": rows, "summary": summary}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def summarize(rows: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every numeric column, per method."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == name]
        stats = {}
        for key in group[0]:
            if key in ("method", "seed") or not isinstance(group[0][key], float):
                continue
            values = torch.tensor([r[key] for r in group], dtype=torch.float64)
            stats[key] = float(values.mean())
            stats[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
        out[name] = stats
    return out


if __name__ == "__main__":
    main()
