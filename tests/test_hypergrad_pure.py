"""Pure hypergradient functions against closed forms: implicit (cg, neumann, fixed point), DARTS
finite differences, forward mode, and the ridge / nested-quadratic reference problems."""

from __future__ import annotations

import functools

import pytest
import torch

from mlopt.autodiff import grad
from mlopt.errors import ConfigError, HypergradientError
from mlopt.hypergrad.finite_difference import darts_vjp
from mlopt.hypergrad.forward import Tangents, forward_unroll, forward_vjp
from mlopt.hypergrad.implicit import fixed_point_vjp, implicit_vjp
from mlopt.linalg import cg, fixed_point, neumann
from mlopt.linalg.vec import scale, sub
from mlopt.testing.nested import NestedQuadratic, fd_hypergradient
from mlopt.testing.ridge import RidgeHPO

F64 = torch.float64
D = 6


@pytest.fixture(scope="module")
def ridge():
    return RidgeHPO.random(n_train=40, n_val=30, d=D, seed=0)


@pytest.fixture(scope="module")
def lam():
    return torch.linspace(-1.0, 0.5, D, dtype=F64)


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def ridge_implicit(ridge, lam, solve, *, create_graph=False, params=None, cotangent=None):
    lam = lam if lam.requires_grad else lam.clone().requires_grad_()
    w = ridge.solution(lam.detach()) if params is None else params
    v = ridge.upper_grad(w) if cotangent is None else cotangent

    def grad_fn(p):
        return grad(ridge.lower_loss(p[0], lam), p, create_graph=True)

    return implicit_vjp(grad_fn, (w,), (lam,), (v,), solve, create_graph=create_graph)[0]


def gd_lr(ridge, lam):
    return 1.0 / float(torch.linalg.eigvalsh(ridge.hessian(lam)).max())


# --- the reference problems themselves -----------------------------------------------------------
def test_ridge_closed_forms(ridge, lam):
    w = ridge.solution(lam)
    assert float(ridge.lower_grad(w, lam).abs().max()) < 1e-12
    x = w.clone().requires_grad_()
    (auto,) = torch.autograd.grad(ridge.lower_loss(x, lam), x)
    assert torch.allclose(auto, ridge.lower_grad(w, lam), atol=1e-13)
    hess = torch.autograd.functional.hessian(lambda t: ridge.lower_loss(t, lam), w)
    assert torch.allclose(hess, ridge.hessian(lam), atol=1e-12)
    fd = fd_hypergradient(lambda t: ridge.upper_loss(ridge.solution(t)), lam)
    assert torch.allclose(ridge.hypergradient(lam), fd, rtol=0, atol=1e-9)
    shared = torch.tensor(-0.3, dtype=F64)  # one λ shared by all features
    fd = fd_hypergradient(lambda t: ridge.upper_loss(ridge.solution(t)), shared)
    assert torch.allclose(ridge.hypergradient(shared), fd, rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match="lam"):
        ridge.hessian(torch.zeros(D + 1, dtype=F64))


def test_nested_closed_form_equals_finite_differences_of_solution_maps():
    prog = NestedQuadratic.random(seed=1)
    phi = torch.tensor([0.3, -0.7], dtype=F64)

    def mid_objective(theta, phi):  # M(θ, φ) = mid(θ; w*(θ), φ)
        return prog.mid_loss(theta, prog.low_solution(theta), phi)

    def newton_solution(phi):  # θ*(φ) by one Newton step on the quadratic M (autograd only)
        zero = torch.zeros(prog.q, dtype=F64)
        hess = torch.autograd.functional.hessian(lambda t: mid_objective(t, phi), zero)
        g = torch.autograd.functional.jacobian(lambda t: mid_objective(t, phi), zero)
        return -torch.linalg.solve(hess, g)

    theta = newton_solution(phi)
    assert torch.allclose(prog.mid_solution(phi), theta, atol=1e-12)
    t = theta + 0.1
    auto = torch.autograd.functional.jacobian(lambda x: mid_objective(x, phi), t)
    assert torch.allclose(prog.mid_total_gradient(t, phi), auto, atol=1e-12)
    fd = fd_hypergradient(lambda p: prog.top_loss(p, newton_solution(p)), phi)
    assert torch.allclose(prog.top_hypergradient(phi), fd, rtol=0, atol=1e-8)


