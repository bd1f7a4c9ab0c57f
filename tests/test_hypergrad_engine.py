"""Every hypergradient method through the Problem/Engine API against closed forms (float64)."""

import pytest
import torch
from helpers import F64, Vector, quadratic_program
from torch import nn

import mlopt
from mlopt.hypergrad import CG, FiniteDifference, FixedPoint, Forward, Neumann, Reverse
from mlopt.testing import NestedQuadratic, QuadraticBilevel, RidgeHPO, capture_gradients


def upper_gradient(q, phi0, theta0, method, steps=1, lr=0.05, momentum=0.0):
    engine, _, _, grads = quadratic_program(
        q, phi0, theta0, method=method, steps=steps, lr=lr, momentum=momentum
    )
    engine.run()
    return grads[0][0]


@pytest.fixture
def quad():
    q = QuadraticBilevel.random(n=5, m=3, seed=7, cond=10.0)
    phi0 = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(1))
    return q, phi0, q.solution(phi0)  # the lower starts (and stays) at its solution


def test_cg_matches_implicit_closed_form(quad):
    q, phi0, theta_star = quad
    got = upper_gradient(q, phi0, theta_star, CG(iterations=5, tol=0.0))  # exact in n=5 steps
    torch.testing.assert_close(got, q.implicit_hypergradient(phi0), rtol=0, atol=1e-8)


def test_cg_with_tol_none_runs_exactly_k_iterations_without_monitoring(quad, monkeypatch):
    q, phi0, theta_star = quad
    seen = []
    import mlopt.hypergrad.methods as m

    real = m.cg

    def spy(matvec, b, **kw):
        seen.append(kw)
        return real(matvec, b, **kw)

    monkeypatch.setattr(m, "cg", spy)
    exact = upper_gradient(q, phi0, theta_star, CG(iterations=5, tol=None))
    assert seen == [{"iterations": 5, "tol": 0.0, "damping": 0.0, "check": False}]
    torch.testing.assert_close(exact, q.implicit_hypergradient(phi0), rtol=0, atol=1e-8)
    # the same iterates as the monitored solver run to the end: bit for bit
    monitored = upper_gradient(q, phi0, theta_star, CG(iterations=5, tol=0.0))
    assert torch.equal(exact, monitored)


def test_fixed_point_matches_implicit_closed_form(quad):
    q, phi0, theta_star = quad
    got = upper_gradient(q, phi0, theta_star, FixedPoint(iterations=2000, tol=1e-14), lr=0.1)
    torch.testing.assert_close(got, q.implicit_hypergradient(phi0), rtol=0, atol=1e-8)


