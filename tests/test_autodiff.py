"""Gradients, Hessian-vector and mixed products against explicit Hessians/Jacobians."""

from __future__ import annotations

import pytest
import torch

from mlopt.autodiff import finite_difference_mixed_vjp, grad, hvp, mixed_vjp, vjp
from mlopt.errors import HypergradientError
from mlopt.linalg.vec import flatten, unflatten

F64 = torch.float64
GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN, dtype=F64)


# f(θ, φ) with θ = (a (3,), B (2, 2)) and φ = (c (3,), d ()), nonlinear in both.
def loss(theta, phi):
    a, b = theta
    c, d = phi
    return (torch.exp(c) * a**2).sum() / 2 + d * torch.tanh(b).sum() + (a.sum() * b**2).sum() * d


def flat_loss(t_flat, p_flat, theta_like, phi_like):
    return loss(unflatten(t_flat, theta_like), unflatten(p_flat, phi_like))


@pytest.fixture
def point():
    theta = (randn(3).requires_grad_(), randn(2, 2).requires_grad_())
    phi = (randn(3).requires_grad_(), randn(()).requires_grad_())
    return theta, phi


def test_grad_zeros_for_unused_and_constant_tensors():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    unused = torch.zeros(3, dtype=F64, requires_grad=True)
    constant = torch.ones(2, dtype=F64)  # does not require grad
    g = grad((x**2).sum(), (x, unused, constant))
    assert torch.equal(g[0], 2 * x.detach())
    assert torch.equal(g[1], torch.zeros(3, dtype=F64)) and torch.equal(g[2], torch.zeros(2))
    with pytest.raises(HypergradientError, match="allow_unused"):
        grad((x**2).sum(), (x, unused), allow_unused=False)
    with pytest.raises(HypergradientError, match="scalar"):
        grad(x**2, (x,))
    # a loss with no graph at all: zeros
    assert torch.equal(grad(torch.tensor(1.0), (x,))[0], torch.zeros(2, dtype=F64))


def test_hvp_matches_explicit_hessian_and_is_repeatable(point):
    theta, phi = point
    like_t, like_p = tuple(t.detach() for t in theta), tuple(p.detach() for p in phi)
    grads = grad(loss(theta, phi), theta, create_graph=True)
    hess = torch.autograd.functional.hessian(
        lambda t: flat_loss(t, flatten(like_p), like_t, like_p), flatten(like_t)
    )
    for seed in range(3):  # the graph is retained between products
        v = unflatten(
            torch.randn(7, generator=torch.Generator().manual_seed(seed), dtype=F64), like_t
        )
        hv = hvp(grads, theta, v)
        assert [t.shape for t in hv] == [t.shape for t in like_t]
        assert torch.allclose(flatten(hv), hess @ flatten(v), atol=1e-12)
        assert not any(t.requires_grad for t in hv)


def test_hvp_create_graph_gives_third_derivatives():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=F64, requires_grad=True)
    v, u = torch.tensor([1.0, 2.0, 3.0], dtype=F64), torch.tensor([0.3, 0.2, 0.1], dtype=F64)
    g = grad((x**4).sum(), (x,), create_graph=True)
    (hv,) = hvp(g, (x,), (v,), create_graph=True)  # 12 x² v
    assert torch.allclose(hv, 12 * x.detach() ** 2 * v)
    (third,) = torch.autograd.grad((hv * u).sum(), x)
    assert torch.allclose(third, 24 * x.detach() * v * u)


def test_mixed_vjp_matches_explicit_jacobian(point):
    theta, phi = point
    like_t, like_p = tuple(t.detach() for t in theta), tuple(p.detach() for p in phi)
    unused = torch.ones(4, dtype=F64, requires_grad=True)
    grads = grad(loss(theta, phi), theta, create_graph=True)
    w = unflatten(randn(7), like_t)
    out = mixed_vjp(grads, (*phi, unused), w)
    assert torch.equal(out[2], torch.zeros(4, dtype=F64))

    def grad_theta(p_flat):  # ∇_θ f as a function of φ
        t = flatten(like_t).requires_grad_()
        (g,) = torch.autograd.grad(flat_loss(t, p_flat, like_t, like_p), t, create_graph=True)
        return g

    jac = torch.autograd.functional.jacobian(grad_theta, flatten(like_p))  # (7, 4)
    assert torch.allclose(flatten(out[:2]), jac.T @ flatten(w), atol=1e-12)


def test_vjp_of_constant_outputs_is_zero():
    x = torch.ones(2, dtype=F64, requires_grad=True)
    out = vjp((torch.ones(2, dtype=F64),), (x,), (torch.ones(2, dtype=F64),))
    assert torch.equal(out[0], torch.zeros(2, dtype=F64))
    with pytest.raises(HypergradientError, match="shape"):
        vjp((x * 2,), (x,), (torch.ones(3, dtype=F64),))


def test_finite_difference_mixed_vjp_is_second_order_accurate(point):
    theta, phi = point
    like_t = tuple(t.detach() for t in theta)
    v = unflatten(randn(7), like_t)
    grads = grad(loss(theta, phi), theta, create_graph=True)
    exact = flatten(mixed_vjp(grads, phi, v))

    def loss_fn(t):
        return loss(t, phi)

    errors = []
    for epsilon in (1e-1, 1e-2, 1e-3):
        fd = flatten(finite_difference_mixed_vjp(loss_fn, like_t, phi, v, epsilon))
        errors.append(float(torch.linalg.norm(fd - exact)))
    # O(ε²): each 10x smaller step cuts the error by about 100x
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50
    assert errors[2] < 1e-5 * float(torch.linalg.norm(exact))


def test_finite_difference_mixed_vjp_exact_when_bilinear_and_zero_direction():
    phi = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    m = randn(3, 4)

    def loss_fn(t):  # ∇_φ f = M θ + φ θ-independent part: (∂²f/∂φ∂θ) v = M v
        return phi @ (m @ t[0]) + (t[0] ** 2).sum() + (phi**3).sum()

    theta = (randn(4),)
    v = (randn(4),)
    fd = finite_difference_mixed_vjp(loss_fn, theta, (phi,), v, 0.5)
    assert torch.allclose(fd[0], m @ v[0], atol=1e-12)
    zero = finite_difference_mixed_vjp(loss_fn, theta, (phi,), (torch.zeros(4, dtype=F64),), 0.01)
    assert torch.equal(zero[0], torch.zeros(3, dtype=F64))
    with pytest.raises(HypergradientError, match="epsilon"):
        finite_difference_mixed_vjp(loss_fn, theta, (phi,), v, 0.0)
