"""MINRES (Paige and Saunders 1975) on symmetric indefinite systems: closed forms in float64."""

import pytest
import torch
from helpers import F64, QuadLower, QuadUpper, Vector

import mlopt
from mlopt import ConfigError, HypergradientError
from mlopt.hypergrad import CG, MINRES
from mlopt.linalg import cg, minres
from mlopt.testing import QuadraticBilevel, capture_gradients


def indefinite(n=8, seed=0, eig=None):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = torch.tensor(eig or [-7.7, -3, -1, 0.5, 1, 2, 5, 9.0], dtype=F64)
    a = q @ torch.diag(eig) @ q.T
    return (a + a.T) / 2, torch.randn(n, generator=g, dtype=F64)


def test_minres_solves_an_indefinite_system_in_n_iterations():
    a, b = indefinite()
    (x,), info = minres(lambda v: (a @ v[0],), (b,), iterations=8, tol=0.0, return_info=True)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-11, atol=1e-12)
    assert info.solver == "minres" and info.iterations == 8


def test_minres_residual_never_increases_and_its_estimate_is_the_true_residual():
    a, b = indefinite(seed=1)
    previous = float("inf")
    for k in range(1, 9):
        (x,), info = minres(lambda v: (a @ v[0],), (b,), iterations=k, tol=0.0, return_info=True)
        true = float((b - a @ x).norm())
        assert info.residual == pytest.approx(true, rel=1e-9, abs=1e-12)
        assert true <= previous + 1e-12
        previous = true


def test_minres_on_tuples_with_damping_and_a_tolerance():
    a, b = indefinite(seed=2)
    m = a + 2.5 * torch.eye(8, dtype=F64)
    parts = (b[:3], b[3:].reshape(5, 1))

    def matvec(v):
        y = a @ torch.cat([v[0], v[1].reshape(-1)])
        return y[:3], y[3:].reshape(5, 1)

    (x0, x1), info = minres(matvec, parts, iterations=50, tol=1e-12, damping=2.5, return_info=True)
    torch.testing.assert_close(torch.cat([x0, x1.reshape(-1)]), torch.linalg.solve(m, b))
    assert info.converged and info.iterations <= 9


def test_minres_without_checks_runs_exactly_k_iterations_bit_for_bit():
    a, b = indefinite(seed=3)
    (checked,) = minres(lambda v: (a @ v[0],), (b,), iterations=5, tol=0.0)
    (free,) = minres(lambda v: (a @ v[0],), (b,), iterations=5, check=False)
    assert torch.equal(checked, free)


def test_minres_is_differentiable_through_its_iterations():
    a, b = indefinite(seed=4)
    b = b.clone().requires_grad_()
    (x,) = minres(lambda v: (a @ v[0],), (b,), iterations=8, tol=0.0)
    (grad,) = torch.autograd.grad(x.sum(), b)  # d(1ᵀA⁻¹b)/db = A⁻¹1
    torch.testing.assert_close(grad, torch.linalg.solve(a, torch.ones(8, dtype=F64)))


def test_minres_bad_input():
    a, b = indefinite()
    with pytest.raises(HypergradientError, match=r"minres: the right-hand side b is not finite"):
        minres(lambda v: (a @ v[0],), (b * float("nan"),))
    with pytest.raises(ConfigError, match=r"minres: iterations must be an int >= 0"):
        minres(lambda v: v, (b,), iterations=-1)
    with pytest.raises(ConfigError, match=r"minres: damping must be a finite number >= 0"):
        minres(lambda v: v, (b,), damping=float("inf"))
    (x,) = minres(lambda v: (a @ v[0],), (torch.zeros(8, dtype=F64),))
    assert torch.equal(x, torch.zeros(8, dtype=F64))
    for bad in ({"iterations": 0}, {"tol": float("nan")}, {"damping": -1.0}):
        with pytest.raises(ConfigError, match=r"MINRES: "):
            MINRES(**bad)


def saddle_program(method):
    """A bilevel quadratic whose lower Hessian A is indefinite; the lower sits at its stationary
    point θ* = A⁻¹(Bφ + c) (a saddle), where the implicit hypergradient is still defined."""
    q0 = QuadraticBilevel.random(n=6, m=3, seed=5)
    a, _ = indefinite(n=6, seed=6, eig=[-4.0, -1.5, 0.7, 1.0, 3.0, 6.0])
    q = QuadraticBilevel(A=a, B=q0.B, c=q0.c, C=q0.C, t=q0.t, rho=q0.rho)
    phi0 = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(7))
    low_mod, up_mod = Vector(q.solution(phi0)), Vector(phi0)
    lower = QuadLower(
        q,
        "upper",
        name="lower",
        module=low_mod,
        optimizer=torch.optim.SGD(low_mod.parameters(), lr=0.01),
        config=mlopt.Config(type=method),
    )
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.1)
    upper = QuadUpper(q, "lower", name="upper", module=up_mod, optimizer=up_opt)
    grads = capture_gradients(up_opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=1),
    ).run()
    return grads[0][0], q.implicit_hypergradient(phi0)


@pytest.mark.parametrize("tol", [0.0, None], ids=["monitored", "exact-k"])
def test_minres_gives_the_implicit_hypergradient_at_a_saddle(tol):
    got, exact = saddle_program(MINRES(iterations=6, tol=tol))
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


def test_cg_flags_negative_curvature_at_the_same_saddle():
    a, _ = indefinite(n=6, seed=6, eig=[-4.0, -1.5, 0.7, 1.0, 3.0, 6.0])
    b = torch.ones(6, dtype=F64)
    _, info = cg(lambda v: (a @ v[0],), (b,), iterations=6, tol=0.0, return_info=True)
    assert info.negative_curvature


def test_minres_is_registered():
    assert isinstance(mlopt.Config(type="minres").type, MINRES)
    assert isinstance(CG(), CG)
