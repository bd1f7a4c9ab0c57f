"""Tests of mlopt.optim: functional SGD/Adam/AdamW against torch.optim, commit, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mlopt.errors import ConfigError
from mlopt.optim import (
    DifferentiableOptimizer,
    adam,
    adamw,
    is_supported,
    rules,
    safe_sqrt,
    sgd,
    supported_optimizers,
)

DT = torch.float64
SHAPES = [(3, 2), (4,), ()]
STEPS = 6


def _init(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DT) for s in SHAPES]


def _grads(weights, k: int, none_at: tuple[int, int] | None = None, create_graph=False):
    """Gradient of a step-dependent nonlinear loss; some coordinates get an exactly zero
    gradient (every third, rotating with k), and ``none_at=(step, index)`` gives None."""
    g = torch.Generator().manual_seed(1000 + k)
    loss = torch.zeros((), dtype=DT)
    for w in weights:
        a = torch.rand(w.shape, generator=g, dtype=DT) + 0.5
        c = torch.randn(w.shape, generator=g, dtype=DT)
        mask = (torch.arange(w.numel()).reshape(w.shape) % 3 != k % 3).to(DT)
        loss = loss + (mask * (a * torch.sin(w) + 0.5 * a * w**2 + c * w)).sum()
    grads = list(torch.autograd.grad(loss, weights, create_graph=create_graph))
    if none_at is not None and none_at[0] == k:
        grads[none_at[1]] = None
    return grads


def _torch_run(make_opt, steps, none_at=None, scheduler=None):
    params = [torch.nn.Parameter(t.clone()) for t in _init()]
    opt = make_opt(params)
    sched = scheduler(opt) if scheduler else None
    for k in range(steps):
        for p, g in zip(params, _grads(params, k, none_at), strict=True):
            p.grad = g
        opt.step()
        if sched:
            sched.step()
    return [p.detach() for p in params], opt


def _our_run(make_opt, steps, none_at=None, scheduler=None):
    params = [torch.nn.Parameter(t.clone()) for t in _init()]
    opt = make_opt(params)
    sched = scheduler(opt) if scheduler else None
    dopt = DifferentiableOptimizer(opt, params)
    weights, state = list(params), dopt.init_state()
    for k in range(steps):
        weights, state = dopt.step(weights, _grads(weights, k, none_at), state)
        if sched:
            sched.step()
    return [w.detach() for w in weights], state


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _check_same(make_opt, steps=STEPS, none_at=None, scheduler=None):
    ref, opt = _torch_run(make_opt, steps, none_at, scheduler)
    ours, state = _our_run(make_opt, steps, none_at, scheduler)
    for r, o in zip(ref, ours, strict=True):
        _close(o, r)
    params = [p for group in opt.param_groups for p in group["params"]]
    for p, s in zip(params, state, strict=True):
        assert set(s) == set(opt.state[p])
        for key, value in opt.state[p].items():
            _close(torch.as_tensor(s[key], dtype=DT), value.to(DT))


IMPLS = [{"foreach": False}, {"foreach": True}, {"fused": True}]
SGD_CONFIGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.8, "nesterov": True},
    {"momentum": 0.9, "weight_decay": 0.1},
    {"weight_decay": 0.05},
    {"momentum": 0.7, "nesterov": True, "weight_decay": 0.1, "maximize": True},
]
ADAM_CONFIGS = [
    {},
    {"amsgrad": True},
    {"weight_decay": 0.1},
    {"amsgrad": True, "weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.9)},
    {"eps": 1e-3, "betas": (0.5, 0.6)},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_matches_torch(config, impl):
    _check_same(lambda ps: torch.optim.SGD(ps, lr=0.1, **config, **impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_adam_matches_torch(config, impl):
    _check_same(lambda ps: torch.optim.Adam(ps, lr=0.05, **config, **impl))


def test_adam_capturable_and_differentiable_flags_accepted():
    """torch runs these flags only on CUDA / non-leaf params; the numbers are Adam's."""
    ref, _ = _torch_run(lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True), STEPS)
    flagged = dict(lr=0.05, amsgrad=True, capturable=True, differentiable=True)
    ours, state = _our_run(lambda ps: torch.optim.Adam(ps, **flagged), STEPS)
    for r, o in zip(ref, ours, strict=True):
        _close(o, r)
    assert float(state[0]["step"]) == STEPS


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", [{}, {"amsgrad": True, "weight_decay": 0.3}, {"maximize": True}])
def test_adamw_matches_torch(config, impl):
    _check_same(lambda ps: torch.optim.AdamW(ps, lr=0.05, **config, **impl))


