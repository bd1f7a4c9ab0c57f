"""BOML's meta-feature setting on Omniglot's minimal splits: a shared feature extractor (upper)
and a per-task linear head learned from scratch (lower).

Franceschi et al. (2018), "Bilevel Programming for Hyperparameter Optimization and
Meta-Learning", and BOML (Liu et al. 2021): the upper problem is the hyper-representation
(a Conv4 without head), the lower one a linear classifier on its features, reset to zero at the
start of every task (``mlopt.meta.reset_parameters`` in ``on_inner_loop_start``) and trained on
the support set with an L2 penalty; the query loss of the adapted head trains the features.
``--method`` picks the hypergradient: ``reverse`` (RHG), ``trhg`` (``Reverse(truncate=...)``),
``cg`` (implicit, conjugate gradient) or ``first_order``.

Run::

    python examples/meta_feature_omniglot.py --method reverse --out results/metafeat_rhg.json
    python examples/meta_feature_omniglot.py --method cg --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.hypergrad import CG, Reverse
from mlopt.meta import adapt, reset_parameters
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


def head_loss(weight, bias, feats, labels, decay):
    return (
        F.cross_entropy(F.linear(feats, weight, bias), labels) + 0.5 * decay * weight.pow(2).sum()
    )


class Head(mlopt.Problem):
    def __init__(self, *a, decay, **k):
        super().__init__(*a, **k)
        self.decay = decay

    def on_inner_loop_start(self):
        reset_parameters(self)  # every task starts from a zero classifier

    def training_step(self, task):
        sx, sy, _, _ = task
        w, b = self.module.weight, self.module.bias
        return head_loss(w, b, self.features(sx), sy, self.decay)


class Features(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.head.batch
        logits = self.head(self(qx))
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


METHODS = {
    "reverse": lambda a: "reverse",
    "trhg": lambda a: Reverse(truncate=max(1, a.inner_steps // 2)),
    "cg": lambda a: CG(iterations=5, damping=0.0),
    "first_order": lambda a: "first_order",
}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n")[0], inner_steps=5, test_steps=5, inner_lr=0.5)
    p.add_argument("--method", choices=sorted(METHODS), default="reverse")
    p.add_argument("--decay", type=float, default=1e-2, help="L2 penalty of the head")
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    body = Conv4(1, None, hidden=args.hidden)
    head = torch.nn.Linear(body.feature_dim, args.ways)
    low = Head(
        "head",
        head,
        torch.optim.SGD(head.parameters(), lr=args.inner_lr),
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(
            type=METHODS[args.method](args), unroll_steps=args.inner_steps, resample="window"
        ),
        decay=args.decay,
    )
    up = Features(
        "features",
        body,
        torch.optim.Adam(body.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, up, low)

    def predict(sx, sy, qx):
        with torch.no_grad():
            fs, fq = body(sx), body(qx)
        zero = {"weight": torch.zeros_like(head.weight), "bias": torch.zeros_like(head.bias)}
        loss = lambda p: head_loss(p["weight"], p["bias"], fs, sy, args.decay)  # noqa: E731
        fast = adapt(loss, zero, args.test_steps, args.inner_lr)
        return F.linear(fq, fast["weight"], fast["bias"]).argmax(-1)

    results = common.evaluate(args, predict, test, runs)
    results.update(training)
    return common.finish(args, f"meta_feature_{args.method}", results)


if __name__ == "__main__":
    main()
