"""Reverse-mode hypergradients through the Engine equal the closed form of the unrolled dynamics."""

import pytest
import torch
from helpers import F64, quadratic_program

from mlopt.hypergrad import Reverse, reverse_vjp, unroll
from mlopt.testing import QuadraticBilevel


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_reverse_matches_unrolled_closed_form(steps, momentum):
    q = QuadraticBilevel.random(n=4, m=3, seed=1)
    phi0 = torch.randn(3, dtype=F64)
    theta0 = torch.randn(4, dtype=F64)
    engine, upper, lower, grads = quadratic_program(
        q, phi0, theta0, steps=steps, lr=0.05, momentum=momentum
    )
    engine.run()
    expected = q.unrolled_hypergradient(phi0, theta0, lr=0.05, steps=steps, momentum=momentum)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0][0], expected, rtol=0, atol=1e-10)


def test_reverse_with_meta_initialization_matches_closed_form():
    q = QuadraticBilevel.random(n=3, m=3, seed=2)
    phi0 = torch.randn(3, dtype=F64)
    engine, *_, grads = quadratic_program(q, phi0, None, steps=4, lr=0.1, init=True)
    engine.run()
    expected = q.unrolled_hypergradient(phi0, None, lr=0.1, steps=4, init_from_phi=True)
    torch.testing.assert_close(grads[0][0], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("truncate", [1, 2, 5])
def test_truncated_reverse_drops_early_steps(truncate):
    q = QuadraticBilevel.random(n=4, m=2, seed=3)
    phi0, theta0 = torch.randn(2, dtype=F64), torch.randn(4, dtype=F64)
    steps, lr = 5, 0.1
    engine, *_, grads = quadratic_program(
        q, phi0, theta0, steps=steps, lr=lr, method=Reverse(truncate=truncate)
    )
    engine.run()
    # closed form: the first (steps - K) updates are constants; differentiate the last K only
    theta_cut, _, _ = q.unroll(phi0, theta0, lr, steps - truncate)
    expected = q.unrolled_hypergradient(phi0, theta_cut, lr=lr, steps=truncate)
    torch.testing.assert_close(grads[0][0], expected, rtol=0, atol=1e-10)


def test_reverse_pure_functions_on_tensors():
    q = QuadraticBilevel.random(n=3, m=2, seed=4)
    phi = torch.randn(2, dtype=F64, requires_grad=True)
    theta0 = torch.randn(3, dtype=F64)

    def step(params):
        (theta,) = params
        g = q.A @ theta - q.B @ phi - q.c
        return (theta - 0.1 * g,)

    (theta_T,) = unroll(step, (theta0,), steps=6)
    v = q.C.T @ (q.C @ theta_T.detach() - q.t)
    (hg,) = reverse_vjp((theta_T,), (phi,), (v,))
    expected = q.unrolled_hypergradient(phi.detach(), theta0, 0.1, 6) - q.rho * phi.detach()
    torch.testing.assert_close(hg, expected, rtol=0, atol=1e-12)
