"""Quickstart: learn one weight-decay coefficient per feature for logistic regression.

The lower problem fits a logistic regression on a small, noisy training set with penalty
``Σ_j exp(λ_j) w_j²``; the upper problem tunes the log-coefficients ``λ`` to minimize the
validation loss, with reverse-mode hypergradients through the lower's last ``--unroll`` updates.
Data are generated: only 5 of 40 features carry signal, so good ``λ`` shrink the other 35.

Run::

    python examples/quickstart.py            # about 20 s on a CPU
    python examples/quickstart.py --smoke    # a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import mlopt


def make_data(n_train: int, n_val: int, d: int = 40, informative: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(d)
    w[:informative] = 3.0 * torch.randn(informative, generator=g)

    def sample(n):
        x = torch.randn(n, d, generator=g)
        p = torch.sigmoid(x @ w)
        return x, torch.bernoulli(p, generator=g)

    return sample(n_train), sample(n_val), sample(2000)


class LogDecay(nn.Module):
    """The upper problem's parameters: log weight decay per feature."""

    def __init__(self, d: int, init: float) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.full((d,), init))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.log_decay.exp() * weight.pow(2)).sum()


class Classifier(mlopt.Problem):
    """Lower: logistic regression with the learned penalty."""

    def training_step(self, batch):
        x, y = batch
        logits = self(x).squeeze(-1)
        penalty = self.decay(self.module.weight)  # the upper problem, with its current λ
        return F.binary_cross_entropy_with_logits(logits, y) + penalty / len(y)


class Decay(mlopt.Problem):
    """Upper: validation loss of the lower's current weights."""

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


def fit(train, log_decay: torch.Tensor) -> nn.Linear:
    """Train a fresh logistic regression to convergence (L-BFGS) with fixed weight decays."""
    torch.manual_seed(0)
    model = nn.Linear(train[0].shape[1], 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    x, y = train

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        loss = loss + (log_decay.exp() * model.weight.pow(2)).sum() / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def evaluate(model: nn.Module, data) -> float:
    with torch.no_grad():
        x, y = data
        return float(F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--outer-steps", type=int, default=150)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.outer_steps, args.unroll = 5, 5
    torch.manual_seed(args.seed)
    train, val, test = make_data(n_train=60, n_val=200, seed=args.seed)
    d = train[0].shape[1]
    init = -2.0

    before = fit(train, torch.full((d,), init))
    print(
        f"weight decay exp({init}) on every feature: validation loss {evaluate(before, val):.4f}"
        f", test loss {evaluate(before, test):.4f}"
    )

    net = nn.Linear(d, 1)
    hyper = LogDecay(d, init)
    classifier = Classifier(
        "classifier",
        net,
        torch.optim.SGD(net.parameters(), lr=0.5),
        train_data_loader=[train],
        config=mlopt.Config(type="reverse", unroll_steps=args.unroll),
    )
    decay = Decay(
        "decay", hyper, torch.optim.Adam(hyper.parameters(), lr=0.1), train_data_loader=[val]
    )
    engine = mlopt.Engine(
        problems=[decay, classifier],
        dependencies={"u2l": {decay: [classifier]}, "l2u": {classifier: [decay]}},
        config=mlopt.EngineConfig(train_iters=args.outer_steps * args.unroll, seed=args.seed),
    )
    print(engine)
    engine.run()

    learned = hyper.log_decay.detach()
    after = fit(train, learned)
    print(
        f"learned weight decays:                  validation loss {evaluate(after, val):.4f}"
        f", test loss {evaluate(after, test):.4f}"
    )
    signal, noise = learned[:5].exp().mean(), learned[5:].exp().mean()
    print(f"mean learned decay: informative features {signal:.3g}, noise features {noise:.3g}")
    return {
        "val_before": evaluate(before, val),
        "val_after": evaluate(after, val),
        "test_before": evaluate(before, test),
        "test_after": evaluate(after, test),
    }


if __name__ == "__main__":
    main()
