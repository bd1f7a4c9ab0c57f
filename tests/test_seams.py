"""Extension seams: module views, learned learning rates, dotted initialize_from, explicit
gradients."""

import pytest
import torch
from helpers import F64
from torch import nn

import mlopt
from mlopt.functional import ModuleView
from mlopt.testing import QuadraticBilevel, capture_gradients


def test_module_view_reaches_submodules_items_and_methods():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
            self.scales = nn.ParameterList([nn.Parameter(torch.ones(1))])

        def forward(self, x):
            return self.body(x) * self.scales[0]

        def features(self, x):
            return self.body[0](x)

    net = Net().double()
    fast = {n: p.detach() * 2 for n, p in net.named_parameters()}
    view = ModuleView(net, lambda: fast)
    x = torch.randn(4, 2, dtype=F64)
    ref = torch.func.functional_call(net, fast, (x,))
    torch.testing.assert_close(view(x), ref)
    torch.testing.assert_close(view.features(x), x @ fast["body.0.weight"].T + fast["body.0.bias"])
    torch.testing.assert_close(view.body[0](x), view.features(x))
    assert view.body[0].weight is fast["body.0.weight"]
    assert [t is fast["scales.0"] for t in view.scales] == [True]
    assert len(view.body) == 3


class Vec(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.weight = nn.Parameter(v.clone())


class MetaSGDModule(nn.Module):
    """Meta-initialization plus one learning-rate tensor per parameter (Li et al. 2017)."""

    def __init__(self, init, lr):
        super().__init__()
        self.model = Vec(init)
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(init, lr))])


class Lower(mlopt.Problem):
    def training_step(self, batch):
        return self.q.lower_loss(self.module.weight, self.phi)

    def learning_rates(self):
        return list(self.outer.module.lrs)


class Upper(mlopt.Problem):
    def training_step(self, batch):
        return self.q.upper_loss(self.lower.module.weight, self.lower.phi)


def test_meta_sgd_learned_learning_rates_and_dotted_initialize_from():
    q = QuadraticBilevel.random(n=3, m=3, seed=5, rho=0.0)
    phi = torch.randn(3, dtype=F64)
    init = torch.randn(3, dtype=F64)
    meta = MetaSGDModule(init, 0.1)
    inner_mod = Vec(torch.zeros(3, dtype=F64))
    lower = Lower(
        "lower",
        inner_mod,
        torch.optim.SGD(inner_mod.parameters(), lr=1.0),
        config=mlopt.Config(type="reverse", unroll_steps=1, initialize_from="outer.model"),
    )
    opt = torch.optim.SGD(meta.parameters(), lr=0.0)
    outer = Upper("outer", meta, opt)
    lower.q = outer.q = q
    lower.phi = phi
    seen = capture_gradients(opt)
    mlopt.Engine(
        [outer, lower],
        {"u2l": {outer: [lower]}, "l2u": {lower: [outer]}},
        mlopt.EngineConfig(train_iters=1),
    ).run()
    # closed form of one step θ1 = θ0 - α⊙g(θ0): dF/dθ0 = (I - diag(α)A)ᵀ v, dF/dα = -g ⊙ v
    alpha = torch.full((3,), 0.1, dtype=F64)
    g = q.A @ init - q.B @ phi - q.c
    theta1 = init - alpha * g
    v = q.C.T @ (q.C @ theta1 - q.t)
    d_init = (torch.eye(3, dtype=F64) - torch.diag(alpha) @ q.A).T @ v
    torch.testing.assert_close(seen[0][0], d_init, rtol=0, atol=1e-12)
    torch.testing.assert_close(seen[0][1], -g * v, rtol=0, atol=1e-12)


def test_learning_rates_hook_needs_a_differentiable_unroll():
    q = QuadraticBilevel.random(n=3, m=3, seed=5)
    meta = MetaSGDModule(torch.zeros(3, dtype=F64), 0.1)
    inner_mod = Vec(torch.zeros(3, dtype=F64))
    lower = Lower(
        "lower",
        inner_mod,
        torch.optim.SGD(inner_mod.parameters(), lr=1.0),
        config=mlopt.Config(type="first_order", initialize_from="outer.model"),
    )
    outer = Upper("outer", meta, torch.optim.SGD(meta.parameters(), lr=0.0))
    lower.q = outer.q = q
    with pytest.raises(mlopt.ConfigError, match="learning_rates.*differentiable unroll"):
        mlopt.Engine([outer, lower], {"u2l": {outer: [lower]}, "l2u": {lower: [outer]}})


def test_dotted_initialize_from_names_the_mismatch():
    q = QuadraticBilevel.random(n=3, m=3, seed=5)
    meta = MetaSGDModule(torch.zeros(3, dtype=F64), 0.1)
    inner_mod = Vec(torch.zeros(3, dtype=F64))
    lower = Lower(
        "lower",
        inner_mod,
        torch.optim.SGD(inner_mod.parameters(), lr=1.0),
        config=mlopt.Config(type="reverse", initialize_from="outer.lrs"),
    )
    outer = Upper("outer", meta, torch.optim.SGD(meta.parameters(), lr=0.0))
    lower.q = outer.q = q
    with pytest.raises(mlopt.ConfigError, match=r"under 'lrs'; no match for \['weight \(3,\)'\]"):
        mlopt.Engine([outer, lower], {"u2l": {outer: [lower]}, "l2u": {lower: [outer]}})


def test_explicit_gradient_from_training_step():
    class Explicit(mlopt.Problem):
        def training_step(self, batch):
            w = self.module.weight
            return {"loss": (w**2).sum(), "gradient": (torch.full_like(w, 3.0),), "acc": 1.0}

    mod = Vec(torch.zeros(2, dtype=F64))
    opt = torch.optim.SGD(mod.parameters(), lr=1.0)
    p = Explicit("p", mod, opt)
    seen = capture_gradients(opt)
    engine = mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=1))
    engine.run()
    torch.testing.assert_close(seen[0][0], torch.full((2,), 3.0, dtype=F64))
    assert engine.metrics["p"] == {"acc": 1.0}

    class Wrong(Explicit):
        def training_step(self, batch):
            return {"loss": self.module.weight.sum(), "gradient": (torch.zeros(5),)}

    mod = Vec(torch.zeros(2, dtype=F64))
    w = Wrong("w", mod, torch.optim.SGD(mod.parameters(), lr=1.0))
    with pytest.raises(mlopt.ConfigError, match="'gradient' must hold one tensor per parameter"):
        mlopt.Engine([w], {}, mlopt.EngineConfig(train_iters=1)).run()