def test_nested_hypergradient_by_two_implicit_levels():
    """top's hypergradient = ρφ + IFT at the mid level, whose gradient itself uses IFT at low."""
    prog = NestedQuadratic.random(seed=2)
    phi = torch.tensor([0.5, 0.2], dtype=F64, requires_grad=True)
    solve = functools.partial(cg, iterations=20, tol=1e-14)

    def mid_grad_fn(th):  # total ∇_θ M, differentiable in θ and φ
        (theta,) = th
        w = prog.low_solution(theta)  # exact low solution, connected to θ
        direct = grad(prog.mid_loss(theta, w.detach(), phi), (theta,), create_graph=True)[0]
        (v,) = grad(prog.mid_loss(theta, w, phi), (w,), create_graph=True)

        def low_grad_fn(p):
            return grad(prog.low_loss(p[0], theta), p, create_graph=True)

        (implicit,) = implicit_vjp(low_grad_fn, (w,), (theta,), (v,), solve, create_graph=True)
        return (direct + implicit,)

    theta_star = prog.mid_solution(phi.detach())
    assert float(mid_grad_fn((theta_star,))[0].abs().max()) < 1e-10
    v_top = prog.G.T @ (prog.G @ theta_star - prog.g)
    (ift,) = implicit_vjp(mid_grad_fn, (theta_star,), (phi,), (v_top,), solve)
    total = prog.rho * phi.detach() + ift
    assert torch.allclose(total, prog.top_hypergradient(phi.detach()), rtol=0, atol=1e-10)


# --- implicit hypergradients -------------------------------------------------------------------
def test_implicit_cg_equals_exact(ridge, lam):
    out = ridge_implicit(ridge, lam, functools.partial(cg, iterations=D + 4, tol=1e-14))
    assert rel_err(out, ridge.hypergradient(lam)) < 1e-8


def test_implicit_errors_shrink_with_iterations(ridge, lam):
    exact = ridge.hypergradient(lam)
    lr = gd_lr(ridge, lam)

    def fixed_point_solve(iterations):  # H w = v through x = (I - lr H) x + v, then w = lr x
        def solve(matvec, b):
            x = fixed_point(lambda v: sub(v, scale(matvec(v), lr)), b, iterations=iterations)
            return scale(x, lr)

        return solve

    families = {
        "cg": lambda k: functools.partial(cg, iterations=k, tol=0.0),
        "neumann": lambda k: functools.partial(neumann, iterations=k, alpha=lr),
        "fixed_point": fixed_point_solve,
    }
    schedules = {"cg": [1, 2, 4, D], "neumann": [2, 5, 10, 60], "fixed_point": [2, 5, 10, 60]}
    for name, family in families.items():
        errors = [rel_err(ridge_implicit(ridge, lam, family(k)), exact) for k in schedules[name]]
        assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:], strict=False)), (name, errors)
        assert cosine(ridge_implicit(ridge, lam, family(schedules[name][-1])), exact) > 0.9999
        assert errors[-1] < 1e-6, (name, errors)


def test_fixed_point_vjp_with_gradient_descent_map(ridge, lam):
    lam_ = lam.clone().requires_grad_()
    w = ridge.solution(lam)
    lr = gd_lr(ridge, lam)

    def step_fn(p):
        (g,) = grad(ridge.lower_loss(p[0], lam_), p, create_graph=True)
        return (p[0] - lr * g,)

    exact = ridge.hypergradient(lam)
    errors = []
    for k in (3, 8, 15, 60):
        (out,) = fixed_point_vjp(
            step_fn, (w,), (lam_,), (ridge.upper_grad(w),), iterations=k, tol=0.0
        )
        errors.append(rel_err(out, exact))
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-8


