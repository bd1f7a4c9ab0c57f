"""Linear solvers (cg, neumann, fixed_point) against torch.linalg.solve and closed forms."""

from __future__ import annotations

import functools

import pytest
import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.linalg import SolverInfo, cg, fixed_point, neumann
from mlopt.linalg.vec import add, all_finite, dot, flatten, norm, scale, sub, unflatten, zeros_like

F64 = torch.float64
SHAPES = [(3,), (2, 2), ()]  # a vector spread over tensors of several shapes: n = 8
N = 8


def spd(eigenvalues, seed=0):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=F64)
    )
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=F64)) @ q.T


def like():
    return tuple(torch.zeros(s, dtype=F64) for s in SHAPES)


def to_vec(flat):
    return unflatten(flat, like())


def op(matrix):
    """matvec on tuples of tensors for a matrix acting on the flattened vector."""
    return lambda v: to_vec(matrix @ flatten(v))


def rhs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return to_vec(torch.randn(N, generator=gen, dtype=F64))


EIGS = torch.linspace(0.5, 5.0, N, dtype=F64)


# --- vec helpers --------------------------------------------------------------------------------
def test_vec_helpers():
    a = to_vec(torch.arange(1.0, 9.0, dtype=F64))
    b = to_vec(torch.ones(N, dtype=F64))
    assert float(dot(a, b)) == 36.0
    assert torch.allclose(norm(a), torch.linalg.norm(torch.arange(1.0, 9.0, dtype=F64)))
    assert torch.equal(flatten(add(a, b, alpha=2.0)), torch.arange(1.0, 9.0, dtype=F64) + 2)
    assert torch.equal(flatten(sub(a, b)), torch.arange(0.0, 8.0, dtype=F64))
    assert torch.equal(flatten(scale(a, -1.0)), -torch.arange(1.0, 9.0, dtype=F64))
    assert [t.shape for t in zeros_like(a)] == [torch.Size(s) for s in SHAPES]
    assert all_finite(a)
    assert not all_finite((torch.tensor([1.0, float("inf")]),))
    with pytest.raises(HypergradientError):
        unflatten(torch.zeros(3), like())


# --- conjugate gradient ------------------------------------------------------------------------
def test_cg_matches_solve_on_tuple_vectors():
    a = spd(EIGS)
    b = rhs()
    x, info = cg(op(a), b, iterations=N + 2, tol=1e-13, return_info=True)
    exact = torch.linalg.solve(a, flatten(b))
    assert [t.shape for t in x] == [torch.Size(s) for s in SHAPES]
    assert torch.allclose(flatten(x), exact, rtol=0, atol=1e-11)
    assert isinstance(info, SolverInfo) and info.solver == "cg" and info.converged
    assert info.iterations <= N + 1  # n steps suffice in exact arithmetic
    assert info.residual <= 1e-13 * float(norm(b))
    assert not info.negative_curvature


def test_cg_error_decreases_every_iteration():
    # Hestenes-Stiefel: the Euclidean error of CG decreases monotonically on SPD systems.
    a, b = spd(EIGS), rhs()
    exact = torch.linalg.solve(a, flatten(b))
    errors = [
        float(torch.linalg.norm(flatten(cg(op(a), b, iterations=k, tol=0.0)) - exact))
        for k in range(N + 1)
    ]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-10


def test_cg_damped_singular_system():
    eigs = torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    a, b = spd(eigs, seed=3), rhs()
    x = cg(op(a), b, iterations=3 * N, tol=1e-14, damping=0.1)
    exact = torch.linalg.solve(a + 0.1 * torch.eye(N, dtype=F64), flatten(b))
    assert torch.allclose(flatten(x), exact, rtol=0, atol=1e-10)


def test_cg_warm_start_and_zero_rhs():
    a, b = spd(EIGS), rhs()
    exact = to_vec(torch.linalg.solve(a, flatten(b)))
    x, info = cg(op(a), b, x0=exact, iterations=5, tol=1e-10, return_info=True)
    assert info.converged and info.iterations == 1  # only the product A x0
    assert torch.allclose(flatten(x), flatten(exact))
    zero = zeros_like(b)
    x = cg(op(a), zero, iterations=5)
    assert all_finite(x) and float(norm(x)) == 0.0


