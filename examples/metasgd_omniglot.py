"""Meta-SGD on Omniglot's minimal splits: a learned learning rate for every weight.

Li, Zhou, Chen and Li (2017), "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning": the
inner update is ``θ ← θ - α ⊙ ∇L_support(θ)`` with ``α`` a tensor of the shape of ``θ``,
meta-learned with the initialization (BOML's variant learns a single scalar). In mlopt the
upper module is ``mlopt.meta.MetaSGD(model)`` (``.model`` and ``.lrs``), the lower starts from
``initialize_from="meta.model"`` and returns the learned rates from ``learning_rates()``; the
reverse-mode unroll differentiates through them.

Run::

    python examples/metasgd_omniglot.py --ways 5 --minutes 8 --out results/metasgd_5way.json
    python examples/metasgd_omniglot.py --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.meta import MetaSGD
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class TaskLearner(mlopt.Problem):
    def training_step(self, task):
        sx, sy, _, _ = task
        return F.cross_entropy(self(sx), sy)

    def learning_rates(self):
        return list(self.meta.module.lrs)  # the upper's current learned rates


class MetaLearner(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        logits = self.task(qx)
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.split("\n")[0]).parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    meta_module = MetaSGD(Conv4(1, args.ways, hidden=args.hidden), init_lr=args.inner_lr)
    inner_net = Conv4(1, args.ways, hidden=args.hidden)
    task = TaskLearner(
        "task",
        inner_net,
        torch.optim.SGD(inner_net.parameters(), lr=args.inner_lr),  # rates come from the upper
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(unroll_steps=args.inner_steps, initialize_from="meta.model"),
    )
    meta = MetaLearner(
        "meta",
        meta_module,
        torch.optim.Adam(meta_module.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, meta, task)
    lrs = {k: v.detach() for k, v in meta_module.lr_dict().items()}
    predict = common.maml_predictor(meta_module.model, args.test_steps, lrs)
    results = common.evaluate(args, predict, test, runs)
    results.update(
        **training,
        mean_learned_lr=float(torch.cat([t.detach().flatten() for t in meta_module.lrs]).mean()),
    )
    return common.finish(args, "metasgd", results)


if __name__ == "__main__":
    main()
