"""Reptile on Omniglot's minimal splits.

Nichol, Achiam and Schulman (2018), "On First-Order Meta-Learning Algorithms": adapt to a task
with plain SGD on all its examples, then move the initialization toward the adapted weights.
In mlopt the lower problem's ``Config(type="reptile")`` gives the upper the gradient
``θ_init - θ_adapted``; an upper SGD step of size ε (``--outer-lr``) on the mean over the
meta-batch is Reptile's batched update ``θ ← θ + ε mean(θ_adapted - θ)``.

Run::

    python examples/reptile_omniglot.py --ways 5 --minutes 8 --out results/reptile_5way.json
    python examples/reptile_omniglot.py --smoke
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


class TaskLearner(mlopt.Problem):
    """Lower: SGD on all examples of the task (support and query)."""

    def training_step(self, task):
        sx, sy, qx, qy = task
        return F.cross_entropy(self(torch.cat([sx, qx])), torch.cat([sy, qy]))


class Initialization(mlopt.Problem):
    """Upper: Reptile's gradient comes from the lower's method; the loss is only logged."""

    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        with torch.no_grad():
            return F.cross_entropy(self.task(qx), qy)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__.split("\n")[0], inner_steps=5, inner_lr=0.1, outer_lr=0.5, test_steps=10
    )
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    net, inner_net = (
        Conv4(1, args.ways, hidden=args.hidden),
        Conv4(1, args.ways, hidden=args.hidden),
    )
    task = TaskLearner(
        "task",
        inner_net,
        torch.optim.SGD(inner_net.parameters(), lr=args.inner_lr),
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(type="reptile", unroll_steps=args.inner_steps, initialize_from="init"),
    )
    init = Initialization(
        "init",
        net,
        torch.optim.SGD(net.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, init, task)
    predict = common.maml_predictor(net, args.test_steps, args.inner_lr)
    results = common.evaluate(args, predict, test, runs)
    results.update(training)
    return common.finish(args, "reptile", results)


if __name__ == "__main__":
    main()