def test_adam_decoupled_flag_and_tensor_lr_match_torch():
    _check_same(
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.2, decoupled_weight_decay=True)
    )
    _check_same(lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.05, dtype=DT), foreach=False))
    _check_same(lambda ps: torch.optim.SGD(ps, lr=torch.tensor([0.1], dtype=DT), momentum=0.5))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True),
    ],
)
def test_none_gradient_skips_param_as_torch(make_opt):
    _check_same(make_opt, none_at=(0, 1))  # never-stepped param: empty state for a while
    _check_same(make_opt, none_at=(3, 0))  # skipped in the middle: step counter not advanced


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_several_param_groups_and_scheduler():
    def make_sgd(ps):
        return torch.optim.SGD(
            [
                {"params": ps[:1], "lr": 0.2, "momentum": 0.9, "nesterov": True},
                {"params": ps[1:2], "weight_decay": 0.1},
                {"params": ps[2:], "momentum": 0.5, "dampening": 0.5, "maximize": True},
            ],
            lr=0.05,
        )

    def make_adam(ps):
        return torch.optim.Adam(
            [
                {"params": ps[:1], "betas": (0.5, 0.7), "amsgrad": True},
                {"params": ps[1:], "lr": 0.01, "weight_decay": 0.2},
            ],
            lr=0.05,
        )

    def schedule(opt):
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)

    for make in (make_sgd, make_adam):
        _check_same(make)
        _check_same(make, scheduler=schedule)  # group lr is read at every call


def test_state_from_torch_then_commit_then_torch_equals_torch_only():
    """j1 torch steps, k differentiable steps + commit, j2 torch steps == j1+k+j2 torch steps."""
    makers = [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    ]
    for make_opt in makers:
        for j1, k, j2 in [(0, 3, 3), (2, 2, 2)]:
            ref, ref_opt = _torch_run(make_opt, j1 + k + j2)
            params = [torch.nn.Parameter(t.clone()) for t in _init()]
            opt = make_opt(params)
            dopt = DifferentiableOptimizer(opt, params)

            def torch_steps(first, count, params=params, opt=opt):
                for step in range(first, first + count):
                    for p, g in zip(params, _grads(params, step), strict=True):
                        p.grad = g
                    opt.step()

            torch_steps(0, j1)
            weights, state = list(params), dopt.init_state()
            for step in range(j1, j1 + k):
                grads = _grads(weights, step, create_graph=True)
                weights, state = dopt.step(weights, grads, state)
            outer = sum((w**2).sum() for w in weights)
            dopt.commit(state)
            with torch.no_grad():  # torch updates its state in place: the unroll must not see it
                for p in params:
                    for value in opt.state[p].values():
                        value.mul_(1.0)
            outer.backward()
            with torch.no_grad():
                for p, w in zip(params, weights, strict=True):
                    p.copy_(w)
            torch_steps(j1 + k, j2)
            for p, r in zip(params, ref, strict=True):
                _close(p.detach(), r)
            for p, rp in zip(params, ref_opt.param_groups[0]["params"], strict=True):
                ours, theirs = opt.state[p], ref_opt.state[rp]
                assert set(ours) == set(theirs)
                for key in theirs:
                    _close(ours[key].to(DT), theirs[key].to(DT))
                if "step" in ours:
                    assert ours["step"].dtype == theirs["step"].dtype
                    assert ours["step"].device == theirs["step"].device
                    assert float(ours["step"]) == j1 + k + j2
                assert not any(v.requires_grad for v in ours.values())


def test_commit_empty_state_clears_and_fresh_state_is_empty():
    w = torch.nn.Parameter(torch.ones(2, dtype=DT))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(2, dtype=DT)
    opt.step()
    dopt = DifferentiableOptimizer(opt, [w])
    assert dopt.init_state(fresh=True) == [{}]
    copy = dopt.init_state()[0]
    assert copy["exp_avg"] is not opt.state[w]["exp_avg"]
    _close(copy["exp_avg"], opt.state[w]["exp_avg"])
    dopt.commit([{}])
    assert w not in opt.state


