"""iMAML on Omniglot's minimal splits: implicit meta-gradients, well posed on a non-convex Conv4.

Rajeswaran, Finn, Kakade and Levine (2019), "Meta-Learning with Implicit Gradients". Each task
solves ``min_θ f(θ) = L_support(θ) + (λ/2)||θ - φ||²`` from ``θ = φ`` (the meta-initialization),
and the meta-gradient is ``λ (H + λI)^{-1} ∇_θ L_query(θ*)`` with ``H`` the support-loss Hessian.
In mlopt the proximal term goes into the lower loss (``mlopt.meta.proximal_term``: the upper's
parameters appear in it, a u2l dependency) and the lower's hypergradient method solves the
implicit-function-theorem system ``(∂²f/∂θ²) w = v`` with ``∂²f/∂θ² = H + λI``.

On a Conv4 ``H + λI`` is indefinite (Hessian eigenvalues far below ``-λ``), where conjugate
gradient is not defined. This example therefore (``SolverLog`` below, a user-defined method):

- solves ``(H + (λ + d) I) w = v`` by CG (``--solver cg``) or MINRES (``--solver minres``), with
  a damping ``d`` that is either fixed (``--damping 20``) or chosen from the measured curvature
  (``--damping auto``: every ``--curvature-every`` solves, a few Lanczos steps on ``H + λI`` at
  the task solution estimate its smallest eigenvalue ``μ``, and ``d = factor · max(0, -μ)``);
- logs, per solve, the relative residual ``||r|| / ||v||``, whether CG met negative curvature,
  and the inner gradient norm ``||∇_θ f(θ*)||`` (how well the proximal problem was solved),
  and reports their means in the results (``solver`` key).

Run::

    python examples/imaml_omniglot.py --ways 5 --minutes 30 --out results/imaml_5way.json
    python examples/imaml_omniglot.py --ways 5 --iterations 500 --minutes 1e9
    python examples/imaml_omniglot.py --smoke
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import mlopt
from mlopt.hypergrad import LowerContext, Method, Vec, implicit_method_vjp
from mlopt.linalg import cg, minres
from mlopt.meta import adapt, proximal_term
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


def lanczos_min_eigenvalue(matvec: Callable[[Vec], Vec], like: Vec, steps: int, seed: int) -> float:
    """Smallest Ritz value of a symmetric operator after ``steps`` Lanczos steps.

    Ritz values lie inside the spectrum, so this is an upper bound on the smallest eigenvalue
    that tightens with ``steps`` (full reorthogonalisation on the flattened vectors).
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [t.numel() for t in like]

    def flat_op(x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, sizes)
        out = matvec(tuple(p.view_as(t) for p, t in zip(parts, like)))
        return torch.cat([o.detach().reshape(-1) for o in out])

    q = torch.randn(sum(sizes), generator=gen, dtype=like[0].dtype)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for k in range(steps):
        w = flat_op(basis[-1])
        alphas.append(float(w @ basis[-1]))
        for b in basis:  # full reorthogonalisation
            w = w - (w @ b) * b
        beta = float(w.norm())
        if k == steps - 1 or beta < 1e-8:
            break
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tri)[0])


