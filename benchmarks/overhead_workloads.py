"""The Engine-overhead workloads (benchmarks/engine_overhead.py): each as plain PyTorch
(``torch.func.functional_call``) and as an mlopt program, same data, initial values and
hyperparameters, so that their first hypergradients agree.

Each builder returns ``unit() -> hypergradient``, one upper update per call (its lower updates
included).

Example::

    plain, engine = WORKLOADS["rhg-10"]
    hypergradient = plain()()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import mlopt
from mlopt.hypergrad import CG
from mlopt.linalg import cg
from mlopt.testing import capture_gradients

__all__ = [
    "SMOKE",
    "WORKLOADS",
    "darts_mlopt",
    "darts_plain",
    "hpo_mlopt",
    "hpo_plain",
    "rhg_loss",
    "rhg_mlopt",
    "rhg_plain",
]


def _data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp(d: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 10))


# ---------------------------------------------------------------------- RHG data reweighting
def _rhg_setup(d: int, hidden: int, hyper: str):
    """The model, data and the hyperparameter tensor (zeros) of an RHG workload: ``"weights"``
    (128 per-example loss weights, sigmoid) or ``"decay"`` (one log weight decay)."""
    if hyper not in ("weights", "decay"):
        raise ValueError(f"hyper must be 'weights' or 'decay', got {hyper!r}")
    net = _mlp(d, hidden)
    (xt, yt), (xv, yv) = _data(128, d, 10, 1), _data(128, d, 10, 2)
    start = torch.zeros(128) if hyper == "weights" else torch.full((), -4.0)
    return net, start, xt, yt, xv, yv


def rhg_loss(hyper: str, losses: torch.Tensor, value: torch.Tensor, params: Any) -> torch.Tensor:
    """The lower loss of an RHG workload from per-example ``losses``: weighted by
    ``sigmoid(value)``, or their mean plus ``exp(value)/2 ||θ||²`` over ``params``."""
    if hyper == "weights":
        return (torch.sigmoid(value) * losses).mean()
    return losses.mean() + 0.5 * value.exp() * sum((p * p).sum() for p in params)


def rhg_plain(T: int, d: int = 784, hidden: int = 256, hyper: str = "weights"):
    """Plain PyTorch: returns ``unit() -> hypergradient`` (one upper SGD step per call)."""
    net, start, xt, yt, xv, yv = _rhg_setup(d, hidden, hyper)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    value = start.clone().requires_grad_()

    def unit() -> torch.Tensor:
        nonlocal params
        fast = params
        for _ in range(T):
            losses = F.cross_entropy(functional_call(net, fast, (xt,)), yt, reduction="none")
            loss = rhg_loss(hyper, losses, value, fast.values())
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: p - 0.1 * g for (k, p), g in zip(fast.items(), grads)}
        val = F.cross_entropy(functional_call(net, fast, (xv,)), yv)
        (hyper_grad,) = torch.autograd.grad(val, value)
        with torch.no_grad():
            value.sub_(1.0 * hyper_grad)
        params = {k: v.detach().requires_grad_() for k, v in fast.items()}
        return hyper_grad.reshape(-1)

    return unit


def rhg_mlopt(
    T: int,
    d: int = 784,
    hidden: int = 256,
    method: Any = "reverse",
    calls: dict | None = None,
    hyper: str = "weights",
):
    """The RHG program through the Engine with the lower's ``method`` (``unit.engine`` is the
    Engine); ``calls["n"]`` counts the lower's losses when a dict is given."""
    net, start, xt, yt, xv, yv = _rhg_setup(d, hidden, hyper)
    hyper_mod = nn.Module()
    hyper_mod.value = nn.Parameter(start.clone())

    class Fit(mlopt.Problem):
        def training_step(self, batch):
            if calls is not None:
                calls["n"] += 1
            losses = F.cross_entropy(self(xt), yt, reduction="none")
            return rhg_loss(hyper, losses, self.reweight.module.value, self.parameters())

    class Reweight(mlopt.Problem):
        def training_step(self, batch):
            return F.cross_entropy(self.fit(xv), yv)

    fit = Fit(
        "fit",
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        config=mlopt.Config(type=method, unroll_steps=T),
    )
    up_opt = torch.optim.SGD(hyper_mod.parameters(), lr=1.0)
    up = Reweight("reweight", hyper_mod, up_opt)
    seen = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [up, fit],
        {"u2l": {up: [fit]}, "l2u": {fit: [up]}},
        mlopt.EngineConfig(train_iters=10**9, progress=False),
    )

    def unit() -> torch.Tensor:
        for _ in range(T):
            engine.step()
        return seen[-1][0].reshape(-1)

    unit.engine = engine  # type: ignore[attr-defined]
    return unit