def _unrolled(dopt, w0, lam, lr=None, steps=3):
    """Outer loss after ``steps`` differentiable inner steps on
    L(w) = lam/2 |w|^2 + sum(a sin w) - b.w, started at w0."""
    a = torch.linspace(0.5, 1.5, w0.numel(), dtype=DT).reshape(w0.shape)
    b = torch.linspace(-1.0, 1.0, w0.numel(), dtype=DT).reshape(w0.shape)
    weights, state = [w0], dopt.init_state(fresh=True)
    for _ in range(steps):
        inner = (
            0.5 * lam * (weights[0] ** 2).sum() + (a * torch.sin(weights[0]) - b * weights[0]).sum()
        )
        grads = torch.autograd.grad(inner, weights, create_graph=True)
        weights, state = dopt.step(weights, grads, state, lr=None if lr is None else [lr])
    return ((weights[0] - 0.3) ** 2).sum() + weights[0].prod()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, dampening=0.2),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, betas=(0.7, 0.8)),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.2),
    ],
)
def test_gradient_through_three_steps_matches_finite_differences(make_opt):
    template = torch.nn.Parameter(torch.zeros(2, 2, dtype=DT))
    dopt = DifferentiableOptimizer(make_opt([template]), [template])
    w0 = torch.tensor([[0.4, -0.7], [1.1, 0.2]], dtype=DT, requires_grad=True)
    lam = torch.tensor(0.8, dtype=DT, requires_grad=True)
    lr = torch.tensor([[0.05, 0.1], [0.08, 0.02]], dtype=DT, requires_grad=True)  # Meta-SGD
    assert torch.autograd.gradcheck(lambda w, h: _unrolled(dopt, w, h), (w0, lam))
    assert torch.autograd.gradcheck(lambda w, h, r: _unrolled(dopt, w, h, r), (w0, lam, lr))


def test_second_order_gradient_through_sgd_matches_finite_differences():
    template = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    dopt = DifferentiableOptimizer(torch.optim.SGD([template], lr=0.1, momentum=0.9), [template])
    w0 = torch.tensor([0.4, -0.7, 1.1], dtype=DT, requires_grad=True)
    lam = torch.tensor(0.8, dtype=DT, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda w, h: _unrolled(dopt, w, h), (w0, lam))


def test_zero_gradient_adam_has_finite_exact_second_order_gradient():
    """At g = 0: new_w = w0 - lr * g / (|g| + eps) with g = lam * w0 (first step), so
    d new_w / d w0 = 1 - lr * lam / eps and d2 new_w / (d w0 d lam) = -lr / eps."""
    lr, eps = 0.1, 0.01
    template = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    dopt = DifferentiableOptimizer(torch.optim.Adam([template], lr=lr, eps=eps), [template])
    w0 = torch.zeros(3, dtype=DT, requires_grad=True)
    lam = torch.tensor(2.0, dtype=DT, requires_grad=True)
    grads = torch.autograd.grad(0.5 * lam * (w0**2).sum(), [w0], create_graph=True)
    assert (grads[0] == 0).all()
    (new_w,), state = dopt.step([w0], grads, dopt.init_state(fresh=True))
    assert (state[0]["exp_avg_sq"] == 0).all()
    (d_w0,) = torch.autograd.grad(new_w.sum(), [w0], create_graph=True)
    _close(d_w0.detach(), torch.full((3,), 1 - lr * 2.0 / eps, dtype=DT))
    (d_lam,) = torch.autograd.grad(d_w0.sum(), [lam])
    assert torch.isfinite(d_lam)
    _close(d_lam, torch.tensor(-3 * lr / eps, dtype=DT))

    # A frozen parameter (gradient exactly 0 at every step, so v = 0 throughout), 3 amsgrad steps.
    # Closed form of D_k = dw_k/dw0, M_k = dm_k/dw0: M_{k+1} = b1 M_k + (1-b1) lam D_k,
    # D_{k+1} = D_k - lr / (1 - b1^(k+1)) * M_{k+1} / eps.
    def closed_form(lam_value, b1=0.9):
        d, m = 1.0, 0.0
        for k in range(3):
            m = b1 * m + (1 - b1) * lam_value * d
            d = d - lr / (1 - b1 ** (k + 1)) * m / eps
        return d

    weights, state = [w0], {}
    for _ in range(3):
        (g,) = torch.autograd.grad(0.5 * lam * (weights[0] ** 2).sum(), weights, create_graph=True)
        new, state = adam(weights[0], g, state, lr=lr, eps=eps, amsgrad=True)
        weights = [new]
    (d_w0,) = torch.autograd.grad(weights[0].sum(), [w0], create_graph=True)
    (d_lam,) = torch.autograd.grad(d_w0.sum(), [lam])
    _close(d_w0.detach(), torch.full((3,), closed_form(2.0), dtype=DT))
    h = 1e-5
    expected = 3 * (closed_form(2.0 + h) - closed_form(2.0 - h)) / (2 * h)
    torch.testing.assert_close(d_lam, torch.tensor(expected, dtype=DT), rtol=1e-7, atol=0)


def test_safe_sqrt_value_and_derivatives():
    x = torch.tensor([0.0, 0.25, 4.0], dtype=DT, requires_grad=True)
    y = safe_sqrt(x)
    assert torch.equal(y.detach(), torch.sqrt(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), [x], create_graph=True)
    _close(g.detach(), torch.tensor([0.0, 1.0, 0.25], dtype=DT))
    (h,) = torch.autograd.grad(g.sum(), [x])
    _close(h, torch.tensor([0.0, -0.25 * 0.25**-1.5, -0.25 * 4**-1.5], dtype=DT))


