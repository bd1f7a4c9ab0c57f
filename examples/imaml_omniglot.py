"""iMAML on Omniglot's minimal splits: implicit meta-gradients with conjugate gradient.

Rajeswaran, Finn, Kakade and Levine (2019), "Meta-Learning with Implicit Gradients". Each task
solves ``min_θ L_support(θ) + (λ/2)||θ - φ||²`` from ``θ = φ`` (the meta-initialization), and the
meta-gradient is ``λ (H + λI)^{-1} ∇_θ L_query(θ)`` with ``H`` the support-loss Hessian, whatever
path the inner optimizer took. In mlopt the proximal term goes into the lower loss
(``mlopt.meta.proximal_term``: the upper's parameters appear in it, a u2l dependency) and the
lower uses ``Config(type=CG(iterations=...))``: the implicit-function-theorem hypergradient
``-(∂²f/∂φ∂θ)(∂²f/∂θ²)^{-1} v`` of that loss is exactly iMAML's (``∂²f/∂θ² = H + λI`` already
holds λ, so no extra damping).

Run::

    python examples/imaml_omniglot.py --ways 5 --minutes 8 --out results/imaml_5way.json
    python examples/imaml_omniglot.py --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.hypergrad import CG
from mlopt.meta import adapt, proximal_term
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class TaskLearner(mlopt.Problem):
    def __init__(self, *a, lam, **k):
        super().__init__(*a, **k)
        self.lam = lam

    def training_step(self, task):
        sx, sy, _, _ = task
        prox = proximal_term(self.parameters(), self.meta.parameters(), self.lam)
        return F.cross_entropy(self(sx), sy) + prox


class MetaLearner(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        logits = self.task(qx)
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n")[0], inner_steps=5, test_steps=5, inner_lr=0.1)
    p.add_argument("--lam", type=float, default=2.0, help="proximal strength λ")
    p.add_argument("--cg-steps", type=int, default=5)
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
        config=mlopt.Config(
            type=CG(iterations=args.cg_steps), unroll_steps=args.inner_steps, initialize_from="meta"
        ),
        lam=args.lam,
    )
    meta = MetaLearner(
        "meta",
        net,
        torch.optim.Adam(net.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, meta, task)
    init = {k: v.detach() for k, v in net.named_parameters()}

    def predict(sx, sy, qx):  # the same regularized task problem at test time
        def loss(p):
            prox = proximal_term(list(p.values()), list(init.values()), args.lam)
            return F.cross_entropy(torch.func.functional_call(net, p, (sx,)), sy) + prox

        fast = adapt(loss, init, args.test_steps, args.inner_lr)
        with torch.no_grad():
            return torch.func.functional_call(net, fast, (qx,)).argmax(-1)

    results = common.evaluate(args, predict, test, runs)
    results.update(training)
    return common.finish(args, "imaml", results)


if __name__ == "__main__":
    main()
