"""MAML-family algorithms through Problem/Engine against closed forms and hand-written autograd,
in float64: iMAML (exact implicit gradient), MT-net, WarpGrad, BOML's meta-feature setting."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import feature_tasks
from torch import nn

import mlopt
from mlopt.hypergrad import CG, Reverse
from mlopt.meta import (
    MTNet,
    WarpGrad,
    WarpNet,
    binary_concrete,
    proximal_term,
    reset_parameters,
)
from mlopt.models import Conv4
from mlopt.testing import capture_gradients

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(problems, deps, iters):
    mlopt.Engine(problems, deps, mlopt.EngineConfig(train_iters=iters, strategy="cpu")).run()


def close(got, expected, atol=1e-10):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


# ---------------------------------------------------------------- iMAML
class Vector(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.weight = nn.Parameter(v.clone())


def test_imaml_equals_exact_implicit_gradient_at_the_solution():
    """Lower f = ½|Xθ-y|²/n + (λ/2)|θ-φ|² from θ=φ, solved by GD to convergence; CG on the lower
    loss gives λ(A+λI)⁻¹∇F(θ*) with θ* = (A+λI)⁻¹(b+λφ), differentiated here in closed form."""
    g = torch.Generator().manual_seed(0)
    d, n, m, lam = 4, 12, 9, 1.5
    X, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    Xq, yq = torch.randn(m, d, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
    phi0 = torch.randn(d, generator=g, dtype=F64)

    class Task(mlopt.Problem):
        def training_step(self, batch):
            theta = self.module.weight
            fit = 0.5 * ((X @ theta - y) ** 2).sum() / n
            return fit + proximal_term(self.parameters(), self.meta.parameters(), lam)

    class Meta(mlopt.Problem):
        def training_step(self, batch):
            theta = self.task.module.weight
            self.theta = theta.detach().clone()  # the lower's solution the upper sees
            return 0.5 * ((Xq @ theta - yq) ** 2).sum() / m

    A, b = X.T @ X / n, X.T @ y / n
    lr = 1.0 / float(torch.linalg.eigvalsh(A + lam * torch.eye(d, dtype=F64)).max())
    low_mod, up_mod = Vector(torch.zeros(d, dtype=F64)), Vector(phi0)
    steps = 80
    task = Task(
        "task",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=lr),
        config=mlopt.Config(
            type=CG(iterations=d, tol=0.0), unroll_steps=steps, initialize_from="meta"
        ),
    )
    opt = torch.optim.SGD(up_mod.parameters(), lr=0.0)
    meta = Meta("meta", up_mod, opt)
    seen = capture_gradients(opt)
    run([meta, task], {"u2l": {meta: [task]}, "l2u": {task: [meta]}}, steps)

    phi = phi0.clone().requires_grad_()
    theta_star = torch.linalg.solve(A + lam * torch.eye(d, dtype=F64), b + lam * phi)
    torch.testing.assert_close(meta.theta, theta_star.detach(), rtol=0, atol=1e-12)
    upper = 0.5 * ((Xq @ theta_star - yq) ** 2).sum() / m
    (expected,) = torch.autograd.grad(upper, phi)
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=1e-11)


# ---------------------------------------------------------------- shared task data
WAYS = 3


def conv_tasks(n_tasks=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_tasks):
        sx = torch.randn(2 * WAYS, 1, 16, 16, generator=g, dtype=F64)
        qx = torch.randn(2 * WAYS, 1, 16, 16, generator=g, dtype=F64)
        ys = torch.arange(WAYS).repeat(2)
        out.append((sx, ys, qx, ys))
    return out


def small_conv4(seed=0):
    torch.manual_seed(seed)
    return Conv4(1, WAYS, hidden=3, image_size=16).to(F64)


# ---------------------------------------------------------------- MT-net
class MTTask(mlopt.Problem):
    def __init__(self, *a, lr, seed, **k):
        super().__init__(*a, **k)
        self.lr, self.gen = lr, torch.Generator().manual_seed(seed)

    def on_inner_loop_start(self):  # one mask per task, reused by every inner step
        self.rates = self.meta.module.learning_rates(
            list(self.named_parameters()),
            self.lr,
            generator=self.gen,
            logits=list(self.meta.module.mask_logits),
        )

    def learning_rates(self):
        return self.rates

    def training_step(self, task):
        from mlopt.meta import mtnet_forward

        sx, sy, _, _ = task
        return F.cross_entropy(mtnet_forward(self.module, self.meta.module.transforms, sx), sy)


class MTMeta(mlopt.Problem):
    def training_step(self, batch):
        from mlopt.meta import mtnet_forward

        _, _, qx, qy = self.task.batch
        logits = mtnet_forward(self.task.module, self.module.transforms, qx)
        return F.cross_entropy(logits, qy)


def test_mtnet_meta_gradient_matches_hand_unrolled():
    tasks, steps, lr = conv_tasks(), 2, 0.3
    mt = MTNet(small_conv4(), temperature=0.7).to(F64)
    with torch.no_grad():  # non-trivial transforms and mask probabilities
        gen = torch.Generator().manual_seed(4)
        for t in mt.transforms:
            t.weight.add_(0.1 * torch.randn(t.weight.shape, generator=gen, dtype=F64))
        for z in mt.mask_logits:
            z.copy_(torch.randn(z.shape, generator=gen, dtype=F64))
    ref = copy.deepcopy(mt)
    inner = small_conv4(seed=5)
    task = MTTask(
        "task",
        inner,
        torch.optim.SGD(inner.parameters(), lr=lr),
        train_data_loader=tasks,
        config=mlopt.Config(unroll_steps=steps, initialize_from="meta.model"),
        lr=lr,
        seed=7,
    )
    opt = torch.optim.SGD(mt.parameters(), lr=0.0)
    meta = MTMeta("meta", mt, opt, config=mlopt.Config(gradient_accumulation=len(tasks)))
    seen = capture_gradients(opt)
    run([meta, task], {"u2l": {meta: [task]}, "l2u": {task: [meta]}}, steps * len(tasks))

    names = [n for n, _ in ref.named_parameters()]
    leaves = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    model_names = [n for n in names if n.startswith("model.")]
    task_names = [n[len("model.") :] for n in model_names]
    gen = torch.Generator().manual_seed(7)
    total = [torch.zeros_like(v) for v in leaves.values()]
    for sx, sy, qx, qy in tasks:
        logits_z = [leaves[f"mask_logits.{i}"] for i in range(len(ref.mask_logits))]
        rates = ref.learning_rates(task_names, lr, generator=gen, logits=logits_z)
        fast = {n: leaves[n] for n in model_names}

        def loss(fast, x, y):
            return F.cross_entropy(torch.func.functional_call(ref, {**leaves, **fast}, (x,)), y)

        for _ in range(steps):
            grads = torch.autograd.grad(loss(fast, sx, sy), list(fast.values()), create_graph=True)
            fast = {n: v - r * gr for (n, v), r, gr in zip(fast.items(), rates, grads)}
        gs = torch.autograd.grad(loss(fast, qx, qy), list(leaves.values()), allow_unused=True)
        total = [t + (0 if g_ is None else g_) / len(tasks) for t, g_ in zip(total, gs)]
    close(seen[0], total)
    assert any(float(g.abs().max()) > 0 for g in seen[0][-len(ref.mask_logits) :])


def test_binary_concrete_is_straight_through():
    z = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    hard = binary_concrete(z, 0.5, generator=gen)
    soft = binary_concrete(z, 0.5, hard=False, generator=torch.Generator().manual_seed(0))
    assert set(hard.detach().tolist()) <= {0.0, 1.0}
    (gh,) = torch.autograd.grad(hard.sum(), z)
    (gs,) = torch.autograd.grad(soft.sum(), z)
    torch.testing.assert_close(gh, gs, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- WarpGrad
class WarpTask(mlopt.Problem):
    def training_step(self, task):
        from mlopt.meta import warp_forward

        sx, sy, _, _ = task
        return F.cross_entropy(warp_forward(self.module, self.meta.module.warps, sx), sy)


class WarpMeta(mlopt.Problem):
    def training_step(self, batch):
        from mlopt.meta import warp_forward

        _, _, qx, qy = self.task.batch
        return F.cross_entropy(warp_forward(self.task.module, self.module.warps, qx), qy)


@pytest.mark.parametrize("steps", [1, 3])
def test_warpgrad_one_step_objective_and_reptile_init(steps):
    tasks, lr = conv_tasks(), 0.2
    warp = WarpNet(small_conv4()).to(F64)
    with torch.no_grad():
        for w in warp.warps:
            w.weight.add_(0.05 * torch.randn(w.weight.shape, dtype=F64))
    ref = copy.deepcopy(warp)
    inner = small_conv4(seed=3)
    task = WarpTask(
        "task",
        inner,
        torch.optim.SGD(inner.parameters(), lr=lr),
        train_data_loader=tasks,
        config=mlopt.Config(type="warpgrad", unroll_steps=steps, initialize_from="meta.model"),
    )
    assert isinstance(task.config.type, WarpGrad)
    opt = torch.optim.SGD(warp.parameters(), lr=0.0)
    meta = WarpMeta("meta", warp, opt, config=mlopt.Config(gradient_accumulation=len(tasks)))
    seen = capture_gradients(opt)
    run([meta, task], {"u2l": {meta: [task]}, "l2u": {task: [meta]}}, steps * len(tasks))

    leaves = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    model_names = [n for n in leaves if n.startswith("model.")]
    total = {n: torch.zeros_like(v) for n, v in leaves.items()}

    def loss(fast, x, y):
        return F.cross_entropy(torch.func.functional_call(ref, {**leaves, **fast}, (x,)), y)

    for sx, sy, qx, qy in tasks:
        fast = {n: leaves[n].detach() for n in model_names}
        for _ in range(steps - 1):  # the trajectory, held constant
            fast = {n: v.requires_grad_() for n, v in fast.items()}
            grads = torch.autograd.grad(loss(fast, sx, sy), list(fast.values()))
            fast = {n: (v - lr * g_).detach() for (n, v), g_ in zip(fast.items(), grads)}
        fast = {n: v.requires_grad_() for n, v in fast.items()}
        grads = torch.autograd.grad(loss(fast, sx, sy), list(fast.values()), create_graph=True)
        last = {n: v - lr * g_ for (n, v), g_ in zip(fast.items(), grads)}
        warps = [n for n in leaves if n.startswith("warps.")]
        gw = torch.autograd.grad(loss(last, qx, qy), [leaves[n] for n in warps])
        for n, g_ in zip(warps, gw):
            total[n] += g_ / len(tasks)
        for n in model_names:  # Reptile: θ_init - θ_K
            total[n] += (leaves[n] - last[n]).detach() / len(tasks)
    close(seen[0], list(total.values()))


def test_warpgrad_options_are_validated():
    with pytest.raises(mlopt.ConfigError, match="init must be"):
        WarpGrad(init="leap")
    with pytest.raises(mlopt.ConfigError, match="truncate must be"):
        WarpGrad(truncate=None)


# ---------------------------------------------------------------- meta-feature (BOML)
class Head(mlopt.Problem):
    """Lower: a per-task linear head on the upper's features, from zero each task (ridge)."""

    mu = 0.3

    def on_inner_loop_start(self):
        reset_parameters(self)

    def training_step(self, task):
        sx, sy, _, _ = task
        pred = self(self.features(sx))
        ridge = 0.5 * self.mu * (self.module.weight**2).sum()
        return 0.5 * ((pred - sy) ** 2).sum(1).mean() + ridge


