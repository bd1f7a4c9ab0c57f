"""Meta-feature learning on Omniglot's minimal splits: a shared feature extractor (upper) and a
per-task head solved in the lower level (BOML's setting; R2-D2 with a ridge head).

Franceschi et al. (2018), "Bilevel Programming for Hyperparameter Optimization and
Meta-Learning", BOML (Liu et al. 2021), and Bertinetto et al. (2019), "Meta-learning with
differentiable closed-form solvers" (R2-D2): the upper problem is the hyper-representation (a
Conv4 without head, plus R2-D2's learned logit scale and ridge strength), the lower one a linear
head on its features, reset to zero at the start of every task, fitted on the support set; the
query loss of the fitted head trains the features. ``--method`` picks the lower and its
hypergradient:

- ``ridge`` (default): the head minimises ``½||X W - Y||² + (λ/2)||W||²`` (one-hot ``Y``), a
  quadratic whose single Newton step from ``W = 0`` is its exact solution (``NewtonStep`` below,
  an optimizer the Engine runs like any other); the implicit hypergradient solves the lower
  Hessian system ``(XᵀX + λI) w = v`` exactly (``RidgeImplicit``: the same as autograd through
  the closed form). ``ridge_cg`` solves that system by the library's ``CG`` instead.
- ``reverse`` (RHG), ``trhg`` (``Reverse(truncate=...)``), ``cg`` or ``first_order``: a
  cross-entropy head trained by ``--inner-steps`` SGD steps with an L2 penalty.

For Lake's one-shot runs (``--held-out 0 --ways 20``), ``--within-alphabet`` draws each
training task's classes from one alphabet, ``--train-ways`` sets their number, ``--jitter``
distorts every training image (deterministically per task), and ``--test-augment K`` adds ``K``
jittered copies of each support image at test time (more support rows, never any use of the
query images' structure).

Run::

    python examples/meta_feature_omniglot.py --ways 20 --held-out 0 --within-alphabet \
        --train-ways 20 --jitter --minutes 30 --out results/r2d2_lake.json
    python examples/meta_feature_omniglot.py --method reverse --out results/metafeat_rhg.json
    python examples/meta_feature_omniglot.py --smoke
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import mlopt
from mlopt.hypergrad import CG, LowerContext, Method, Reverse, Vec, implicit_method_vjp
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


class Embedding(torch.nn.Module):
    """Conv4 features plus R2-D2's meta-learned logit scale and ridge strength (log scale)."""

    def __init__(self, hidden: int, batch_norm: str, lam: float) -> None:
        super().__init__()
        self.body = Conv4(1, None, hidden=hidden, batch_norm=batch_norm)
        self.feature_dim = self.body.feature_dim
        self.log_scale = torch.nn.Parameter(torch.tensor(0.0))
        self.log_lam = torch.nn.Parameter(torch.tensor(float(lam)).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def ridge_system(feats: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``XᵀX + λI``: the Hessian of the ridge head's loss in each column of ``W``."""
    eye = torch.eye(feats.shape[1], dtype=feats.dtype)
    return feats.T @ feats + lam * eye


def ridge_solution(feats: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor, ways: int):
    """Closed-form head ``Wᵀ = (XᵀX + λI)^{-1} Xᵀ Y`` (rows: classes), for prediction."""
    y = F.one_hot(labels, ways).to(feats.dtype)
    return torch.linalg.solve(ridge_system(feats, lam), feats.T @ y).T


class NewtonStep(torch.optim.Optimizer):
    """``W ← W - ∇f(W) A^{-1}`` with ``A`` the quadratic lower loss's Hessian, set by the problem
    before each step (``self.system``): the exact minimiser of the ridge loss in one step."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 1.0})
        self.system: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(torch.linalg.solve(self.system, p.grad.T).T)


class RidgeImplicit(Method):
    """Implicit hypergradient of the ridge head with the lower Hessian system solved exactly:
    ``∂²f/∂W² = A ⊗ I`` with ``A = XᵀX + λI``, so ``w = v A^{-1}`` (``A`` shared with the
    optimizer: the lower problem stores it at every step)."""

    name = "ridge_implicit"

    def __init__(self, optimizer: NewtonStep) -> None:
        self.optimizer = optimizer

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        system = self.optimizer.system

        def solve(matvec: Callable[[Vec], Vec], b: Vec) -> Vec:
            return (torch.linalg.solve(system, b[0].T).T,)

        return implicit_method_vjp(ctx, cotangent, solve)


class RidgeHead(mlopt.Problem):
    """Lower: the ridge head ``½||X Wᵀ - Y||² + (λ/2)||W||²`` on the support features ``X``."""

    def on_inner_loop_start(self):
        reset_parameters(self)

    def training_step(self, task):
        sx, sy, _, _ = task
        emb = self.features.module
        feats, lam = self.features(sx), emb.log_lam.exp()
        self.optimizer.system = ridge_system(feats.detach(), lam.detach())
        y = F.one_hot(sy, self.module.out_features).to(feats.dtype)
        residual = F.linear(feats, self.module.weight) - y
        return 0.5 * residual.pow(2).sum() + 0.5 * lam * self.module.weight.pow(2).sum()


class SGDHead(mlopt.Problem):
    """Lower: a cross-entropy head with an L2 penalty, trained by SGD."""

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
        logits = self.head(self(qx)) * self.module.log_scale.exp()
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
    p.add_argument("--method", choices=["ridge", "ridge_cg", *sorted(METHODS)], default="ridge")
    p.add_argument("--decay", type=float, default=1e-2, help="L2 penalty of the SGD head")
    p.add_argument("--lam", type=float, default=1.0, help="initial ridge strength λ (learned)")
    p.add_argument("--cg-steps", type=int, default=64, help="CG iterations for ridge_cg")
    p.add_argument("--train-ways", type=int, default=None, help="ways of training tasks")
    p.add_argument("--jitter", action="store_true", help="random affine distortions (train)")
    p.add_argument("--test-augment", type=int, default=0, help="jittered copies per support")
    p.add_argument("--batch-norm", default="running", help="Conv4 batch norm (ridge methods)")
    args = p.parse_args(argv)
    common.setup(args)
    ridge = args.method.startswith("ridge")
    if ridge:
        args.inner_steps = 1  # the Newton step solves the quadratic exactly
    train, test, runs = common.load_data(args)
    ways = args.train_ways or args.ways
    embed = Embedding(args.hidden, args.batch_norm if ridge else "transductive", args.lam)
    head = torch.nn.Linear(embed.feature_dim, ways, bias=not ridge)
    stream = common.task_stream(args, train, ways)
    if ridge:
        opt = NewtonStep(head.parameters())
        method = RidgeImplicit(opt) if args.method == "ridge" else CG(args.cg_steps, tol=1e-6)
        low = RidgeHead(
            "head",
            head,
            opt,
            train_data_loader=stream,
            config=mlopt.Config(type=method, unroll_steps=1, resample="window"),
        )
    else:
        low = SGDHead(
            "head",
            head,
            torch.optim.SGD(head.parameters(), lr=args.inner_lr),
            train_data_loader=stream,
            config=mlopt.Config(
                type=METHODS[args.method](args), unroll_steps=args.inner_steps, resample="window"
            ),
            decay=args.decay,
        )
    up = Features(
        "features",
        embed,
        torch.optim.Adam(embed.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
    )
    training = common.train_bilevel(args, up, low)
    embed.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)

    def predictor(copies: int):
        return lambda sx, sy, qx: predict(sx, sy, qx, copies)

    @torch.no_grad()
    def predict(sx, sy, qx, copies):
        n_ways = int(sy.max()) + 1
        sx, sy = common.support_copies(sx, sy, copies, gen)
        fs, fq = embed(sx), embed(qx)
        if ridge:
            w = ridge_solution(fs, sy, embed.log_lam.exp(), n_ways)
            return F.linear(fq, w).argmax(-1)
        zero = {"weight": torch.zeros(n_ways, fs.shape[1]), "bias": torch.zeros(n_ways)}
        loss = lambda p: head_loss(p["weight"], p["bias"], fs, sy, args.decay)  # noqa: E731
        with torch.enable_grad():
            fast = adapt(loss, zero, args.test_steps, args.inner_lr)
        return F.linear(fq, fast["weight"], fast["bias"]).argmax(-1)

    results = common.evaluate(args, predictor(args.test_augment), test, runs)
    if args.test_augment:  # the same model without test-time augmentation
        plain = common.evaluate(args, predictor(0), test, runs)
        results["without_test_augment"] = {k: v for k, v in plain.items() if k != "eval_seconds"}
    results.update(training)
    results["learned"] = {
        "logit_scale": round(embed.log_scale.exp().item(), 4),
        "ridge_lambda": round(embed.log_lam.exp().item(), 4),
    }
    return common.finish(args, f"meta_feature_{args.method}", results)


if __name__ == "__main__":
    main()