@dataclass(repr=False)
class SolverLog(Method):
    """Implicit hypergradient ``(∂²f/∂θ²  + d I) w = v`` by CG or MINRES, with diagnostics.

    Args:
        solver: ``"cg"`` or ``"minres"`` (:func:`mlopt.linalg.cg` / :func:`mlopt.linalg.minres`).
        iterations: solver iterations (all of them run: ``tol=0``).
        damping: the fixed damping ``d``, or the current one when ``auto``.
        auto: re-estimate ``d = factor · max(0, -μ)`` every ``every`` solves, ``μ`` the smallest
            Lanczos Ritz value of ``∂²f/∂θ²`` (``lanczos`` steps) at the solve's point; ``d`` is
            the largest of the last ``window`` estimates.
    """

    solver: str = "cg"
    iterations: int = 5
    damping: float = 0.0
    auto: bool = False
    factor: float = 1.5
    every: int = 16
    lanczos: int = 10
    window: int = 8
    records: list = field(default_factory=list)
    estimates: list = field(default_factory=list)

    name = "imaml_logged"

    def _measure(self, ctx: LowerContext) -> None:
        with torch.enable_grad():
            theta = tuple(p.detach().requires_grad_(True) for p in ctx.params)
            grads = ctx.grad_fn(theta)

            def hvp(v: Vec) -> Vec:
                return torch.autograd.grad(grads, theta, v, retain_graph=True)

            mu = lanczos_min_eigenvalue(hvp, theta, self.lanczos, seed=len(self.records))
        self.estimates.append(mu)
        recent = self.estimates[-self.window :]
        self.damping = self.factor * max(0.0, -min(recent))

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        if self.auto and len(self.records) % self.every == 0:
            self._measure(ctx)
        with torch.enable_grad():
            theta = tuple(p.detach().requires_grad_(True) for p in ctx.params)
            inner = torch.sqrt(sum((g.detach() ** 2).sum() for g in ctx.grad_fn(theta)))
        fn = cg if self.solver == "cg" else minres
        record = {"damping": self.damping, "inner_grad_norm": float(inner)}

        def solve(matvec: Callable[[Vec], Vec], b: Vec) -> Vec:
            x, info = fn(
                matvec,
                b,
                iterations=self.iterations,
                tol=0.0,
                damping=self.damping,
                return_info=True,
            )
            record["relative_residual"] = info.residual / max(info.initial_residual, 1e-30)
            record["negative_curvature"] = bool(info.negative_curvature)
            return x

        out = implicit_method_vjp(ctx, cotangent, solve)
        self.records.append(record)
        return out

    def summary(self, last: int | None = None) -> dict:
        """Means of the logged diagnostics (over the last ``last`` solves if given)."""
        rows = self.records[-last:] if last else self.records
        if not rows:
            return {}
        mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)  # noqa: E731
        out = {
            "solves": len(rows),
            "relative_residual": mean("relative_residual"),
            "max_relative_residual": max(r["relative_residual"] for r in rows),
            "negative_curvature_fraction": mean("negative_curvature"),
            "inner_grad_norm": mean("inner_grad_norm"),
            "damping": mean("damping"),
        }
        return {
            k: round(v, 5) if isinstance(v, float) and math.isfinite(v) else v
            for k, v in out.items()
        }


class TaskLearner(mlopt.Problem):
    def __init__(self, *a, lam, **k):
        super().__init__(*a, **k)
        self.lam = lam

    def training_step(self, task):
        sx, sy, _, _ = task
        prox = proximal_term(self.parameters(), self.meta.parameters(), self.lam)
        return F.cross_entropy(self(sx), sy) + prox


class MetaLearner(mlopt.Problem):
    def __init__(self, *a, method: SolverLog, log_every: int, per_update: int, **k):
        super().__init__(*a, **k)
        self.method, self.log_every, self.per_update, self.calls = method, log_every, per_update, 0

    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        logits = self.task(qx)
        self.calls += 1
        update = self.calls // self.per_update
        if self.calls % (self.log_every * self.per_update) == 0:
            print(
                f"update {update}: {self.method.summary(self.log_every * self.per_update)}",
                flush=True,
            )
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__.split("\n")[0], inner_steps=10, test_steps=16, inner_lr=0.03, meta_batch=8
    )
    p.add_argument("--lam", type=float, default=2.0, help="proximal strength λ")
    p.add_argument("--cg-steps", type=int, default=5, help="solver iterations")
    p.add_argument("--solver", choices=["cg", "minres"], default="cg")
    p.add_argument("--damping", default="auto", help="a number, or 'auto' (from the curvature)")
    p.add_argument("--damping-factor", type=float, default=1.5)
    p.add_argument("--curvature-every", type=int, default=16, help="solves between estimates")
    p.add_argument("--log-every", type=int, default=25, help="meta-updates between log lines")
    args = p.parse_args(argv)
    common.setup(args)
    if args.smoke:
        args.cg_steps, args.curvature_every = 2, 1
    train, test, runs = common.load_data(args)
    net, inner_net = (
        Conv4(1, args.ways, hidden=args.hidden),
        Conv4(1, args.ways, hidden=args.hidden),
    )
    auto = args.damping == "auto"
    method = SolverLog(
        args.solver,
        args.cg_steps,
        0.0 if auto else float(args.damping),
        auto=auto,
        factor=args.damping_factor,
        every=args.curvature_every,
    )
    task = TaskLearner(
        "task",
        inner_net,
        torch.optim.SGD(inner_net.parameters(), lr=args.inner_lr),
        train_data_loader=common.task_stream(args, train),
        config=mlopt.Config(type=method, unroll_steps=args.inner_steps, initialize_from="meta"),
        lam=args.lam,
    )
    meta = MetaLearner(
        "meta",
        net,
        torch.optim.Adam(net.parameters(), lr=args.outer_lr),
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
        method=method,
        log_every=args.log_every,
        per_update=args.meta_batch,
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
    results["solver"] = {
        "all": method.summary(),
        "last_100_updates": method.summary(100 * args.meta_batch),
        "curvature_estimates": [
            round(m, 3) for m in method.estimates[:: max(1, len(method.estimates) // 50)]
        ],
    }
    return common.finish(args, "imaml", results)


if __name__ == "__main__":
    main()