def test_rules_are_pure_and_closed_form():
    p = torch.tensor([1.0, -2.0], dtype=DT)
    g = torch.tensor([0.5, 0.25], dtype=DT)
    buf = torch.tensor([1.0, 1.0], dtype=DT)
    state = {"momentum_buffer": buf, "other": 7}
    versions = (p._version, g._version, buf._version)
    p1, s1 = sgd(p, g, state, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.2)
    assert (p._version, g._version, buf._version) == versions
    assert state == {"momentum_buffer": buf, "other": 7} and s1["other"] == 7
    d = g + 0.2 * p
    _close(s1["momentum_buffer"], 0.9 * buf + 0.5 * d)
    _close(p1, p - 0.1 * (0.9 * buf + 0.5 * d))
    # first Adam step: m = (1-b1) g, v = (1-b2) g^2, update = lr * g / (|g| + eps)
    s0: dict = {}
    p2, s2 = adam(p, g, s0, lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    assert s0 == {} and float(s2["step"]) == 1.0
    _close(p2, p - 0.1 * g / (g.abs() + 1e-3))
    p3, _ = adamw(p, g, {}, lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.5)
    _close(p3, p * (1 - 0.05) - 0.1 * g / (g.abs() + 1e-3))
    # a number step (older checkpoints) gives the same numbers as a tensor step
    s_num = dict(s2, step=1.0)
    _close(adam(p2, g, s_num, lr=0.1)[0], adam(p2, g, s2, lr=0.1)[0])


def test_meta_sgd_per_element_learning_rate_closed_form():
    p = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    g = torch.tensor([0.5, 0.25, -1.0], dtype=DT)
    lr = torch.tensor([0.1, 0.2, 0.3], dtype=DT, requires_grad=True)
    new, _ = sgd(p, g, {}, lr=lr)
    _close(new.detach(), p - lr.detach() * g)
    (d_lr,) = torch.autograd.grad(new.sum(), [lr])
    _close(d_lr, -g)


def test_vmap_over_tasks_equals_loop():
    params = torch.randn(4, 3, dtype=DT)
    grads = torch.randn(4, 3, dtype=DT)
    for rule, kw in [(sgd, {"lr": 0.1, "momentum": 0.9}), (adam, {"lr": 0.1, "amsgrad": True})]:

        def two_steps(p, g, rule=rule, kw=kw):
            p1, s1 = rule(p, g, {}, **kw)
            return rule(p1, 0.5 * g, s1, **kw)[0]

        batched = torch.func.vmap(two_steps)(params, grads)
        looped = torch.stack([two_steps(p, g) for p, g in zip(params, grads, strict=True)])
        _close(batched, looped)


def test_unsupported_optimizer_and_bad_input():
    w = torch.nn.Parameter(torch.zeros(2, dtype=DT))
    assert supported_optimizers() == ("SGD", "Adam", "AdamW")
    rms = torch.optim.RMSprop([w], lr=0.1)
    assert not is_supported(rms)
    with pytest.raises(ConfigError) as err:
        DifferentiableOptimizer(rms, [w])
    message = str(err.value)
    for word in ("RMSprop", "SGD", "Adam", "AdamW", "'cg'", "'first_order'"):
        assert word in message

    class PlainSubclass(torch.optim.Adam):
        pass

    class CustomStep(torch.optim.SGD):
        def step(self, closure=None):
            return None

    assert is_supported(PlainSubclass([w])) and is_supported(torch.optim.AdamW([w]))
    with pytest.raises(ConfigError, match="CustomStep"):
        DifferentiableOptimizer(CustomStep([w], lr=0.1), [w])
    other = torch.nn.Parameter(torch.zeros(1, dtype=DT))
    with pytest.raises(ConfigError, match="not in the SGD optimizer"):
        DifferentiableOptimizer(torch.optim.SGD([w], lr=0.1), [w, other])
    with pytest.raises(ConfigError, match="twice"):
        DifferentiableOptimizer(torch.optim.SGD([w], lr=0.1), [w, w])
    with pytest.raises(ConfigError, match="Optimizer"):
        DifferentiableOptimizer(object(), [w])  # type: ignore[arg-type]
    dopt = DifferentiableOptimizer(torch.optim.SGD([w], lr=0.1), [w])
    with pytest.raises(ConfigError, match="one entry per parameter"):
        dopt.step([w], [], [{}])
    assert math.isclose(dopt.hyperparameters(0)["lr"], 0.1)
    assert rules.scalar_dtype(fused=True) == torch.float32
