"""WarpGrad on Omniglot's minimal splits: warp layers meta-learned between the task layers.

Flennerhag, Rusu, Pascanu, Visin, Yin and Hadsell (2020), "Meta-Learning with Warped Gradient
Descent". The task learner (Conv4, the lower problem) adapts its blocks; after each block the
upper's warp layer (a convolution, identity at start, never adapted) transforms the
activations, which preconditions the task layers' gradients. The warps minimize the loss one
warped step after a point of the task's trajectory, with the trajectory held constant
(``Config(type="warpgrad")``: reverse mode through the window's last update only), and the
initialization moves by Reptile's rule. ``mlopt.meta.WarpGrad`` documents the choices.

Run::

    python examples/warpgrad_omniglot.py --ways 5 --minutes 8 --out results/warpgrad_5way.json
    python examples/warpgrad_omniglot.py --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.meta import WarpNet, warp_forward
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class TaskLearner(mlopt.Problem):
    def training_step(self, task):
        sx, sy, qx, qy = task
        return F.cross_entropy(warp_forward(self.module, self.meta.module.warps, sx), sy)


class Warps(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        logits = warp_forward(self.task.module, self.module.warps, qx)
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__.split("\n")[0], inner_steps=5, test_steps=10, inner_lr=0.1, outer_lr=1e-3
    )
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    warp = WarpNet(Conv4(1, args.ways, hidden=args.hidden))
    inner = Conv4(1, args.ways, hidden=args.hidden)
    task = TaskLearner(
        "task",
        inner,
        torch.optim.SGD(inner.parameters(), lr=args.inner_lr),
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(
            type="warpgrad", unroll_steps=args.inner_steps, initialize_from="meta.model"
        ),
    )
    meta = Warps(
        "meta",
        warp,
        torch.optim.Adam(warp.parameters(), lr=args.outer_lr),  # warps and initialization
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, meta, task)
    params = {k: v.detach() for k, v in warp.named_parameters()}
    model_names = [k for k in params if k.startswith("model.")]
    predict = common.maml_predictor(
        warp, args.test_steps, args.inner_lr, adapted=model_names, params=params
    )
    results = common.evaluate(args, predict, test, runs)
    results.update(training)
    return common.finish(args, "warpgrad", results)


if __name__ == "__main__":
    main()
