"""Meta-Weight-Net (Shu et al. 2019): learn an example weighting on noisy or long-tailed data.

The lower problem trains a classifier on a (noisy or long-tailed) training set with the loss
``Σ_i V(ℓ_i; θ) ℓ_i / Σ_i V(ℓ_i; θ)`` over a mini-batch (the normalization of the authors'
code; ``--no-normalize`` uses ``mean_i V(ℓ_i; θ) ℓ_i``), where ``V`` is a small network
(1-100-1, sigmoid output) of the example's (detached) loss ``ℓ_i``. The upper problem trains
``θ`` on a small balanced meta set. As in the paper's algorithm, the meta step differentiates
through ONE virtual classifier step (``Config(type="reverse", unroll_steps=1)``), and the
classifier then takes its real step with the updated ``V`` (``EngineConfig(roll_back=True)``).

Data: scikit-learn's 8x8 digits (offline). The training set keeps ``n_c = 100 · ρ^(-c/9)``
examples of class ``c`` (imbalance factor ``ρ = --imbalance``; 1 gives a balanced set), the meta
set ``--meta-per-class`` (5) per class, the test set the rest. ``--noise`` corrupts the TRAINING
labels only (the meta and test sets stay clean), with a generator seeded by the run's seed:

* ``uniform`` (symmetric): exactly ``round(r·n)`` training examples, drawn at random, get a label
  drawn uniformly from the OTHER classes, so exactly a fraction ``r`` of the labels is wrong
  (Shu et al.'s corruption matrix also lets the drawn label equal the true one);
* ``flip``: each class ``c`` has one fixed random other class ``t(c)`` (Shu et al.'s
  ``flip_labels_C``), and exactly ``round(r·n_c)`` of the examples of class ``c`` get ``t(c)``.

We report balanced accuracy (mean per-class recall) and accuracy on the clean test set for plain
training (uniform weights), plain training on the training and meta sets together (the same clean
examples Meta-Weight-Net sees), plain training early-stopped on the meta set (the weights with the
best meta-set balanced accuracy, scored every 100 steps), inverse-class-frequency weighting (of
the observed labels), and Meta-Weight-Net, with the same classifier, optimizer and number of steps.

Run::

    python examples/meta_weight_net.py --smoke
    python examples/meta_weight_net.py --seeds 0 1 2            # a few minutes on a CPU
    python examples/meta_weight_net.py --imbalance 1 --noise uniform --noise-rate 0.4
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.models import MLP

try:
    from seed_summary import save_json, summarize
except ImportError:
    from examples.seed_summary import save_json, summarize


class WeightNet(nn.Module):
    """``V(ℓ; θ)``: one hidden layer of 100 ReLUs, sigmoid output (Shu et al. 2019)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses.unsqueeze(-1))).squeeze(-1)


