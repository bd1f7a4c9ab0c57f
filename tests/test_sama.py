"""SAMA (Choe et al. 2023) against its formula and, where it is exact (one lower step, a loss
whose ∇_φ f is affine in θ), against reverse-mode differentiation through that step (float64)."""

import pytest
import torch
from helpers import F64, QuadLower, QuadUpper, Vector

import mlopt
from mlopt import ConfigError
from mlopt.hypergrad import SAMA, Reverse, sama_vjp
from mlopt.hypergrad.sama import adam_preconditioner, sgd_preconditioner
from mlopt.optim import DifferentiableOptimizer
from mlopt.testing import QuadraticBilevel, capture_gradients


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- the formula
def test_sama_vjp_is_minus_the_mixed_derivative_times_the_preconditioned_cotangent():
    """Against second-order autograd on a loss whose ∇_φ f is not affine in θ: O(ε²)."""
    phi = torch.randn(3, dtype=F64, generator=_gen(0)).requires_grad_()
    theta = (torch.randn(4, dtype=F64, generator=_gen(1)),)
    cot = (torch.randn(4, dtype=F64, generator=_gen(2)),)
    precond = (torch.rand(4, dtype=F64, generator=_gen(3)),)
    M = torch.randn(4, 3, dtype=F64, generator=_gen(4))

    def loss_fn(th):
        return torch.sin(th[0] @ M @ phi) + (th[0] ** 2).sum() * phi.sum() ** 2

    th = theta[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn((th,)), th, create_graph=True)
    v = precond[0] * cot[0]
    (exact,) = torch.autograd.grad(g @ v, phi)
    errors = []
    for radius in (1e-1, 1e-2, 1e-3):
        (got,) = sama_vjp(loss_fn, theta, (phi,), cot, precond, radius=radius)
        errors.append(float((got + exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors  # O(ε²): 100x per 10x


def test_sgd_preconditioner():
    assert sgd_preconditioner(0.1, 0.0, 0.0, False) == 0.1
    assert sgd_preconditioner(0.1, 0.9, 0.0, False) == 0.1
    assert sgd_preconditioner(0.1, 0.9, 0.5, False) == pytest.approx(0.05)
    assert sgd_preconditioner(0.1, 0.9, 0.0, True) == pytest.approx(0.19)


@pytest.mark.parametrize("step", [1, 2, 7])
def test_adam_preconditioner_is_the_derivative_of_torchs_update(step):
    """Against autograd through mlopt's functional Adam (equal to torch's to 1e-12)."""
    w = torch.nn.Parameter(torch.randn(6, dtype=F64, generator=_gen(5)))
    opt = torch.optim.Adam([w], lr=0.03, betas=(0.8, 0.95), eps=1e-6)
    for k in range(step - 1):  # a history of gradients
        w.grad = torch.randn(6, dtype=F64, generator=_gen(10 + k))
        opt.step()
    dopt = DifferentiableOptimizer(opt, [w])
    state = dopt.init_state(fresh=False)
    g = torch.randn(6, dtype=F64, generator=_gen(99)).requires_grad_()
    (new,), _ = dopt.step([w.detach()], [g], state)
    (diag,) = torch.autograd.grad(
        -new.sum(), g
    )  # the update is elementwise: ones give the diagonal
    w.grad = g.detach().clone()
    opt.step()
    st = opt.state[w]
    got = adam_preconditioner(
        g.detach(), st["exp_avg"], st["exp_avg_sq"], int(st["step"]), 0.03, (0.8, 0.95), 1e-6
    )
    torch.testing.assert_close(got, diag, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------- the exact regime
def program(method, optimizer, iters=5):
    q = QuadraticBilevel.random(n=5, m=3, seed=3, cond=8.0)
    phi0 = torch.randn(3, dtype=F64, generator=_gen(6))
    theta0 = torch.randn(5, dtype=F64, generator=_gen(7))
    low_mod, up_mod = Vector(theta0), Vector(phi0)
    cfg = mlopt.Config(type=method, unroll_steps=1)
    lower = QuadLower(
        q, "upper", name="lower", module=low_mod, optimizer=optimizer(low_mod), config=cfg
    )
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.2)
    upper = QuadUpper(q, "lower", name="upper", module=up_mod, optimizer=up_opt)
    grads = capture_gradients(up_opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, strategy="cpu"),
    ).run()
    return [g[0] for g in grads], low_mod.weight.detach(), up_mod.weight.detach()


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, nesterov=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, betas=(0.8, 0.9)),
    "adam-l2": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.1),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_sama_equals_reverse_through_one_lower_step(opt):
    """The quadratic's ∇_φ f is affine in θ, so SAMA's central difference is exact and its
    update Jacobian is the one-step unroll's: the upper gradients agree at every iteration."""
    got, low, up = program(SAMA(), OPTIMIZERS[opt])
    want, low_r, up_r = program(Reverse(), OPTIMIZERS[opt])
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(low, low_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(up, up_r, rtol=1e-9, atol=1e-11)


def test_sama_is_registered_and_checks_its_options():
    assert isinstance(mlopt.Config(type="sama").type, SAMA)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match=r"SAMA: radius must be a finite number > 0"):
            SAMA(radius=bad)


def test_sama_refuses_an_optimizer_without_an_update_jacobian():
    with pytest.raises(ConfigError, match=r"SAMA: optimizer RMSprop has no update Jacobian"):
        program(SAMA(), lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01), iters=1)
