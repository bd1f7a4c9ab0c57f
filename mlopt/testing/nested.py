"""A three-level nested quadratic program with a closed-form top-level hypergradient.

Levels (``w ∈ R^p`` low, ``θ ∈ R^q`` mid, ``φ ∈ R^r`` top)::

    low(w; θ)     = ½ wᵀ A w - wᵀ (B θ + a)                               A ≻ 0
    mid(θ; w, φ)  = ½ θᵀ C θ - θᵀ (D φ + c) + ½ ||E w - e||²               C ≻ 0
    top(φ; θ)     = ½ ||G θ - g||² + ½ ρ ||φ||²

Each level is solved exactly given the level above it:

* ``w*(θ) = A^{-1}(B θ + a) = P θ + w₀`` with ``P = A^{-1} B`` and ``w₀ = A^{-1} a``.
* The mid level minimises ``M(θ, φ) = mid(θ; w*(θ), φ)``. Its total gradient (what the mid
  level's hypergradient through the low level must produce) is
  ``∇_θ M = C θ - D φ - c + Pᵀ Eᵀ (E w*(θ) - e)``, where ``Pᵀ Eᵀ(E w* - e) = (dw*/dθ)ᵀ ∇_w mid``.
  ``M`` is quadratic in ``θ`` with Hessian ``S = C + Pᵀ Eᵀ E P ≻ 0``, so
  ``θ*(φ) = S^{-1} (D φ + c - Pᵀ Eᵀ (E w₀ - e))`` and ``dθ*/dφ = S^{-1} D``.
* The top level's total hypergradient, through both solution maps, is therefore::

      dL_top/dφ = Dᵀ S^{-1} Gᵀ (G θ*(φ) - g) + ρ φ

  (the chain rule through ``θ*(φ)``; ``w*`` enters through ``S`` and the constant term, i.e.
  through the mid level's own hypergradient).

:func:`fd_hypergradient` is a central-difference gradient of any scalar function of a tensor, for
checking such formulas.

Example:
    >>> prog = NestedQuadratic.random(seed=0)
    >>> phi = torch.zeros(prog.r, dtype=torch.float64)
    >>> theta = prog.mid_solution(phi)
    >>> float(prog.mid_total_gradient(theta, phi).abs().max()) < 1e-10
    True
    >>> fd = fd_hypergradient(lambda x: prog.top_loss(x, prog.mid_solution(x)), phi)
    >>> bool(torch.allclose(fd, prog.top_hypergradient(phi), atol=1e-7))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlopt.errors import ConfigError

__all__ = ["NestedQuadratic", "fd_hypergradient"]

_F64 = torch.float64


def fd_hypergradient(
    fn: Callable[[torch.Tensor], torch.Tensor | float], x: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Central-difference gradient ``(fn(x + eps e_i) - fn(x - eps e_i)) / (2 eps)`` in float64.

    Args:
        fn: any scalar function of a tensor (returning a number or a one-element tensor).
        x: where to differentiate (any shape; converted to float64, not modified).
        eps: the step; the error is ``O(eps²)`` plus rounding ``O(1e-16 / eps)``.

    Returns:
        A float64 tensor of the shape of ``x``.

    Example:
        >>> fd_hypergradient(lambda t: (t**3).sum(), torch.tensor([1.0, 2.0]))
        tensor([ 3.0000, 12.0000], dtype=torch.float64)
    """
    if not eps > 0:
        raise ConfigError(f"fd_hypergradient: eps must be > 0, got {eps!r}")
    base = x.detach().to(_F64).clone()
    out = torch.zeros_like(base).reshape(-1)
    with torch.no_grad():
        for i in range(base.numel()):
            plus, minus = base.clone().reshape(-1), base.clone().reshape(-1)
            plus[i] += eps
            minus[i] -= eps
            f_plus = float(fn(plus.reshape(base.shape)))
            f_minus = float(fn(minus.reshape(base.shape)))
            out[i] = (f_plus - f_minus) / (2 * eps)
    return out.reshape(base.shape)


def _spd(n: int, gen: torch.Generator, low: float = 1.0) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=_F64)
    return m @ m.T / n + low * torch.eye(n, dtype=_F64)