class Features(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.head.batch
        return 0.5 * ((self.head(self(qx)) - qy) ** 2).sum(1).mean()


def feature_program(method, steps, lr):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).to(F64)
    head = nn.Linear(4, 2, bias=False).to(F64)
    tasks = feature_tasks()
    low = Head(
        "head",
        head,
        torch.optim.SGD(head.parameters(), lr=lr),
        train_data_loader=tasks,
        config=mlopt.Config(type=method, unroll_steps=steps, resample="window"),
    )
    opt = torch.optim.SGD(body.parameters(), lr=0.0)
    up = Features("features", body, opt, config=mlopt.Config(gradient_accumulation=len(tasks)))
    seen = capture_gradients(opt)
    run([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}}, steps * len(tasks))
    return body, tasks, seen[0]


def ridge_reference(body, tasks, mu):
    leaves = [p.detach().clone().requires_grad_() for p in body.parameters()]
    names = [n for n, _ in body.named_parameters()]
    total = [torch.zeros_like(p) for p in leaves]
    for sx, sy, qx, qy in tasks:
        fs = torch.func.functional_call(body, dict(zip(names, leaves)), (sx,))
        fq = torch.func.functional_call(body, dict(zip(names, leaves)), (qx,))
        n = len(sx)
        w = torch.linalg.solve(
            fs.T @ fs / n + mu * torch.eye(fs.shape[1], dtype=F64), fs.T @ sy / n
        )
        upper = 0.5 * ((fq @ w - qy) ** 2).sum(1).mean()
        total = [t + g / len(tasks) for t, g in zip(total, torch.autograd.grad(upper, leaves))]
    return total