def test_implicit_zero_cotangent_and_unused_upper(ridge, lam):
    lam_ = lam.clone().requires_grad_()
    unused = torch.ones(3, dtype=F64, requires_grad=True)
    w = ridge.solution(lam)

    def grad_fn(p):
        return grad(ridge.lower_loss(p[0], lam_), p, create_graph=True)

    for solve in (cg, neumann, fixed_point):
        out = implicit_vjp(grad_fn, (w,), (lam_, unused), (torch.zeros(D, dtype=F64),), solve)
        assert torch.equal(out[0], torch.zeros(D, dtype=F64))
        assert torch.equal(out[1], torch.zeros(3, dtype=F64))
    out = implicit_vjp(
        grad_fn, (w,), (lam_, unused), (ridge.upper_grad(w),), functools.partial(cg, iterations=20)
    )
    assert torch.equal(out[1], torch.zeros(3, dtype=F64))


def test_implicit_errors_are_clear(ridge, lam):
    w = ridge.solution(lam)
    lam_ = lam.clone().requires_grad_()
    with pytest.raises(HypergradientError, match="create_graph=True"):
        implicit_vjp(
            lambda p: (ridge.lower_grad(p[0].detach(), lam_).detach(),), (w,), (lam_,), (w,), cg
        )
    with pytest.raises(HypergradientError, match="neumann diverged"):
        ridge_implicit(ridge, lam, functools.partial(neumann, iterations=300, alpha=5.0))
    with pytest.raises(HypergradientError, match="shape"):
        ridge_implicit(ridge, lam, cg, cotangent=torch.zeros(D + 1, dtype=F64))


def test_implicit_create_graph_derivatives(ridge, lam):
    """With create_graph=True the result is differentiable w.r.t. the uppers, the cotangent and
    what they depend on: compare with autograd through the closed form
    R(λ, v) = -exp(λ) ⊙ w0 ⊙ H(λ)^{-1} v at a fixed point w0."""
    w0 = ridge.solution(lam)
    lr = gd_lr(ridge, lam)

    def closed(psi, v):
        lam_ = 2.0 * psi  # the upper depends on another tensor
        return -torch.exp(lam_) * w0 * torch.linalg.solve(ridge.hessian(lam_), v)

    def via_implicit(solve):
        def fn(psi, v):
            return ridge_implicit(
                ridge, 2.0 * psi, solve, create_graph=True, params=w0, cotangent=v
            )

        return fn

    def step_map(psi, v):
        lam_ = 2.0 * psi

        def step_fn(p):
            (g,) = grad(ridge.lower_loss(p[0], lam_), p, create_graph=True)
            return (p[0] - lr * g,)

        return fixed_point_vjp(step_fn, (w0,), (lam_,), (v,), iterations=500, tol=0.0,
                               create_graph=True)[0]  # fmt: skip

    psi = (lam / 2).clone().requires_grad_()
    v = ridge.upper_grad(w0).clone().requires_grad_()
    ref = torch.autograd.functional.jacobian(closed, (psi, v))
    candidates = {
        "cg": via_implicit(functools.partial(cg, iterations=D, tol=0.0)),
        "neumann": via_implicit(functools.partial(neumann, iterations=500, alpha=lr)),
        "fixed_point_vjp": step_map,
    }
    for name, fn in candidates.items():
        assert torch.allclose(fn(psi, v), closed(psi, v), atol=1e-10), name
        jac = torch.autograd.functional.jacobian(fn, (psi, v))
        for j, r in zip(jac, ref, strict=True):
            assert torch.allclose(j, r, atol=1e-8), name
    assert torch.autograd.gradcheck(candidates["cg"], (psi, v))


# --- DARTS finite differences ------------------------------------------------------------------
def test_darts_equals_hand_computed_formula():
    phi = torch.tensor([0.4, -1.2, 2.0], dtype=F64, requires_grad=True)
    theta = torch.tensor([0.3, 1.1, -0.5], dtype=F64)
    v = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    lr, epsilon = 0.05, 0.01

    def loss_fn(p):  # ∇_φ f = sin(θ)
        return (phi * torch.sin(p[0])).sum() + (phi**2).sum()

    (out,) = darts_vjp(loss_fn, (theta,), (phi,), (v,), lr, epsilon=epsilon)
    eps = epsilon / float(v.norm())
    hand = -lr * (torch.sin(theta + eps * v) - torch.sin(theta - eps * v)) / (2 * eps)
    assert torch.allclose(out, hand, rtol=1e-12, atol=0)
    # converges to the exact -lr (∂²f/∂φ∂θ) v = -lr cos(θ) ⊙ v as epsilon shrinks, as O(ε²)
    exact = -lr * torch.cos(theta) * v
    errors = [
        float((darts_vjp(loss_fn, (theta,), (phi,), (v,), lr, epsilon=e)[0] - exact).norm())
        for e in (1e-1, 1e-2, 1e-3)
    ]
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50


