"""ANIL (Almost No Inner Loop) on Omniglot's minimal splits: only the head adapts per task.

Raghu, Raghu, Bengio and Vinyals (2020), "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML". The lower problem is the linear head alone, started from the upper's
head (``initialize_from="meta.head"``), on features computed by the upper's Conv4
(``self.meta.module.features(x)``); reverse mode differentiates the query loss through the head's
unroll into both the head initialization and the feature extractor.

Run::

    python examples/anil_omniglot.py --ways 5 --minutes 8 --out results/anil_5way.json
    python examples/anil_omniglot.py --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class Head(mlopt.Problem):
    def training_step(self, task):
        sx, sy, _, _ = task
        return F.cross_entropy(self(self.meta.module.features(sx)), sy)


class MetaLearner(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.head.batch
        logits = self.head(self.module.features(qx))
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n")[0], inner_steps=5, test_steps=10, inner_lr=0.4)
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    net = Conv4(1, args.ways, hidden=args.hidden)
    head = torch.nn.Linear(net.feature_dim, args.ways)
    task = Head(
        "head",
        head,
        torch.optim.SGD(head.parameters(), lr=args.inner_lr),
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(unroll_steps=args.inner_steps, initialize_from="meta.head"),
    )
    meta = MetaLearner(
        "meta",
        net,
        torch.optim.Adam(net.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, meta, task)
    predict = common.maml_predictor(
        net, args.test_steps, args.inner_lr, adapted=["head.weight", "head.bias"]
    )
    results = common.evaluate(args, predict, test, runs)
    results.update(training)
    return common.finish(args, "anil", results)


if __name__ == "__main__":
    main()