@dataclass
class NestedQuadratic:
    """Three nested quadratic levels with exact solutions and hypergradients (see module doc).

    Attributes:
        A, B, a: low level (``A`` SPD ``p x p``, ``B`` ``p x q``, ``a`` ``p``).
        C, D, c, E, e: mid level (``C`` SPD ``q x q``, ``D`` ``q x r``, ``E`` ``s x p``).
        G, g, rho: top level (``G`` ``t x q``, ``rho >= 0``).
    """

    A: torch.Tensor
    B: torch.Tensor
    a: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    c: torch.Tensor
    E: torch.Tensor
    e: torch.Tensor
    G: torch.Tensor
    g: torch.Tensor
    rho: float = 0.0

    @classmethod
    def random(
        cls,
        p: int = 4,
        q: int = 3,
        r: int = 2,
        s: int = 5,
        t: int = 3,
        seed: int = 0,
        rho: float = 0.1,
    ) -> NestedQuadratic:
        """A random well-conditioned instance in float64.

        Example:
            >>> NestedQuadratic.random(p=2, q=2, r=1).D.shape
            torch.Size([2, 1])
        """
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, dtype=_F64)

        return cls(
            A=_spd(p, gen), B=randn(p, q), a=randn(p),
            C=_spd(q, gen), D=randn(q, r), c=randn(q), E=randn(s, p) / s**0.5, e=randn(s),
            G=randn(t, q), g=randn(t), rho=rho,
        )  # fmt: skip

    @property
    def p(self) -> int:
        """Size of the low level's ``w``."""
        return self.A.shape[0]

    @property
    def q(self) -> int:
        """Size of the mid level's ``θ``."""
        return self.C.shape[0]

    @property
    def r(self) -> int:
        """Size of the top level's ``φ``."""
        return self.D.shape[1]

    # losses -----------------------------------------------------------------------------------
    def low_loss(self, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``½ wᵀ A w - wᵀ (B θ + a)``."""
        return 0.5 * w @ self.A @ w - w @ (self.B @ theta + self.a)

    def mid_loss(self, theta: torch.Tensor, w: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``½ θᵀ C θ - θᵀ (D φ + c) + ½ ||E w - e||²``."""
        res = self.E @ w - self.e
        return 0.5 * theta @ self.C @ theta - theta @ (self.D @ phi + self.c) + 0.5 * res @ res

    def top_loss(self, phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``½ ||G θ - g||² + ½ ρ ||φ||²``."""
        res = self.G @ theta - self.g
        return 0.5 * res @ res + 0.5 * self.rho * phi @ phi

    # solution maps ----------------------------------------------------------------------------
    def low_solution(self, theta: torch.Tensor) -> torch.Tensor:
        """``w*(θ) = A^{-1} (B θ + a)``."""
        return torch.linalg.solve(self.A, self.B @ theta + self.a)

    def _p_matrix(self) -> torch.Tensor:
        return torch.linalg.solve(self.A, self.B)

    def mid_hessian(self) -> torch.Tensor:
        """``S = C + Pᵀ Eᵀ E P``, the Hessian of ``M(θ) = mid(θ; w*(θ), φ)``."""
        ep = self.E @ self._p_matrix()
        return self.C + ep.T @ ep

    def mid_total_gradient(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``∇_θ mid(θ; w*(θ), φ) = C θ - D φ - c + Pᵀ Eᵀ (E w*(θ) - e)`` (through ``w*``)."""
        res = self.E @ self.low_solution(theta) - self.e
        return self.C @ theta - self.D @ phi - self.c + self._p_matrix().T @ (self.E.T @ res)

    def mid_solution(self, phi: torch.Tensor) -> torch.Tensor:
        """``θ*(φ) = S^{-1} (D φ + c - Pᵀ Eᵀ (E w₀ - e))``, ``w₀ = A^{-1} a``."""
        w0 = torch.linalg.solve(self.A, self.a)
        rhs = self.D @ phi + self.c - self._p_matrix().T @ (self.E.T @ (self.E @ w0 - self.e))
        return torch.linalg.solve(self.mid_hessian(), rhs)

    def top_hypergradient(self, phi: torch.Tensor) -> torch.Tensor:
        """Exact ``dL_top(φ, θ*(φ))/dφ = Dᵀ S^{-1} Gᵀ (G θ*(φ) - g) + ρ φ``."""
        theta = self.mid_solution(phi)
        back = torch.linalg.solve(self.mid_hessian(), self.G.T @ (self.G @ theta - self.g))
        return self.D.T @ back + self.rho * phi