def test_darts_equals_reverse_mode_through_one_step(ridge, lam):
    """∇_λ f is affine in w here, so the central difference is exact: DARTS's second-order term
    equals the reverse-mode gradient through one SGD step (the lr factor included)."""
    gen = torch.Generator().manual_seed(5)
    w_before = torch.randn(D, generator=gen, dtype=F64)
    lr = 0.1
    lam_ = lam.clone().requires_grad_()
    w_after = w_before - lr * ridge.lower_grad(w_before, lam_)
    (reverse,) = torch.autograd.grad(ridge.upper_loss(w_after), lam_)
    v = ridge.upper_grad(w_after.detach())

    def loss_fn(p):
        return ridge.lower_loss(p[0], lam_)

    for epsilon in (1e-3, 1e-2, 1.0):
        (out,) = darts_vjp(loss_fn, (w_before,), (lam_,), (v,), lr, epsilon=epsilon)
        assert torch.allclose(out, reverse, rtol=1e-9, atol=1e-12)


def test_darts_per_tensor_learning_rates():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, generator=gen, dtype=F64), torch.randn(2, 2, generator=gen, dtype=F64)
    phi = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    m = torch.randn(4, 3, generator=gen, dtype=F64)

    def loss_fn(p):  # quadratic in θ, bilinear coupling with φ
        return (phi * p[0]).sum() * 2 + (m @ phi) @ p[1].reshape(-1) + (p[0] ** 2).sum()

    lrs = (0.1, 0.02)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(loss_fn((a_, b_)), (a_, b_), create_graph=True)
    after = (a_ - lrs[0] * ga, b_ - lrs[1] * gb)
    upper = (after[0] ** 3).sum() + (after[1] ** 2).sum()
    v = torch.autograd.grad(upper, after, retain_graph=True)
    (reverse,) = torch.autograd.grad(upper, phi)
    (out,) = darts_vjp(loss_fn, (a, b), (phi,), tuple(t.detach() for t in v), lrs)
    assert torch.allclose(out, reverse, rtol=1e-9, atol=1e-12)


def test_darts_zero_cotangent_and_bad_input():
    phi = torch.ones(2, dtype=F64, requires_grad=True)
    unused = torch.ones(1, dtype=F64, requires_grad=True)

    def loss_fn(p):
        return (phi * p[0] ** 2).sum()

    theta = (torch.ones(2, dtype=F64),)
    out = darts_vjp(loss_fn, theta, (phi, unused), (torch.zeros(2, dtype=F64),), 0.1)
    assert torch.equal(out[0], torch.zeros(2, dtype=F64)) and torch.equal(out[1], torch.zeros(1))
    with pytest.raises(ConfigError, match="learning rates"):
        darts_vjp(loss_fn, theta, (phi,), (torch.ones(2, dtype=F64),), (0.1, 0.2))
    with pytest.raises(ConfigError, match="epsilon"):
        darts_vjp(loss_fn, theta, (phi,), (torch.ones(2, dtype=F64),), 0.1, epsilon=0.0)


# --- forward mode ------------------------------------------------------------------------------
def momentum_step(ridge, momentum=0.9):
    """SGD with momentum on the ridge loss, with learned λ and log learning rate."""

    def step(state, uppers):
        w, buf = state
        lam, log_lr = uppers
        g = ridge.lower_grad(w, lam)
        buf = momentum * buf + g
        return (w - torch.exp(log_lr) * buf, buf)

    return step