# ---------------------------------------------------------------------- implicit HPO
def _hpo_data(d: int = 784):
    (xt, yt), (xv, yv) = _data(256, d, 2, 3), _data(256, d, 2, 4)
    return xt, yt.float(), xv, yv.float()


def hpo_plain(inner: int = 100, d: int = 784):
    xt, yt, xv, yv = _hpo_data(d)
    w = torch.zeros(d, requires_grad=True)
    log_decay = torch.full((d,), -3.0, requires_grad=True)

    def lower(w_, lam):
        logits = xt @ w_
        return F.binary_cross_entropy_with_logits(logits, yt) + 0.5 * (lam.exp() * w_ * w_).sum()

    def unit() -> torch.Tensor:
        nonlocal w
        for _ in range(inner):
            (g,) = torch.autograd.grad(lower(w, log_decay.detach()), w)
            with torch.no_grad():
                w = (w - 0.5 * g).requires_grad_()
        v = torch.autograd.grad(F.binary_cross_entropy_with_logits(xv @ w, yv), w)
        (gw,) = torch.autograd.grad(lower(w, log_decay), w, create_graph=True)

        def hvp(p):
            return torch.autograd.grad(gw, w, p, retain_graph=True)

        (x,) = cg(hvp, v, iterations=10, tol=0.0, check=False)
        (hyper,) = torch.autograd.grad(gw, log_decay, -x)
        with torch.no_grad():
            log_decay.sub_(0.1 * hyper)
        return hyper

    return unit


def hpo_mlopt(inner: int = 100, d: int = 784):
    xt, yt, xv, yv = _hpo_data(d)
    low_mod, up_mod = nn.Module(), nn.Module()
    low_mod.w = nn.Parameter(torch.zeros(d))
    up_mod.log_decay = nn.Parameter(torch.full((d,), -3.0))

    class Lower(mlopt.Problem):
        def training_step(self, batch):
            w, lam = self.module.w, self.upper.module.log_decay
            logits = xt @ w
            return F.binary_cross_entropy_with_logits(logits, yt) + 0.5 * (lam.exp() * w * w).sum()

    class Upper(mlopt.Problem):
        def training_step(self, batch):
            return F.binary_cross_entropy_with_logits(xv @ self.lower.module.w, yv)

    lower = Lower(
        "lower",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=0.5),
        config=mlopt.Config(type=CG(iterations=10, tol=None), unroll_steps=inner),
    )
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.1)
    upper = Upper("upper", up_mod, up_opt)
    seen = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=10**9, progress=False),
    )

    def unit() -> torch.Tensor:
        for _ in range(inner):
            engine.step()
        return seen[-1][0]

    return unit