def test_cg_breakdown_and_nan_raise():
    b = rhs()
    with pytest.raises(HypergradientError, match="cg broke down.*damping"):
        cg(lambda v: zeros_like(v), b, iterations=3)
    with pytest.raises(HypergradientError, match="cg: the iterate became non-finite.*iteration 1"):
        cg(lambda v: tuple(t * float("nan") for t in v), b, iterations=3)
    with pytest.raises(HypergradientError, match="initial residual"):
        cg(lambda v: v, (torch.tensor([float("nan")]),), iterations=3)


def test_cg_reports_negative_curvature():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    b = (torch.ones(3, dtype=F64),)
    x, info = cg(lambda v: (a @ v[0],), b, iterations=3, tol=1e-12, return_info=True)
    assert info.negative_curvature
    assert torch.allclose(x[0], torch.linalg.solve(a, b[0]))  # still solves this small system


def test_cg_divergence_raises():
    # An indefinite operator whose CG residual explodes: nearly-zero curvature along p.
    a = torch.tensor([[1e-9, 1.0], [1.0, 1e-9]], dtype=F64)
    b = (torch.tensor([1.0, 1e-9], dtype=F64),)
    with pytest.raises(HypergradientError, match="cg diverged at iteration 1.*damping"):
        cg(lambda v: (a @ v[0],), b, iterations=5)


def test_cg_without_checks_runs_under_vmap():
    a = spd(torch.linspace(1.0, 3.0, 4, dtype=F64))
    bs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)

    def solve_one(b):
        return cg(lambda v: (a @ v[0],), (b,), iterations=4, check=False)[0]

    xs = torch.func.vmap(solve_one)(bs)
    assert torch.allclose(xs, torch.linalg.solve(a, bs.T).T, atol=1e-10)


def test_cg_is_differentiable_through_iterations():
    def solve(m, b):
        a = m @ m.T + torch.eye(4, dtype=F64)
        return cg(lambda v: (a @ v[0],), (b,), iterations=4, tol=0.0)[0]

    gen = torch.Generator().manual_seed(2)
    m = torch.randn(4, 4, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (m, b))
    # and the derivative is that of the exact solve (CG is exact after n steps)
    jac = torch.autograd.functional.jacobian(solve, (m, b))
    ref = torch.autograd.functional.jacobian(
        lambda m, b: torch.linalg.solve(m @ m.T + torch.eye(4, dtype=F64), b), (m, b)
    )
    for j, r in zip(jac, ref, strict=True):
        assert torch.allclose(j, r, atol=1e-8)


# --- Neumann series ----------------------------------------------------------------------------
def test_neumann_matches_solve():
    a, b = spd(torch.linspace(1.0, 4.0, N, dtype=F64)), rhs()
    x = neumann(op(a), b, iterations=300, alpha=0.25)  # contraction factor 0.75
    assert torch.allclose(flatten(x), torch.linalg.solve(a, flatten(b)), rtol=0, atol=1e-10)


def test_neumann_is_the_truncated_series():
    a, b = spd(EIGS), rhs()
    alpha, bf = 0.3, flatten(rhs())
    j = torch.eye(N, dtype=F64) - alpha * a
    expected = alpha * (bf + j @ bf + j @ j @ bf)
    assert torch.allclose(flatten(neumann(op(a), b, iterations=2, alpha=alpha)), expected)


def test_neumann_error_falls_monotonically():
    a, b = spd(EIGS), rhs()
    exact = torch.linalg.solve(a, flatten(b))
    alpha = 1.9 / float(EIGS.max())  # < 2 / lambda_max
    errors = [
        float(torch.linalg.norm(flatten(neumann(op(a), b, iterations=k, alpha=alpha)) - exact))
        for k in range(40)
    ]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:], strict=False))