def reverse_unroll(step, state0, uppers, steps, cotangent_fn):
    uppers = tuple(u.clone().requires_grad_() for u in uppers)
    state = state0(uppers)
    for _ in range(steps):
        state = step(state, uppers)
    return torch.autograd.grad(cotangent_fn(state), uppers, allow_unused=True)


def test_forward_equals_reverse_with_momentum(ridge, lam):
    step = momentum_step(ridge)
    uppers = (lam, torch.tensor(-2.5, dtype=F64))
    w0 = torch.linspace(-0.5, 0.5, D, dtype=F64)
    state0 = (w0, torch.zeros(D, dtype=F64))
    ref = reverse_unroll(step, lambda u: state0, uppers, 25, lambda s: ridge.upper_loss(s[0]))
    for kwargs in ({}, {"chunk_size": 2}, {"vectorize": False}):
        state, z = forward_unroll(step, state0, uppers, 25, **kwargs)
        hyper = forward_vjp(z, (ridge.upper_grad(state[0]),), n_params=1)
        for h, r in zip(hyper, ref, strict=True):
            assert h.shape == r.shape
            assert torch.allclose(h, r, rtol=0, atol=1e-10), kwargs
    # continuing from the returned tangents equals one long unroll
    mid_state, z10 = forward_unroll(step, state0, uppers, 10)
    state, z25 = forward_unroll(step, mid_state, uppers, 15, tangent0=z10)
    hyper = forward_vjp(z25, (ridge.upper_grad(state[0]), None))
    for h, r in zip(hyper, ref, strict=True):
        assert torch.allclose(h, r, rtol=0, atol=1e-10)


def test_forward_with_torch_func_grad_step_and_meta_initialization():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    y = (torch.rand(20, generator=gen, dtype=F64) > 0.5).to(F64)
    x_val = torch.randn(10, 3, generator=gen, dtype=F64)
    y_val = (torch.rand(10, generator=gen, dtype=F64) > 0.5).to(F64)

    def lower(params, log_decay):
        weight, bias = params
        logits = torch.tanh(x @ weight) @ torch.ones(2, dtype=F64) + bias
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return nll + 0.5 * torch.exp(log_decay) * (weight**2).sum()

    def step(state, uppers):
        _, _, log_decay = uppers
        grads = torch.func.grad(lower)(state, log_decay)
        return tuple(p - 0.5 * g for p, g in zip(state, grads, strict=True))

    def upper(state):
        weight, bias = state
        logits = torch.tanh(x_val @ weight) @ torch.ones(2, dtype=F64) + bias
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y_val)

    init_w = torch.randn(3, 2, generator=gen, dtype=F64)
    init_b = torch.tensor(0.1, dtype=F64)
    uppers = (init_w, init_b, torch.tensor(-1.0, dtype=F64))
    ref = reverse_unroll(step, lambda u: (u[0], u[1]), uppers, 8, upper)
    state, z = forward_unroll(step, (init_w, init_b), uppers, 8, init=slice(0, 2))
    w_t = tuple(s.clone().requires_grad_() for s in state)
    cot = torch.autograd.grad(upper(w_t), w_t)
    hyper = forward_vjp(z, cot, n_params=2)
    for h, r in zip(hyper, ref, strict=True):
        assert torch.allclose(h, r, rtol=0, atol=1e-10)


def test_forward_input_checks():
    step = lambda s, u: (s[0] * u[0],)  # noqa: E731
    state0, uppers = (torch.ones(2, dtype=F64),), (torch.ones(1, dtype=F64),)
    with pytest.raises(HypergradientError, match="tangent0"):
        forward_unroll(step, state0, uppers, 1, tangent0=(torch.zeros(2, dtype=F64),))
    with pytest.raises(HypergradientError, match="same tensors and shapes"):
        forward_unroll(lambda s, u: (s[0][:1],), state0, uppers, 1)
    with pytest.raises(HypergradientError, match="n_params"):
        _, z = forward_unroll(step, state0, uppers, 1)
        forward_vjp(z, (torch.ones(2, dtype=F64),), n_params=2)
    z = Tangents((torch.ones(1, 2, dtype=F64),), (torch.Size([1]),), (F64,))
    assert torch.equal(forward_vjp(z, (None,))[0], torch.zeros(1, dtype=F64))