def test_neumann_error_falls_monotonically_with_iterations(quad):
    q, phi0, theta_star = quad
    exact = q.implicit_hypergradient(phi0)
    errors = []
    for k in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        got = upper_gradient(q, phi0, theta_star, Neumann(iterations=k, alpha=0.1))  # 2/λmax=0.2
        errors.append(float((got - exact).norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8


def test_neumann_divergence_raises_before_writing_the_gradient(quad):
    q, phi0, theta_star = quad
    engine, upper, _, grads = quadratic_program(
        q, phi0, theta_star, method=Neumann(iterations=200, alpha=0.5)
    )
    before = upper.module.weight.detach().clone()
    with pytest.raises(
        mlopt.HypergradientError,
        match=r"problem 'upper', step 0: hypergradient through 'lower' \(Neumann.*neumann",
    ):
        engine.run()
    assert grads == [] and torch.equal(upper.module.weight, before)


def test_solver_divergence_can_skip_the_update_with_a_warning(quad):
    q, phi0, theta_star = quad
    engine, upper, _, grads = quadratic_program(
        q,
        phi0,
        theta_star,
        method=Neumann(iterations=200, alpha=0.5),
        upper_config=mlopt.Config(on_nonfinite="skip"),
    )
    before = upper.module.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite hypergradient.*through 'lower'"):
        engine.run()
    assert grads == [] and torch.equal(upper.module.weight, before)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_forward_equals_reverse_and_closed_form(momentum):
    q = QuadraticBilevel.random(n=4, m=3, seed=8)
    phi0, theta0 = torch.randn(3, dtype=F64), torch.randn(4, dtype=F64)
    fwd = upper_gradient(q, phi0, theta0, Forward(), steps=6, momentum=momentum)
    rev = upper_gradient(q, phi0, theta0, Reverse(), steps=6, momentum=momentum)
    exact = q.unrolled_hypergradient(phi0, theta0, lr=0.05, steps=6, momentum=momentum)
    torch.testing.assert_close(fwd, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(rev, exact, rtol=0, atol=1e-10)


def test_forward_with_meta_initialization():
    q = QuadraticBilevel.random(n=3, m=3, seed=9)
    phi0 = torch.randn(3, dtype=F64)
    engine, *_, grads = quadratic_program(
        q, phi0, None, steps=4, lr=0.1, init=True, method=Forward()
    )
    engine.run()
    exact = q.unrolled_hypergradient(phi0, None, lr=0.1, steps=4, init_from_phi=True)
    torch.testing.assert_close(grads[0][0], exact, rtol=0, atol=1e-10)


def test_finite_difference_is_exact_darts_on_quadratics():
    # f is quadratic, so DARTS's central difference of ∇_φ f is exact: it equals the reverse
    # hypergradient through the single (look-ahead) step, including the lr factor.
    q = QuadraticBilevel.random(n=4, m=3, seed=10)
    phi0, theta0 = torch.randn(3, dtype=F64), torch.randn(4, dtype=F64)
    fd = upper_gradient(q, phi0, theta0, FiniteDifference(epsilon=0.01), steps=1, lr=0.05)
    exact = q.unrolled_hypergradient(phi0, theta0, lr=0.05, steps=1)
    torch.testing.assert_close(fd, exact, rtol=0, atol=1e-9)
    # Betty drops the lr factor: its implicit term would be 1/lr = 20 times too large here.
    direct = q.rho * phi0
    assert not torch.allclose((fd - direct) / 0.05 + direct, exact, atol=1e-3)


class Quartic(mlopt.Problem):
    """Non-quadratic lower: f = ½θᵀAθ - θᵀBφ + ¼Σ(θ_i φ_j)⁴-ish coupling."""

    def training_step(self, batch):
        th, ph = self.module.weight, self.upper.module.weight
        return 0.5 * th @ self.A @ th - th @ (self.B @ ph) + 0.25 * ((th[:3] * ph) ** 4).sum()


class QuarticUpper(mlopt.Problem):
    def training_step(self, batch):
        return 0.5 * ((self.lower.module.weight - 1.0) ** 2).sum()


def quartic_gradient(method, seed=11):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(4, dtype=F64) * 2
    B = torch.randn(4, 3, generator=g, dtype=F64)
    th, ph = (
        Vector(torch.randn(4, generator=g, dtype=F64)),
        Vector(torch.randn(3, generator=g, dtype=F64)),
    )
    lower = Quartic(
        "lower",
        th,
        torch.optim.SGD(th.parameters(), lr=0.1),
        config=mlopt.Config(type=method, unroll_steps=1),
    )
    opt = torch.optim.SGD(ph.parameters(), lr=0.0)
    upper = QuarticUpper("upper", ph, opt)
    lower.A, lower.B = A, B
    seen = capture_gradients(opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=1),
    ).run()
    return seen[0][0]


def test_finite_difference_converges_to_reverse_as_epsilon_shrinks():
    exact = quartic_gradient("reverse")
    errors = [
        float((quartic_gradient(FiniteDifference(epsilon=e)) - exact).norm())
        for e in (0.3, 0.1, 0.03, 0.01)
    ]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * float(exact.norm())


class RidgeLower(mlopt.Problem):
    def training_step(self, batch):
        return self.r.lower_loss(self.module.weight, self.hyper.module.weight)


class RidgeUpper(mlopt.Problem):
    def training_step(self, batch):
        return self.r.upper_loss(self.lower.module.weight)


def ridge_engine_gradient(r, lam, method, lr):
    w = Vector(r.solution(lam))
    h = Vector(lam)
    lower = RidgeLower(
        "lower",
        w,
        torch.optim.SGD(w.parameters(), lr=lr),
        config=mlopt.Config(type=method, unroll_steps=1),
    )
    opt = torch.optim.SGD(h.parameters(), lr=0.0)
    hyper = RidgeUpper("hyper", h, opt)
    lower.r = hyper.r = r
    seen = capture_gradients(opt)
    mlopt.Engine(
        [hyper, lower],
        {"u2l": {hyper: [lower]}, "l2u": {lower: [hyper]}},
        mlopt.EngineConfig(train_iters=1),
    ).run()
    return seen[0][0]


@pytest.mark.parametrize(
    "method",
    [CG(iterations=50, tol=1e-14), Neumann(iterations=3000, alpha=1.0), FixedPoint(3000, 1e-14)],
    ids=["cg", "neumann", "fixed_point"],
)
def test_implicit_methods_on_ridge_hpo(method):
    r = RidgeHPO.random(n_train=40, n_val=30, d=6, seed=3)
    lam = torch.linspace(-2.0, 1.0, 6, dtype=F64)
    lmax = float(torch.linalg.eigvalsh(r.hessian(lam)).max())
    if isinstance(method, Neumann):
        method = Neumann(iterations=method.iterations, alpha=1.0 / lmax)
    got = ridge_engine_gradient(r, lam, method, lr=1.0 / lmax)
    exact = r.hypergradient(lam)
    cosine = float(got @ exact / (got.norm() * exact.norm()))
    assert cosine > 0.9999
    if isinstance(method, CG):
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-8)


class Low3(mlopt.Problem):
    def training_step(self, batch):
        return self.prog.low_loss(self.module.weight, self.mid.module.weight)


class Mid3(mlopt.Problem):
    def training_step(self, batch):
        p = self.prog
        return p.mid_loss(self.module.weight, self.low.module.weight, self.top.module.weight)


class Top3(mlopt.Problem):
    def training_step(self, batch):
        return self.prog.top_loss(self.module.weight, self.mid.module.weight)


@pytest.mark.parametrize("mid_method", ["cg", "neumann", "fixed_point"])
def test_nested_three_levels_matches_closed_form(mid_method):
    """Implicit methods on a MIDDLE level (which Betty forbids), end to end."""
    prog = NestedQuadratic.random(seed=0)
    phi0 = torch.randn(prog.r, dtype=F64, generator=torch.Generator().manual_seed(2))
    theta0 = prog.mid_solution(phi0)
    w0 = prog.low_solution(theta0)
    mods = {"low": Vector(w0), "mid": Vector(theta0), "top": Vector(phi0)}
    lmax = float(torch.linalg.eigvalsh(prog.mid_hessian()).max())
    methods = {
        "cg": CG(iterations=prog.q, tol=0.0),
        "neumann": Neumann(iterations=400, alpha=1.0 / lmax),  # condition number 9.4
        "fixed_point": FixedPoint(iterations=400, tol=1e-15),
    }
    mid_cfg = mlopt.Config(type=methods[mid_method], unroll_steps=1)
    low = Low3(
        "low",
        mods["low"],
        torch.optim.SGD(mods["low"].parameters(), lr=0.01),
        config=mlopt.Config(type=CG(iterations=prog.p, tol=0.0)),
    )
    mid = Mid3(
        "mid", mods["mid"], torch.optim.SGD(mods["mid"].parameters(), lr=1.0 / lmax), config=mid_cfg
    )
    opt = torch.optim.SGD(mods["top"].parameters(), lr=0.0)
    top = Top3("top", mods["top"], opt)
    for p in (low, mid, top):
        p.prog = prog
    seen = capture_gradients(opt)
    engine = mlopt.Engine(
        [top, mid, low],
        {"u2l": {top: [mid], mid: [low]}, "l2u": {low: [mid], mid: [top]}},
        mlopt.EngineConfig(train_iters=1),
    )
    engine.run()
    exact = prog.top_hypergradient(phi0)
    tol = 1e-8 if mid_method == "cg" else 1e-7
    torch.testing.assert_close(seen[0][0], exact, rtol=0, atol=tol)
    # the lowers started at their solutions and stayed there (their total gradients are zero)
    torch.testing.assert_close(mods["mid"].weight.detach(), theta0, rtol=0, atol=1e-12)


def test_user_defined_method_plugs_in_without_editing_the_library():
    class Scaled(mlopt.hypergrad.Method):
        """Half of the first-order... i.e. a custom rule: v ↦ 2·(implicit term of CG)."""

        name = "scaled_cg"

        def vjp(self, ctx, cotangent):
            return tuple(2 * g for g in CG(iterations=5, tol=0.0).vjp(ctx, cotangent))

    mlopt.hypergrad.register_method("scaled_cg", Scaled, overwrite=True)
    q = QuadraticBilevel.random(n=5, m=3, seed=7, rho=0.0)
    phi0 = torch.randn(3, dtype=F64)
    got = upper_gradient(q, phi0, q.solution(phi0), "scaled_cg")
    torch.testing.assert_close(got, 2 * q.implicit_hypergradient(phi0), rtol=0, atol=1e-8)
    got_obj = upper_gradient(q, phi0, q.solution(phi0), Scaled())
    torch.testing.assert_close(got_obj, got, rtol=0, atol=1e-12)


def test_bad_method_options():
    with pytest.raises(mlopt.ConfigError, match="CG: iterations must be an integer >= 1"):
        CG(iterations=0)
    with pytest.raises(mlopt.ConfigError, match="Neumann: alpha must be a finite number > 0"):
        Neumann(alpha=0.0)
    with pytest.raises(mlopt.ConfigError, match="Reverse: truncate"):
        Reverse(truncate=0)
    with pytest.raises(mlopt.ConfigError, match="FiniteDifference: epsilon"):
        FiniteDifference(epsilon=-1)
    _ = nn


def _three_windows(method, optimizer, lower_loss=None):
    """Upper gradients of 3 windows of 2 updates (the optimizer state carries over windows)."""
    q = QuadraticBilevel.random(n=5, m=3, seed=3, cond=8.0)
    g = torch.Generator().manual_seed(0)
    low = Vector(torch.randn(5, dtype=F64, generator=g))
    up = Vector(torch.randn(3, dtype=F64, generator=g))

    class Lower(mlopt.Problem):
        def training_step(self, batch):
            theta, phi = self.module.weight, self.upper.module.weight
            return (lower_loss or q.lower_loss)(theta, phi)

    class Upper(mlopt.Problem):
        def training_step(self, batch):
            return q.upper_loss(self.lower(), self.module())

    cfg = mlopt.Config(type=method, unroll_steps=2)
    lower = Lower("lower", low, optimizer(low.parameters()), config=cfg)
    up_opt = torch.optim.SGD(up.parameters(), lr=0.3)
    upper = Upper("upper", up, up_opt)
    grads = capture_gradients(up_opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=6),
    ).run()
    return [gr[0] for gr in grads]


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.05),
    ],
    ids=["momentum", "adam"],
)
@pytest.mark.parametrize("quadratic", [True, False], ids=["quadratic", "cubic"])
def test_forward_equals_reverse_across_windows_with_optimizer_state(optimizer, quadratic):
    """Forward mode once committed a stale copy of the optimizer's state at each window end
    (momentum and Adam moments reset to the window start), and took its tangent step at the
    updated parameters (wrong unless the lower loss is quadratic); both regressions."""
    q = QuadraticBilevel.random(n=5, m=3, seed=3, cond=8.0)
    loss = None if quadratic else (lambda th, ph: q.lower_loss(th, ph) + 0.1 * (th**3).sum())
    fwd = _three_windows(Forward(), optimizer, loss)
    rev = _three_windows(Reverse(), optimizer, loss)
    assert len(fwd) == len(rev) == 3
    for a, b in zip(fwd, rev):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