def test_meta_feature_implicit_equals_closed_form_ridge():
    """CG on the converged ridge head = autograd through the closed-form head solution."""
    body, tasks, got = feature_program(CG(iterations=8, tol=0.0), steps=400, lr=0.9)
    close(got, ridge_reference(copy.deepcopy(body), tasks, Head.mu), atol=1e-9)


@pytest.mark.parametrize("truncate", [None, 2])
def test_meta_feature_reverse_and_truncated_match_hand_unrolled(truncate):
    steps, lr = 4, 0.5
    body, tasks, got = feature_program(Reverse(truncate=truncate), steps=steps, lr=lr)
    names = [n for n, _ in body.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in body.parameters()]
    total = [torch.zeros_like(p) for p in leaves]
    for sx, sy, qx, qy in tasks:
        fs = torch.func.functional_call(body, dict(zip(names, leaves)), (sx,))
        fq = torch.func.functional_call(body, dict(zip(names, leaves)), (qx,))
        w = torch.zeros(2, 4, dtype=F64, requires_grad=True)
        for t in range(steps):
            if truncate is not None and t == steps - truncate:
                w = w.detach().requires_grad_()
            inner = 0.5 * ((fs @ w.T - sy) ** 2).sum(1).mean() + 0.5 * Head.mu * (w**2).sum()
            (gw,) = torch.autograd.grad(inner, w, create_graph=True)
            w = w - lr * gw
        upper = 0.5 * ((fq @ w.T - qy) ** 2).sum(1).mean()
        total = [t + g / len(tasks) for t, g in zip(total, torch.autograd.grad(upper, leaves))]
    close(got, total, atol=1e-12)
