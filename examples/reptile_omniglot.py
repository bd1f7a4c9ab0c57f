"""Reptile on Omniglot's minimal splits.

Nichol, Achiam and Schulman (2018), "On First-Order Meta-Learning Algorithms": adapt to a task
with a few optimizer steps on its examples, then move the initialization toward the adapted
weights. In mlopt the lower problem's ``Config(type="reptile")`` gives the upper the gradient
``θ_init - θ_adapted``; an upper SGD step of size ε (``--outer-lr``) on the mean over the
meta-batch is Reptile's batched update ``θ ← θ + ε mean(θ_adapted - θ)``.

``--protocol paper`` (the default) follows the paper's Omniglot setting (its code's
``run_omniglot.py`` options): training tasks with ``--train-shots 10`` examples per class, 5
inner Adam steps (β₁ = 0, lr 1e-3, a fresh optimizer state per task) on mini-batches of
``--inner-batch 10``, meta-batch 5, the outer step size annealed linearly from 1 to 0 over
``--iterations`` meta-updates, and 50 Adam steps on the support set at test time.
``--protocol sgd`` is the earlier setting: 5 full-batch SGD steps at lr 0.1 on support and query,
outer SGD 0.5, 10 SGD test steps.

Run::

    python examples/reptile_omniglot.py --ways 5 --iterations 3000 --minutes 30 \
        --out results/reptile_5way.json
    python examples/reptile_omniglot.py --smoke
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import mlopt
from mlopt.data import EpisodicSampler
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class TaskLearner(mlopt.Problem):
    """Lower: optimizer steps on the task's examples, full batch or cycling mini-batches."""

    def __init__(self, *a, inner_batch: int = 0, seed: int = 0, **k):
        super().__init__(*a, **k)
        self.inner_batch, self.position, self.tasks = inner_batch, 0, 0
        self.seed, self.order = seed, None

    def on_inner_loop_start(self):
        self.position = 0  # a new task: a new shuffled order of its examples

    def training_step(self, task):
        sx, sy, qx, qy = task
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        if self.inner_batch:
            if self.position == 0:  # seeded by the task count: reproducible
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.tasks)
                self.order, self.tasks = torch.randperm(len(x), generator=gen), self.tasks + 1
            start = self.position % len(x)
            take = self.order[torch.arange(start, start + self.inner_batch) % len(x)]
            self.position += self.inner_batch
            x, y = x[take], y[take]
        return F.cross_entropy(self(x), y)


class Initialization(mlopt.Problem):
    """Upper: Reptile's gradient comes from the lower's method; the loss is only logged."""

    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        with torch.no_grad():
            return F.cross_entropy(self.task(qx), qy)


def adam_predictor(net: torch.nn.Module, steps: int, lr: float):
    """``predict``: ``steps`` Adam steps (β₁ = 0) on the support set from the initialization."""

    def predict(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        model = copy.deepcopy(net)
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999))
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(sx), sy).backward()
            opt.step()
        with torch.no_grad():
            return model(qx).argmax(-1)

    return predict


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=["paper", "sgd"], default="paper")
    p.add_argument("--train-shots", type=int, default=10, help="examples per class (paper)")
    p.add_argument("--inner-batch", type=int, default=10, help="inner mini-batch (paper)")
    args, _ = p.parse_known_args(argv)
    if args.protocol == "paper":
        p.set_defaults(inner_steps=5, inner_lr=1e-3, outer_lr=1.0, test_steps=50, meta_batch=5)
    else:
        p.set_defaults(inner_steps=5, inner_lr=0.1, outer_lr=0.5, test_steps=10)
    args = p.parse_args(argv)
    common.setup(args)
    paper = args.protocol == "paper"
    if args.smoke:
        args.train_shots, args.inner_batch = 2, 4
    train, test, runs = common.load_data(args)
    net, inner_net = (
        Conv4(1, args.ways, hidden=args.hidden),
        Conv4(1, args.ways, hidden=args.hidden),
    )
    if paper:  # train-shots examples per class, all used by the inner loop
        shots, queries = 1, args.train_shots - 1
        stream = EpisodicSampler(train, args.ways, shots, queries, seed=args.seed, augment="rotate")
        inner_opt = torch.optim.Adam(inner_net.parameters(), lr=args.inner_lr, betas=(0.0, 0.999))
    else:
        stream = common.task_stream(args, train)
        inner_opt = torch.optim.SGD(inner_net.parameters(), lr=args.inner_lr)
    task = TaskLearner(
        "task",
        inner_net,
        inner_opt,
        train_data_loader=stream,
        config=mlopt.Config(
            type="reptile",
            unroll_steps=args.inner_steps,
            initialize_from="init",
            resample="window",
        ),
        inner_batch=args.inner_batch if paper else 0,
        seed=args.seed,
    )
    outer_opt = torch.optim.SGD(net.parameters(), lr=args.outer_lr)
    schedule = None
    if paper:  # linear annealing 1 -> 0 over the --iterations meta-updates
        total = max(1, args.iterations)
        schedule = torch.optim.lr_scheduler.LambdaLR(outer_opt, lambda k: max(0.0, 1 - k / total))
    init = Initialization(
        "init",
        net,
        outer_opt,
        scheduler=schedule,
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, init, task)
    if paper:
        predict = adam_predictor(net, args.test_steps, args.inner_lr)
    else:
        predict = common.maml_predictor(net, args.test_steps, args.inner_lr)
    results = common.evaluate(args, predict, test, runs)
    results.update(training)
    results["final_outer_lr"] = outer_opt.param_groups[0]["lr"]
    return common.finish(args, "reptile", results)


if __name__ == "__main__":
    main()