# ---------------------------------------------------------------------- DARTS
class _Mixed(nn.Module):
    """A 784-128-10 network whose two hidden layers are softmax(α)-mixtures of three ops
    (identity, ReLU(linear), tanh(linear)): DARTS's continuous relaxation."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.head = nn.Linear(d, width), nn.Linear(width, 10)
        self.ops = nn.ModuleList(
            nn.ModuleList([nn.Linear(width, width), nn.Linear(width, width)]) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for (relu_op, tanh_op), a in zip(self.ops, alpha.softmax(-1)):
            h = a[0] * h + a[1] * torch.relu(relu_op(h)) + a[2] * torch.tanh(tanh_op(h))
        return self.head(h)


def _darts_setup(d: int, width: int):
    net = _Mixed(d, width)
    (xt, yt), (xv, yv) = _data(128, d, 10, 5), _data(128, d, 10, 6)
    return net, torch.zeros(2, 3), xt, yt, xv, yv


def darts_plain(d: int = 784, width: int = 128, xi: float = 0.1, epsilon: float = 0.01):
    """DARTS's second-order step (Liu et al. 2019, eq. 7-8): one lower SGD step, then α's
    gradient with the finite-difference Hessian-vector term, written out."""
    net, alpha0, xt, yt, xv, yv = _darts_setup(d, width)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    alpha = alpha0.clone().requires_grad_()

    def loss(ps, x, y, a):
        return F.cross_entropy(functional_call(net, ps, (x, a)), y)

    def unit() -> torch.Tensor:
        nonlocal params
        before = {k: v.requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss(before, xt, yt, alpha.detach()), list(before.values()))
        after = {
            k: (p - xi * g).detach().requires_grad_() for (k, p), g in zip(before.items(), grads)
        }
        outs = torch.autograd.grad(loss(after, xv, yv, alpha), [alpha, *after.values()])
        direct, v = outs[0], outs[1:]
        direction = [xi * t for t in v]
        eps = epsilon / float(torch.sqrt(sum((t * t).sum() for t in direction)))
        with torch.no_grad():
            plus = {k: p + eps * t for (k, p), t in zip(before.items(), direction)}
            minus = {k: p - eps * t for (k, p), t in zip(before.items(), direction)}
        (gp,) = torch.autograd.grad(loss(plus, xt, yt, alpha), alpha)
        (gm,) = torch.autograd.grad(loss(minus, xt, yt, alpha), alpha)
        hyper = direct - (gp - gm) / (2.0 * eps)
        with torch.no_grad():
            alpha.sub_(0.1 * hyper)
        params = {k: p.detach() for k, p in after.items()}
        return hyper

    return unit


def darts_mlopt(d: int = 784, width: int = 128, xi: float = 0.1):
    net, alpha0, xt, yt, xv, yv = _darts_setup(d, width)
    arch = nn.Module()
    arch.alpha = nn.Parameter(alpha0.clone())

    class Weights(mlopt.Problem):
        def training_step(self, batch):
            return F.cross_entropy(self(xt, self.arch.module.alpha), yt)

    class Arch(mlopt.Problem):
        def training_step(self, batch):
            return F.cross_entropy(self.weights(xv, self.module.alpha), yv)

    weights = Weights(
        "weights", net, torch.optim.SGD(net.parameters(), lr=xi), config=mlopt.Config(type="darts")
    )
    up_opt = torch.optim.SGD(arch.parameters(), lr=0.1)
    up = Arch("arch", arch, up_opt)
    seen = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [up, weights],
        {"u2l": {up: [weights]}, "l2u": {weights: [up]}},
        mlopt.EngineConfig(train_iters=10**9, progress=False),
    )

    def unit() -> torch.Tensor:
        engine.step()
        return seen[-1][0]

    return unit


WORKLOADS = {
    "rhg-10": (lambda: rhg_plain(10), lambda: rhg_mlopt(10)),
    "rhg-50": (lambda: rhg_plain(50), lambda: rhg_mlopt(50)),
    "rhg-200": (lambda: rhg_plain(200), lambda: rhg_mlopt(200)),
    "rhg-wd-10": (lambda: rhg_plain(10, hyper="decay"), lambda: rhg_mlopt(10, hyper="decay")),
    "rhg-wd-50": (lambda: rhg_plain(50, hyper="decay"), lambda: rhg_mlopt(50, hyper="decay")),
    "rhg-wd-200": (lambda: rhg_plain(200, hyper="decay"), lambda: rhg_mlopt(200, hyper="decay")),
    "hpo-cg": (hpo_plain, hpo_mlopt),
    "darts": (darts_plain, darts_mlopt),
}
SMOKE = {
    "rhg-2": (lambda: rhg_plain(2, d=20, hidden=8), lambda: rhg_mlopt(2, d=20, hidden=8)),
    "rhg-wd-2": (
        lambda: rhg_plain(2, d=20, hidden=8, hyper="decay"),
        lambda: rhg_mlopt(2, d=20, hidden=8, hyper="decay"),
    ),
    "hpo-cg": (lambda: hpo_plain(5, d=20), lambda: hpo_mlopt(5, d=20)),
    "darts": (lambda: darts_plain(d=20, width=8), lambda: darts_mlopt(d=20, width=8)),
}