class Classifier(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        weights = self.weighting(losses.detach())
        if self.normalize:  # the paper's code: weights summing to one over the batch
            return (weights * losses).sum() / weights.sum().clamp_min(1e-8)
        return (weights * losses).mean()


class Weighting(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


class Batches:
    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.y))
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def imbalanced_digits(seed: int, imbalance: float, n_max: int = 100, meta_per_class: int = 5):
    """Long-tailed train, balanced meta set, and the remaining examples as the test set."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, meta, test = [], [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_c = max(1, int(round(n_max * imbalance ** (-c / 9))))
        meta.append(idx[:meta_per_class])
        train.append(idx[meta_per_class : meta_per_class + n_c])
        test.append(idx[meta_per_class + n_c :])
    train, meta, test = (torch.cat(parts) for parts in (train, meta, test))
    return (x[train], y[train]), (x[meta], y[meta]), (x[test], y[test])


def corrupt_labels(
    y: torch.Tensor, noise: str, rate: float, seed: int, num_classes: int = 10
) -> torch.Tensor:
    """The noisy copy of ``y`` described in the module docstring (``y`` itself is not changed)."""
    if noise == "none" or rate == 0.0:
        return y.clone()
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    g = torch.Generator().manual_seed(10_000 + seed)
    noisy = y.clone()
    if noise == "uniform":
        idx = torch.randperm(len(y), generator=g)[: int(round(rate * len(y)))]
        shift = torch.randint(1, num_classes, (len(idx),), generator=g)
        noisy[idx] = (y[idx] + shift) % num_classes  # uniform over the other classes
    elif noise == "flip":
        target = [
            int((c + torch.randint(1, num_classes, (1,), generator=g)) % num_classes)
            for c in range(num_classes)
        ]
        for c in range(num_classes):
            idx = (y == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)[: int(round(rate * len(idx)))]]
            noisy[idx] = target[c]
    else:
        raise ValueError(f"unknown noise {noise!r} (none, uniform, flip)")
    return noisy


def make_data(seed: int, args: argparse.Namespace):
    """Train (noisy labels), meta and test sets (clean), and the clean training labels."""
    train, meta, test = imbalanced_digits(seed, args.imbalance, meta_per_class=args.meta_per_class)
    noisy = corrupt_labels(train[1], args.noise, args.noise_rate, seed)
    return (train[0], noisy), meta, test, train[1]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def balanced_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = model(x).argmax(-1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in y.unique()]
    return sum(recalls) / len(recalls)


def make_classifier(d: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP([d, 100, 10])


def train_plain(train, weights_of, steps, args, seed, select_on=None) -> nn.Module:
    """Mini-batch SGD with fixed per-example weights ``weights_of(y)``.

    With ``select_on = (x, y)`` (the meta set), the model is scored on it every 100 steps and
    the best-scoring weights are returned (early stopping on the clean meta set).
    """
    model = make_classifier(train[0].shape[1], seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    best, best_state = -1.0, None
    it, done = iter(Batches(*train, args.batch_size)), 0
    while done < steps:
        for xb, yb in it:
            opt.zero_grad()
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            (weights_of(yb) * losses).mean().backward()
            opt.step()
            done += 1
            if select_on is not None and (done % 100 == 0 or done == steps):
                score = balanced_accuracy(model, *select_on)
                if score > best:
                    best, best_state = score, copy.deepcopy(model.state_dict())
            if done == steps:
                break
        it = iter(Batches(*train, args.batch_size))
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def train_mwn(train, meta, args, seed) -> tuple[nn.Module, nn.Module, float, dict]:
    torch.manual_seed(seed)
    model = make_classifier(train[0].shape[1], seed)
    vnet = WeightNet()
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    classifier = Classifier(
        "classifier",
        model,
        opt,
        Batches(*train, args.batch_size),
        mlopt.Config(type="reverse", unroll_steps=1),
    )
    classifier.normalize = not args.no_normalize
    weighting = Weighting(
        "weighting",
        vnet,
        torch.optim.Adam(vnet.parameters(), lr=args.meta_lr, weight_decay=1e-4),
        [meta],
    )
    engine = mlopt.Engine(
        [weighting, classifier],
        {"u2l": {weighting: [classifier]}, "l2u": {classifier: [weighting]}},
        mlopt.EngineConfig(train_iters=args.steps, roll_back=True, seed=seed, strategy="cpu"),
    )
    start = time.perf_counter()
    stats = engine.run()
    return model, vnet, time.perf_counter() - start, stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, for tests")
    parser.add_argument("--imbalance", type=float, default=50.0, help="1: a balanced training set")
    parser.add_argument("--noise", choices=("none", "uniform", "flip"), default="none")
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--meta-per-class", type=int, default=5)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-normalize", action="store_true", help="mean of V·ℓ instead of Σ V·ℓ / Σ V"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 5
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        train, meta, test, clean_y = make_data(seed, args)
        wrong = train[1] != clean_y
        counts = torch.bincount(train[1], minlength=10).float()
        inv = counts.sum() / (10 * counts.clamp_min(1))
        both = (torch.cat([train[0], meta[0]]), torch.cat([train[1], meta[1]]))
        ones = lambda yb: torch.ones(len(yb))  # noqa: E731
        models = {
            "plain": train_plain(train, ones, args.steps, args, seed),
            "plain_with_meta": train_plain(both, ones, args.steps, args, seed),
            "class_balanced": train_plain(
                train, lambda yb, inv=inv: inv[yb], args.steps, args, seed
            ),
            "plain_early_stop": train_plain(train, ones, args.steps, args, seed, select_on=meta),
        }
        model, vnet, seconds, stats = train_mwn(train, meta, args, seed)
        models["meta_weight_net"] = model
        grid = torch.linspace(0.0, 5.0, 11)
        with torch.no_grad():
            curve = vnet(grid)
            # V on the training set at the end: does it down-weight the corrupted examples?
            final_w = vnet(F.cross_entropy(model(train[0]), train[1], reduction="none"))
        row = {
            "seed": seed,
            "train_counts": counts.int().tolist(),
            "noise_fraction": float(wrong.float().mean()),
            **{name: balanced_accuracy(m, *test) for name, m in models.items()},
            **{f"{name}_acc": accuracy(m, *test) for name, m in models.items()},
            "mwn_seconds": seconds,
            "classifier_updates": stats["updates"]["classifier"],
            "weighting_updates": stats["updates"]["weighting"],
            "weight_curve": {"loss": grid.tolist(), "weight": curve.tolist()},
            "mean_weight_clean": float(final_w[~wrong].mean()),
            "mean_weight_noisy": float(final_w[wrong].mean()) if wrong.any() else float("nan"),
        }
        rows.append(row)
        print(
            f"seed {seed}: balanced test accuracy plain {row['plain']:.4f}, plain+meta "
            f"{row['plain_with_meta']:.4f}, early-stopped {row['plain_early_stop']:.4f}, "
            f"class-balanced {row['class_balanced']:.4f}, "
            f"Meta-Weight-Net {row['meta_weight_net']:.4f} ({seconds:.1f}s; V clean "
            f"{row['mean_weight_clean']:.3f}, noisy {row['mean_weight_noisy']:.3f})"
        )
    names = ("plain", "plain_with_meta", "plain_early_stop", "class_balanced", "meta_weight_net")
    summary = summarize(rows, names + tuple(f"{n}_acc" for n in names))
    print("mean over seeds:", {k: round(v, 4) for k, v in summary.items()})
    result = {"args": vars(args), "rows": rows, "summary": summary}
    save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
