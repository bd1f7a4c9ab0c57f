"""MT-net on Omniglot's minimal splits: learned transforms and update masks.

Lee and Choi (2018), "Gradient-Based Meta-Learning with Learned Layerwise Metric and Subspace".
The task learner (a Conv4, the lower problem) adapts its weights ``W``; after every layer the
upper's meta-learned transform ``T`` (never adapted) is applied, ``y = T(W x)``
(``mlopt.meta.mtnet_forward``), and only the output units picked by a per-task binary mask ``M``
(sampled from Bernoulli(sigmoid(ζ)), Gumbel-softmax straight-through) are updated:
``W ← W - α M ⊙ ∇W``, given to the Engine as per-element learning rates by
``learning_rates()``. Reverse mode meta-learns the initialization, ``T`` and ``ζ``.

Run::

    python examples/mtnet_omniglot.py --ways 5 --minutes 8 --out results/mtnet_5way.json
    python examples/mtnet_omniglot.py --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.meta import MTNet, adapt, mtnet_forward
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class TaskLearner(mlopt.Problem):
    def __init__(self, *a, lr, seed, **k):
        super().__init__(*a, **k)
        self.lr, self.gen = lr, torch.Generator().manual_seed(seed)

    def on_inner_loop_start(self):  # one mask per task, for all its inner steps
        meta = self.meta.module
        self.rates = meta.learning_rates(
            list(self.named_parameters()),
            self.lr,
            generator=self.gen,
            logits=list(meta.mask_logits),
        )

    def learning_rates(self):
        return self.rates

    def training_step(self, task):
        sx, sy, _, _ = task
        return F.cross_entropy(mtnet_forward(self.module, self.meta.module.transforms, sx), sy)


class MetaLearner(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        logits = mtnet_forward(self.task.module, self.module.transforms, qx)
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    mt = MTNet(Conv4(1, args.ways, hidden=args.hidden), temperature=args.temperature)
    inner = Conv4(1, args.ways, hidden=args.hidden)
    task = TaskLearner(
        "task",
        inner,
        torch.optim.SGD(inner.parameters(), lr=args.inner_lr),
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(unroll_steps=args.inner_steps, initialize_from="meta.model"),
        lr=args.inner_lr,
        seed=args.seed,
    )
    meta = MetaLearner(
        "meta",
        mt,
        torch.optim.Adam(mt.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, meta, task)
    params = {k: v.detach() for k, v in mt.named_parameters()}
    names = [n for n, _ in mt.model.named_parameters()]
    gen = torch.Generator().manual_seed(args.seed + 1)

    def predict(sx, sy, qx):
        with torch.no_grad():
            rates = mt.learning_rates(names, args.inner_lr, generator=gen)
        rates = {f"model.{n}": r for n, r in zip(names, rates)}
        run = lambda p, x: torch.func.functional_call(mt, p, (x,))  # noqa: E731
        loss = lambda p: F.cross_entropy(run(p, sx), sy)  # noqa: E731
        fast = adapt(loss, params, args.test_steps, rates, adapted=list(rates))
        with torch.no_grad():
            return run(fast, qx).argmax(-1)

    results = common.evaluate(args, predict, test, runs)
    with torch.no_grad():
        keep = torch.cat([torch.sigmoid(z).flatten() for z in mt.mask_logits]).mean()
    results.update(
        **training,
        mean_mask_probability=float(keep),
    )
    return common.finish(args, "mtnet", results)


if __name__ == "__main__":
    main()
