"""BDA (mlopt.dynamics) against closed forms on a quadratic bilevel problem, in float64.

Lower ``f(θ, φ) = ½θᵀAθ - θᵀ(Bφ + c)``, upper ``F(θ, φ) = ½‖Cθ - t‖² + ½ρ‖φ‖²``. A BDA step
``θ ← θ - η[(1-α_k)τ ∇f + α_k s ∇F]`` is affine in θ and φ, so the unrolled trajectory and its
derivatives with respect to φ, α, s and τ follow from linear recurrences (:func:`bda_unroll`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mlopt
from mlopt.dynamics import (
    BDA,
    BDAParameters,
    BDAProblem,
    alpha_at,
    bda_direction,
    bda_objective,
    schedule_factor,
)
from mlopt.hypergrad import Forward, Reverse
from mlopt.testing import QuadraticBilevel, capture_gradients

F64 = torch.float64


# ---------------------------------------------------------------------- closed form
def bda_unroll(q, phi, theta0, lr, alphas, s, tau, truncate=None):
    """θ_T and the derivatives of θ_T w.r.t. φ, each α_k (list), s and τ, by recurrence.

    ``alphas[k]`` is α at step k+1. With ``truncate=K`` only the last K steps are differentiated.
    """
    n, m = q.B.shape
    steps = len(alphas)
    ctc = q.C.T @ q.C
    theta = theta0.clone()
    j_phi = torch.zeros(n, m, dtype=F64)
    d_alpha = [torch.zeros(n, dtype=F64) for _ in range(steps)]
    d_s, d_tau = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)
    start = 0 if truncate is None else max(0, steps - truncate)
    for k, a in enumerate(alphas):
        g_f = q.A @ theta - q.B @ phi - q.c
        g_F = q.C.T @ (q.C @ theta - q.t)
        M = (1 - a) * tau * q.A + a * s * ctc  # d(direction)/dθ
        if k >= start:
            j_phi = j_phi - lr * (M @ j_phi - (1 - a) * tau * q.B)
            d_alpha = [d - lr * (M @ d) for d in d_alpha]
            d_alpha[k] = d_alpha[k] - lr * (-tau * g_f + s * g_F)
            d_s = d_s - lr * (M @ d_s + a * g_F)
            d_tau = d_tau - lr * (M @ d_tau + (1 - a) * g_f)
        theta = theta - lr * ((1 - a) * tau * g_f + a * s * g_F)
    return theta, j_phi, d_alpha, d_s, d_tau


def bda_hypergradient(q, phi, theta0, lr, alphas, s, tau, truncate=None):
    """``(θ_T, dF/dφ, dF/dα_k list, dF/ds, dF/dτ)`` of the BDA unroll."""
    theta, j_phi, d_alpha, d_s, d_tau = bda_unroll(q, phi, theta0, lr, alphas, s, tau, truncate)
    v = q.C.T @ (q.C @ theta - q.t)
    return theta, j_phi.T @ v + q.rho * phi, [d @ v for d in d_alpha], d_s @ v, d_tau @ v


# ---------------------------------------------------------------------- program
class Vector(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.weight = nn.Parameter(value.clone())

    def forward(self):
        return self.weight


class UpperModule(nn.Module):
    def __init__(self, phi, bda=None):
        super().__init__()
        self.weight = nn.Parameter(phi.clone())
        if bda is not None:
            self.bda = bda


class Lower(BDAProblem):
    def lower_loss(self, batch):
        return self.q.lower_loss(self.module.weight, self.upper.module.weight)


class PlainLower(mlopt.Problem):
    def training_step(self, batch):
        return self.q.lower_loss(self.module.weight, self.upper.module.weight)


class Upper(mlopt.Problem):
    def training_step(self, batch):
        return self.q.upper_loss(self.lower.module.weight, self.module.weight)


def program(q, phi, theta0, *, method, steps, windows=1, lr=0.1, bda=None, upper_module=None):
    low_mod = Vector(theta0)
    up_mod = upper_module if upper_module is not None else UpperModule(phi)
    cfg = mlopt.Config(type=method, unroll_steps=steps)
    low_opt = torch.optim.SGD(low_mod.parameters(), lr=lr)
    if bda is None:
        lower = PlainLower("lower", low_mod, low_opt, config=cfg)
    else:
        lower = Lower("lower", low_mod, low_opt, config=cfg, bda=bda)
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.0)  # φ fixed: every window is comparable
    upper = Upper("upper", up_mod, up_opt)
    lower.q = upper.q = q
    seen = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=steps * windows, strategy="cpu"),
    )
    engine.run()
    return seen, low_mod.weight.detach().clone()


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.fixture
def quad():
    q = QuadraticBilevel.random(n=4, m=3, seed=3, rho=0.2, cond=5.0)
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(3, generator=g, dtype=F64)
    theta0 = torch.randn(4, generator=g, dtype=F64)
    return q, phi, theta0


# ---------------------------------------------------------------------- pure functions
def test_schedules_and_direction():
    assert [schedule_factor(k, "harmonic") for k in (1, 2, 3)] == [1.0, 0.5, 1 / 3]
    assert [schedule_factor(k, "geometric", 0.5) for k in (1, 2, 3)] == [1.0, 0.5, 0.25]
    assert alpha_at(0.3, 7, "constant") == 0.3
    per_step = torch.tensor([0.5, 0.4, 0.3], dtype=F64)
    close(alpha_at(per_step, 3, "harmonic"), torch.tensor(0.1, dtype=F64))
    with pytest.raises(mlopt.ConfigError, match="one value per step"):
        alpha_at(per_step, 4)
    with pytest.raises(mlopt.ConfigError, match="unknown α schedule"):
        alpha_at(0.5, 1, "cosine")
    with pytest.raises(mlopt.ConfigError, match="counts from 1"):
        alpha_at(0.5, 0)
    # the objective's gradient is the direction
    y = torch.randn(3, dtype=F64, requires_grad=True)
    f, F = (y**2).sum(), (y.sin()).sum()
    (gf,) = torch.autograd.grad(f, y, retain_graph=True)
    (gF,) = torch.autograd.grad(F, y, retain_graph=True)
    (g,) = torch.autograd.grad(bda_objective(f, F, 0.3, 2.0, 0.5), y)
    close(g, bda_direction((gf,), (gF,), 0.3, 2.0, 0.5)[0], 1e-14)


def test_bda_parameters_and_settings_validation():
    p = BDAParameters(alpha=0.25, s=2.0, t=0.5, steps=2, learn=("alpha",), dtype=F64)
    assert [n for n, _ in p.named_parameters()] == ["raw_alpha"]
    a, s, t = p(2)
    close(a, torch.tensor(0.25, dtype=F64), 1e-14)
    close(s, torch.tensor(2.0, dtype=F64), 1e-14)
    with pytest.raises(mlopt.ConfigError, match="per-step alphas"):
        p(3)
    with pytest.raises(mlopt.ConfigError, match="in \\(0, 1\\)"):
        BDAParameters(alpha=1.5)
    with pytest.raises(mlopt.ConfigError, match="schedule must be one of"):
        BDA(upper="u", schedule="linear")
    with pytest.raises(mlopt.ConfigError, match="upper_batch"):
        BDA(upper="u", upper_batch="val")
    with pytest.raises(mlopt.ConfigError, match="<upper>.<submodule>"):
        BDA(upper="u", params="bda")


def test_bda_upper_must_be_an_upper(quad):
    q, phi, theta0 = quad
    with pytest.raises(mlopt.ConfigError, match="to the u2l dependencies"):
        low_mod, up_mod = Vector(theta0), UpperModule(phi)
        lower = Lower(
            "lower", low_mod, torch.optim.SGD(low_mod.parameters(), lr=0.1), bda=BDA("upper")
        )
        upper = Upper("upper", up_mod, torch.optim.SGD(up_mod.parameters(), lr=0.1))
        lower.q = upper.q = q
        mlopt.Engine([upper, lower], {"l2u": {lower: [upper]}}).run()


# ---------------------------------------------------------------------- α = 0 is plain GD
@pytest.mark.parametrize(
    "method", ["reverse", Reverse(truncate=2), "finite_difference", "first_order"]
)
@pytest.mark.parametrize("alpha", [0.0, "tensor"])
def test_alpha_zero_equals_gradient_descent(quad, method, alpha):
    q, phi, theta0 = quad
    steps = 1 if method == "finite_difference" else 4
    if alpha == "tensor":
        alpha = torch.tensor(0.0, dtype=F64)  # F is computed and multiplied by zero
    bda = BDA(upper="upper", alpha=alpha, schedule="constant", s=3.0)
    seen_bda, theta_bda = program(q, phi, theta0, method=method, steps=steps, windows=2, bda=bda)
    seen_gd, theta_gd = program(q, phi, theta0, method=method, steps=steps, windows=2)
    close(theta_bda, theta_gd, 1e-14)
    for a, b in zip(seen_bda, seen_gd):
        close(a[0], b[0], 1e-12)


# ---------------------------------------------------------------------- α > 0: closed form
@pytest.mark.parametrize("schedule", ["harmonic", "geometric", "constant"])
def test_reverse_matches_closed_form(quad, schedule):
    q, phi, theta0 = quad
    steps, lr, alpha, s, tau = 5, 0.08, 0.6, 1.7, 0.9
    bda = BDA(upper="upper", alpha=alpha, schedule=schedule, gamma=0.7, s=s, t=tau)
    seen, theta = program(q, phi, theta0, method="reverse", steps=steps, windows=2, lr=lr, bda=bda)
    alphas = [alpha_at(alpha, k, schedule, 0.7) for k in range(1, steps + 1)]
    theta1, g1, *_ = bda_hypergradient(q, phi, theta0, lr, alphas, s, tau)
    theta2, g2, *_ = bda_hypergradient(q, phi, theta1, lr, alphas, s, tau)  # schedule restarts
    close(theta, theta2)
    close(seen[0][0], g1)
    close(seen[1][0], g2)
    plain = q.unrolled_hypergradient(phi, theta0, lr=lr, steps=steps)
    assert (seen[0][0] - plain).abs().max() > 1e-3  # BDA changed the dynamics


def test_truncated_reverse_matches_closed_form(quad):
    q, phi, theta0 = quad
    steps, lr, alpha, s, tau = 6, 0.08, 0.8, 1.3, 1.1
    bda = BDA(upper="upper", alpha=alpha, s=s, t=tau)
    seen, _ = program(q, phi, theta0, method=Reverse(truncate=2), steps=steps, lr=lr, bda=bda)
    alphas = [alpha / k for k in range(1, steps + 1)]
    _, g, *_ = bda_hypergradient(q, phi, theta0, lr, alphas, s, tau, truncate=2)
    _, g_full, *_ = bda_hypergradient(q, phi, theta0, lr, alphas, s, tau)
    close(seen[0][0], g)
    assert (g - g_full).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["finite_difference", Forward()])
def test_finite_difference_and_forward_match_closed_form(quad, method):
    q, phi, theta0 = quad
    lr, alpha, s, tau = 0.1, 0.4, 2.0, 0.7
    steps = 1 if method == "finite_difference" else 3
    bda = BDA(upper="upper", alpha=alpha, schedule="constant", s=s, t=tau)
    seen, _ = program(q, phi, theta0, method=method, steps=steps, windows=2, lr=lr, bda=bda)
    alphas = [alpha] * steps
    theta1, g1, *_ = bda_hypergradient(q, phi, theta0, lr, alphas, s, tau)
    _, g2, *_ = bda_hypergradient(q, phi, theta1, lr, alphas, s, tau)
    close(seen[0][0], g1, 1e-8)
    close(seen[1][0], g2, 1e-8)


# ---------------------------------------------------------------------- learned α, s, t
@pytest.mark.parametrize("per_step", [False, True])
def test_learned_coefficients_reverse(quad, per_step):
    q, phi, theta0 = quad
    steps, lr = 4, 0.08
    init_alpha, s, tau = 0.3, 1.5, 0.8
    params = BDAParameters(
        alpha=init_alpha, s=s, t=tau, steps=steps if per_step else None, dtype=F64
    )
    up = UpperModule(phi, params)
    bda = BDA(upper="upper", params="upper.bda", schedule="harmonic")
    seen, _ = program(
        q, phi, theta0, method="reverse", steps=steps, lr=lr, bda=bda, upper_module=up
    )
    alphas = [init_alpha / k for k in range(1, steps + 1)]
    _, g_phi, g_alphas, g_s, g_tau = bda_hypergradient(q, phi, theta0, lr, alphas, s, tau)
    # chain rule through the schedule factor 1/k and the constrained parametrization
    dsig = init_alpha * (1 - init_alpha)
    per_alpha = torch.stack([g / k for k, g in enumerate(g_alphas, 1)]) * dsig
    got = dict(zip([n for n, _ in up.named_parameters()], seen[0]))
    close(got["weight"], g_phi)
    close(got["bda.raw_alpha"], per_alpha if per_step else per_alpha.sum())
    close(got["bda.raw_s"], g_s * s)
    close(got["bda.raw_t"], g_tau * tau)


def test_learned_coefficients_finite_difference(quad):
    q, phi, theta0 = quad
    lr, a0, s, tau = 0.1, 0.6, 1.2, 0.9
    params = BDAParameters(alpha=a0, s=s, t=tau, constrained=False, dtype=F64)
    up = UpperModule(phi, params)
    bda = BDA(upper="upper", params="upper.bda", schedule="constant")
    seen, _ = program(
        q, phi, theta0, method="finite_difference", steps=1, lr=lr, bda=bda, upper_module=up
    )
    _, g_phi, (g_a,), g_s, g_tau = bda_hypergradient(q, phi, theta0, lr, [a0], s, tau)
    got = dict(zip([n for n, _ in up.named_parameters()], seen[0]))
    close(got["weight"], g_phi, 1e-8)
    close(got["bda.raw_alpha"], g_a, 1e-8)
    close(got["bda.raw_s"], g_s, 1e-8)
    close(got["bda.raw_t"], g_tau, 1e-8)


# ---------------------------------------------------------------------- batches of F
def test_upper_batch_is_drawn_once_per_update_and_reused_by_the_vjp():
    """F batches come from a private iterator over the upper's loader, one per lower update;
    the finite-difference vjp re-evaluates the last update with that same batch. Here F's mixed
    derivative depends on the batch b: F = ½‖θ - b‖² + θ·(b⊙φ), so using another batch in the
    vjp would change the hypergradient."""
    n, lr, alpha = 3, 0.1, 0.5
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(n, generator=g, dtype=F64) for _ in range(3)]
    phi = torch.randn(n, generator=g, dtype=F64)

    def upper_loss(theta, phi, b):
        return 0.5 * ((theta - b) ** 2).sum() + theta @ (b * phi)

    class Low(BDAProblem):
        def lower_loss(self, batch):
            w = self.module.weight
            return w @ w - w @ self.upper.module.weight

    class Up(mlopt.Problem):
        def training_step(self, batch):
            return upper_loss(self.lower.module.weight, self.module.weight, batch)

    low_mod, up_mod = Vector(torch.zeros(n, dtype=F64)), UpperModule(phi)
    lower = Low(
        "lower",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=lr),
        config=mlopt.Config(type="finite_difference"),
        bda=BDA("upper", alpha=alpha, schedule="constant"),
    )
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.0)
    upper = Up("upper", up_mod, up_opt, train_data_loader=targets)
    seen = capture_gradients(up_opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=2),
    ).run()
    theta = torch.zeros(n, dtype=F64)
    for step in range(2):
        b = targets[step]  # the lower's private iterator and the upper's stream are in step
        grad_f = 2 * theta - phi
        grad_F = theta - b + b * phi
        new = theta - lr * ((1 - alpha) * grad_f + alpha * grad_F)
        v = new - b + b * phi
        # dθ'/dφ = η(1-α)I - ηα diag(b); direct ∂F/∂φ = θ' ⊙ b
        expected = new * b + lr * (1 - alpha) * v - lr * alpha * b * v
        close(seen[step][0], expected, 1e-8)
        theta = new
