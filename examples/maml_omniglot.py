"""MAML on Omniglot's minimal splits, through the Engine or as vectorized meta-batches.

Finn, Abbeel and Levine (2017), "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks". Two equivalent formulations (same gradient, tested in tests/test_meta_vectorize.py):

- ``--path engine`` (default; the fastest on a CPU): a bilevel program. The lower problem
  ``task`` adapts a Conv4 to one task (``unroll_steps`` SGD steps from the upper's weights,
  ``initialize_from="meta"``); the upper ``meta`` differentiates its query loss through the
  unroll (``type="reverse"``, or ``"first_order"`` for FOMAML) and averages ``--meta-batch``
  tasks (``gradient_accumulation``).
- ``--path vmap | loop | auto``: one problem whose ``training_step`` returns the mean per-task
  meta-gradient of a meta-batch, computed by :func:`mlopt.meta.meta_gradients` with vmap or a
  loop (``auto``: loop on the CPU, vmap on a GPU).

Run::

    python examples/maml_omniglot.py --ways 5 --minutes 8 --out results/maml_5way.json
    python examples/maml_omniglot.py --ways 20 --inner-lr 0.1 --out results/maml_20way.json
    python examples/maml_omniglot.py --smoke
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import mlopt
from mlopt.data import TaskLoader
from mlopt.meta import maml_task_loss, meta_gradients
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class TaskLearner(mlopt.Problem):
    """Lower: the support loss of one task, from the meta-initialization."""

    def training_step(self, task):
        support_x, support_y, _, _ = task
        return F.cross_entropy(self(support_x), support_y)


class MetaLearner(mlopt.Problem):
    """Upper: the query loss of the adapted task learner."""

    def training_step(self, batch):
        _, _, query_x, query_y = self.task.batch
        logits = self.task(query_x)
        acc = (logits.argmax(-1) == query_y).float().mean()
        return {"loss": F.cross_entropy(logits, query_y), "accuracy": acc}


class VectorizedMAML(mlopt.Problem):
    """One problem: per-task meta-gradients of a whole meta-batch (vmap or loop)."""

    def __init__(self, *a, task_loss, mode, **k):
        super().__init__(*a, **k)
        self.task_loss, self.mode = task_loss, mode

    def training_step(self, tasks):
        params = self.named_parameters()
        out = meta_gradients(self.task_loss, params, tasks, mode=self.mode, has_aux=True)
        grads = tuple(out.gradients[n] for n in params)
        return {"loss": out.loss, "gradient": grads, "accuracy": out.aux}


def build(args, net, sampler):
    """The Engine for ``args.path``; returns (engine, number of meta-updates per iteration)."""
    meta_opt = torch.optim.Adam(net.parameters(), lr=args.outer_lr)
    if args.path == "engine":
        inner_net = Conv4(1, args.ways, hidden=args.hidden)
        task = TaskLearner(
            "task",
            inner_net,
            torch.optim.SGD(inner_net.parameters(), lr=args.inner_lr),
            train_data_loader=sampler,
            config=mlopt.Config(
                type="first_order" if args.first_order else "reverse",
                unroll_steps=args.inner_steps,
                initialize_from="meta",
            ),
        )
        meta = MetaLearner(
            "meta", net, meta_opt, config=mlopt.Config(gradient_accumulation=args.meta_batch)
        )
        iters = args.iterations * args.meta_batch * args.inner_steps
        deps = {"u2l": {meta: [task]}, "l2u": {task: [meta]}}
        engine = common.TimedEngine(
            [meta, task], deps, common.timed_config(iters), minutes=args.minutes
        )
        return engine, 1.0 / (args.meta_batch * args.inner_steps)
    loss = maml_task_loss(net, args.inner_steps, args.inner_lr, first_order=args.first_order)
    meta = VectorizedMAML(
        "meta",
        net,
        meta_opt,
        train_data_loader=TaskLoader(sampler, args.meta_batch),
        task_loss=loss,
        mode=args.path,
    )
    engine = common.TimedEngine(
        [meta], {}, common.timed_config(args.iterations), minutes=args.minutes
    )
    return engine, 1.0


def main(argv: list[str] | None = None, name: str = "maml", **defaults) -> dict:
    p = common.parser(__doc__.split("\n")[0], **defaults)
    # engine: fastest on a CPU (benchmarks/maml_benchmark.py); vmap/auto: for GPUs
    p.add_argument("--path", choices=["engine", "auto", "vmap", "loop"], default="engine")
    p.add_argument("--first-order", action="store_true", help="FOMAML")
    p.add_argument(
        "--extra-test-steps", type=int, default=None, help="also score with this many test steps"
    )
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    net = Conv4(1, args.ways, hidden=args.hidden)  # transductive batch norm, as in MAML
    engine, per_iter = build(args, net, common.task_stream(args, train))
    print(engine)
    t0 = time.perf_counter()
    engine.run()
    train_seconds = time.perf_counter() - t0
    predict = common.maml_predictor(net, args.test_steps, args.inner_lr)
    results = common.evaluate(args, predict, test, runs)
    if args.extra_test_steps is not None:  # the same model adapted for another number of steps
        other = common.maml_predictor(net, args.extra_test_steps, args.inner_lr)
        extra = common.evaluate(args, other, test, runs)
        results[f"test_steps_{args.extra_test_steps}"] = {
            k: v for k, v in extra.items() if k != "eval_seconds"
        }
    results.update(
        meta_updates=int(engine.iteration * per_iter), train_seconds=round(train_seconds, 1)
    )
    return common.finish(args, name, results)


if __name__ == "__main__":
    main()
