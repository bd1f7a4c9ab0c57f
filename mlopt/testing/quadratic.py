"""A quadratic bilevel problem whose unrolled and implicit hypergradients are known in closed form.

Lower: ``f(θ, φ) = ½ θᵀAθ - θᵀ(Bφ + c)``, A symmetric positive definite,
solution ``θ* = A⁻¹(Bφ+c)``.
Upper: ``F(θ, φ) = ½‖Cθ - t‖² + ½ρ‖φ‖²``.

Gradient descent with learning rate η (and optional heavy-ball momentum μ, torch's SGD convention
``b ← μb + g``, ``θ ← θ - ηb``) is linear in ``(θ, b, φ)``, so the Jacobian ``dθ_T/dφ`` of the
T-step unroll follows from a matrix recurrence, with no autograd involved. These are the references
that the tests compare every hypergradient method against, in float64.

Example:
    >>> q = QuadraticBilevel.random(n=3, m=2, seed=0)
    >>> phi = torch.zeros(2, dtype=torch.float64)
    >>> theta0 = torch.zeros(3, dtype=torch.float64)
    >>> g_unrolled = q.unrolled_hypergradient(phi, theta0, lr=0.1, steps=500)
    >>> bool(torch.allclose(g_unrolled, q.implicit_hypergradient(phi), atol=1e-8))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuadraticBilevel", "capture_gradients"]

_F64 = torch.float64


@dataclass
class QuadraticBilevel:
    """Matrices of the quadratic bilevel problem (float64)."""

    A: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor
    C: torch.Tensor
    t: torch.Tensor
    rho: float = 0.0

    @classmethod
    def random(
        cls, n: int = 4, m: int = 3, seed: int = 0, rho: float = 0.1, cond: float = 10.0
    ) -> QuadraticBilevel:
        """A random instance with eigenvalues of A spread over ``[1, cond]``."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=_F64))
        eig = torch.linspace(1.0, cond, n, dtype=_F64)
        A = q @ torch.diag(eig) @ q.T
        return cls(
            A=(A + A.T) / 2,
            B=torch.randn(n, m, generator=g, dtype=_F64),
            c=torch.randn(n, generator=g, dtype=_F64),
            C=torch.randn(n, n, generator=g, dtype=_F64) / n**0.5,
            t=torch.randn(n, generator=g, dtype=_F64),
            rho=rho,
        )

    @property
    def n(self) -> int:
        return self.A.shape[0]

    def lower_loss(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``f(θ, φ)``."""
        return 0.5 * theta @ self.A @ theta - theta @ (self.B @ phi + self.c)

    def upper_loss(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``F(θ, φ)``."""
        r = self.C @ theta - self.t
        return 0.5 * r @ r + 0.5 * self.rho * phi @ phi

    def solution(self, phi: torch.Tensor) -> torch.Tensor:
        """``θ*(φ) = A⁻¹(Bφ + c)``."""
        return torch.linalg.solve(self.A, self.B @ phi + self.c)

    def implicit_hypergradient(self, phi: torch.Tensor) -> torch.Tensor:
        """``dF(θ*(φ), φ)/dφ = Bᵀ A⁻¹ Cᵀ(Cθ* - t) + ρφ`` (implicit function theorem)."""
        theta = self.solution(phi)
        v = self.C.T @ (self.C @ theta - self.t)
        return self.B.T @ torch.linalg.solve(self.A, v) + self.rho * phi

    def unroll(
        self, phi: torch.Tensor, theta0: torch.Tensor, lr: float, steps: int, momentum: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(θ_T, dθ_T/dφ, dθ_T/dθ_0)`` of ``steps`` GD(+momentum) updates, by recurrence."""
        n, m = self.B.shape
        eye = torch.eye(n, dtype=_F64)
        theta, buf = theta0.clone(), torch.zeros(n, dtype=_F64)
        j_theta, j_buf = torch.zeros(n, m, dtype=_F64), torch.zeros(n, m, dtype=_F64)
        k_theta, k_buf = eye.clone(), torch.zeros(n, n, dtype=_F64)
        for _ in range(steps):
            g = self.A @ theta - self.B @ phi - self.c
            dg_phi = self.A @ j_theta - self.B
            dg_init = self.A @ k_theta
            buf = momentum * buf + g
            j_buf = momentum * j_buf + dg_phi
            k_buf = momentum * k_buf + dg_init
            theta = theta - lr * buf
            j_theta = j_theta - lr * j_buf
            k_theta = k_theta - lr * k_buf
        return theta, j_theta, k_theta

    def unrolled_hypergradient(
        self,
        phi: torch.Tensor,
        theta0: torch.Tensor,
        lr: float,
        steps: int,
        momentum: float = 0.0,
        init_from_phi: bool = False,
    ) -> torch.Tensor:
        """Exact ``dF(θ_T(φ), φ)/dφ`` of the unrolled dynamics.

        With ``init_from_phi`` the unroll starts at ``θ_0 = φ`` (meta-initialization; needs
        ``m == n``) and ``theta0`` is ignored.
        """
        start = phi if init_from_phi else theta0
        theta, j_phi, j_init = self.unroll(phi, start, lr, steps, momentum)
        jac = j_phi + (j_init if init_from_phi else 0.0)
        v = self.C.T @ (self.C @ theta - self.t)
        return jac.T @ v + self.rho * phi


def capture_gradients(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Record the ``.grad`` of every parameter each time ``optimizer.step()`` runs.

    Returns the (growing) list; entry ``k`` holds copies of the gradients seen by step ``k``, in
    param-group order. Useful to check the hypergradient an Engine hands to an upper optimizer.
    """
    seen: list[list[torch.Tensor]] = []

    def hook(opt, args, kwargs):
        seen.append(
            [
                (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for g in opt.param_groups
                for p in g["params"]
            ]
        )

    optimizer.register_step_pre_hook(hook)
    return seen