def test_neumann_divergence_raises_with_advice():
    a, b = spd(EIGS), rhs()
    alpha = 2.5 / float(EIGS.max())  # |1 - alpha lambda_max| = 1.5 > 1
    with pytest.raises(HypergradientError) as err:
        neumann(op(a), b, iterations=200, alpha=alpha)
    message = str(err.value)
    assert "neumann diverged at iteration" in message
    assert "smaller alpha" in message and "2 / lambda_max" in message
    iteration = int(message.split("at iteration ")[1].split(":")[0])
    assert 30 <= iteration <= 40  # 1.5^k first exceeds 1e6 around k = 34


def test_neumann_info_and_options():
    a, b = spd(EIGS), rhs()
    x, info = neumann(op(a), b, iterations=50, alpha=0.2, return_info=True)
    residual = torch.linalg.norm(flatten(b) - a @ flatten(x))
    assert info.iterations == 50 and abs(info.residual - float(residual)) < 1e-14
    with pytest.raises(ConfigError, match="alpha"):
        neumann(op(a), b, alpha=0.0)
    with pytest.raises(ConfigError, match="iterations"):
        neumann(op(a), b, iterations=-1)


def test_neumann_is_differentiable():
    def solve(m, b):
        a = m @ m.T / 4 + torch.eye(3, dtype=F64)
        return neumann(lambda v: (a @ v[0],), (b,), iterations=5, alpha=0.3)[0]

    gen = torch.Generator().manual_seed(4)
    m = torch.randn(3, 3, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (m, b))


# --- fixed point -------------------------------------------------------------------------------
def test_fixed_point_solves_gradient_descent_system():
    # J = I - lr A: the fixed point of x = J x + b is (lr A)^{-1} b
    a, b = spd(torch.linspace(1.0, 4.0, N, dtype=F64)), rhs()
    lr = 0.25
    j = torch.eye(N, dtype=F64) - lr * a
    x, info = fixed_point(op(j), b, iterations=500, tol=1e-13, return_info=True)
    exact = torch.linalg.solve(lr * a, flatten(b))
    assert torch.allclose(flatten(x), exact, rtol=0, atol=1e-10)
    assert info.converged and info.iterations < 500


def test_fixed_point_equals_neumann_partial_sums():
    a, b = spd(EIGS), rhs()
    lr = 0.15
    j = torch.eye(N, dtype=F64) - lr * a
    for k in (0, 1, 5, 12):
        fp = fixed_point(op(j), b, iterations=k, tol=0.0)
        ne = neumann(op(a), b, iterations=k, alpha=lr)
        assert torch.allclose(flatten(fp), flatten(ne) / lr, atol=1e-12)


def test_fixed_point_warm_start():
    j = 0.5 * torch.eye(N, dtype=F64)
    b = rhs()
    exact = to_vec(2.0 * flatten(b))
    x, info = fixed_point(op(j), b, x0=exact, iterations=10, return_info=True)
    assert info.converged and info.iterations == 1
    assert torch.allclose(flatten(x), flatten(exact))


def test_fixed_point_divergence_and_nan():
    b = rhs()
    with pytest.raises(HypergradientError, match="fixed_point diverged.*learning rate"):
        fixed_point(op(2.0 * torch.eye(N, dtype=F64)), b, iterations=100)
    with pytest.raises(HypergradientError, match="non-finite"):
        fixed_point(lambda v: tuple(t * float("inf") for t in v), b, iterations=3)
    with pytest.raises(ConfigError, match="tol"):
        fixed_point(op(torch.eye(N, dtype=F64)), b, tol=-1.0)


def test_solvers_share_the_solve_contract():
    a, b = spd(EIGS), rhs()
    exact = torch.linalg.solve(a, flatten(b))
    lr = 1.0 / float(EIGS.max())
    solvers = [
        functools.partial(cg, iterations=20, tol=1e-12),
        functools.partial(neumann, iterations=600, alpha=lr),
        lambda mv, rhs_: scale(
            fixed_point(lambda v: sub(v, scale(mv(v), lr)), rhs_, iterations=600, tol=1e-14), lr
        ),
    ]
    for solve in solvers:
        assert torch.allclose(flatten(solve(op(a), b)), exact, rtol=0, atol=1e-9)
