"""Ridge regression with per-feature log weight decays: a bilevel problem with exact hypergradient.

Lower (training) loss, with ``λ ∈ R^d`` (or one shared ``λ``)::

    f(w, λ) = ½ ||X_tr w - y_tr||² / n_tr + ½ Σ_j exp(λ_j) w_j²

Upper (validation) loss: ``F(w) = ½ ||X_val w - y_val||² / n_val``.

The lower problem is strongly convex with Hessian ``H(λ) = X_trᵀ X_tr / n_tr + diag(exp λ)``
(independent of ``w``), so ``w*(λ) = H^{-1} X_trᵀ y_tr / n_tr``. Since
``∂(∇_w f)/∂λ_j = exp(λ_j) w_j e_j``, the implicit function theorem gives the exact
hypergradient (Pedregosa 2016; Bengio 2000, "Gradient-Based Optimization of Hyperparameters")::

    dF(w*(λ))/dλ = -exp(λ) ⊙ w* ⊙ z,   z = H^{-1} ∇F(w*),   ∇F(w) = X_valᵀ (X_val w - y_val) / n_val

(summed over features for a shared scalar ``λ``). Everything is float64 and differentiable in
``λ`` with torch.

Example:
    >>> problem = RidgeHPO.random(n_train=30, n_val=20, d=4, seed=0)
    >>> lam = torch.zeros(4, dtype=torch.float64)
    >>> w = problem.solution(lam)
    >>> float(problem.lower_grad(w, lam).abs().max()) < 1e-12
    True
    >>> problem.hypergradient(lam).shape
    torch.Size([4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlopt.errors import ConfigError

__all__ = ["RidgeHPO"]

_F64 = torch.float64


def _as_f64(name: str, value: object, dims: int) -> torch.Tensor:
    t = torch.as_tensor(value).to(_F64)
    if t.dim() != dims:
        raise ConfigError(f"RidgeHPO: {name} must have {dims} dimension(s), got shape {t.shape}")
    return t


@dataclass
class RidgeHPO:
    """Ridge regression hyperparameter optimization with closed-form solution and hypergradient.

    Attributes:
        X_train: ``(n_train, d)`` training inputs.
        y_train: ``(n_train,)`` training targets.
        X_val: ``(n_val, d)`` validation inputs.
        y_val: ``(n_val,)`` validation targets.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor

    def __post_init__(self) -> None:
        self.X_train = _as_f64("X_train", self.X_train, 2)
        self.y_train = _as_f64("y_train", self.y_train, 1)
        self.X_val = _as_f64("X_val", self.X_val, 2)
        self.y_val = _as_f64("y_val", self.y_val, 1)
        n, d = self.X_train.shape
        if self.y_train.shape[0] != n or self.X_val.shape[1] != d:
            raise ConfigError(
                f"RidgeHPO: inconsistent shapes X_train {tuple(self.X_train.shape)}, y_train "
                f"{tuple(self.y_train.shape)}, X_val {tuple(self.X_val.shape)}"
            )
        if self.y_val.shape[0] != self.X_val.shape[0]:
            raise ConfigError(
                f"RidgeHPO: y_val has {self.y_val.shape[0]} rows, X_val {self.X_val.shape[0]}"
            )

    @classmethod
    def from_arrays(cls, X_train, y_train, X_val, y_val) -> RidgeHPO:  # noqa: N803
        """Build from tensors or NumPy arrays (converted to float64).

        Example:
            >>> RidgeHPO.from_arrays([[1.0], [2.0]], [1.0, 2.0], [[3.0]], [3.0]).d
            1
        """
        return cls(X_train, y_train, X_val, y_val)

    @classmethod
    def random(
        cls, n_train: int = 40, n_val: int = 30, d: int = 5, seed: int = 0, noise: float = 0.1
    ) -> RidgeHPO:
        """A random instance: Gaussian inputs, a linear teacher, Gaussian label noise.

        Example:
            >>> RidgeHPO.random(10, 8, 3, seed=1).X_val.shape
            torch.Size([8, 3])
        """
        gen = torch.Generator().manual_seed(seed)
        teacher = torch.randn(d, generator=gen, dtype=_F64)
        x_tr = torch.randn(n_train, d, generator=gen, dtype=_F64)
        x_val = torch.randn(n_val, d, generator=gen, dtype=_F64)
        y_tr = x_tr @ teacher + noise * torch.randn(n_train, generator=gen, dtype=_F64)
        y_val = x_val @ teacher + noise * torch.randn(n_val, generator=gen, dtype=_F64)
        return cls(x_tr, y_tr, x_val, y_val)

    @property
    def d(self) -> int:
        """Number of features (size of ``w``)."""
        return self.X_train.shape[1]

    def _decay(self, lam: torch.Tensor) -> torch.Tensor:
        if lam.shape not in ((), (self.d,)):
            raise ConfigError(
                f"RidgeHPO: lam must be a scalar or of shape ({self.d},), got {tuple(lam.shape)}"
            )
        return torch.exp(lam).expand(self.d)

    def lower_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """``f(w, λ) = ½||X_tr w - y_tr||²/n + ½ Σ exp(λ_j) w_j²``."""
        r = self.X_train @ w - self.y_train
        return 0.5 * (r @ r) / self.X_train.shape[0] + 0.5 * (self._decay(lam) * w * w).sum()

    def lower_grad(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """``∇_w f = X_trᵀ (X_tr w - y_tr)/n + exp(λ) ⊙ w``."""
        n = self.X_train.shape[0]
        return self.X_train.T @ (self.X_train @ w - self.y_train) / n + self._decay(lam) * w

    def upper_loss(self, w: torch.Tensor) -> torch.Tensor:
        """``F(w) = ½||X_val w - y_val||²/n_val``."""
        r = self.X_val @ w - self.y_val
        return 0.5 * (r @ r) / self.X_val.shape[0]

    def upper_grad(self, w: torch.Tensor) -> torch.Tensor:
        """``∇F(w) = X_valᵀ (X_val w - y_val)/n_val``."""
        return self.X_val.T @ (self.X_val @ w - self.y_val) / self.X_val.shape[0]

    def hessian(self, lam: torch.Tensor) -> torch.Tensor:
        """``H(λ) = X_trᵀ X_tr / n + diag(exp λ)`` (the lower Hessian, independent of ``w``)."""
        gram = self.X_train.T @ self.X_train / self.X_train.shape[0]
        return gram + torch.diag(self._decay(lam))

    def solution(self, lam: torch.Tensor) -> torch.Tensor:
        """``w*(λ) = H(λ)^{-1} X_trᵀ y_tr / n`` by a linear solve (differentiable in ``λ``)."""
        rhs = self.X_train.T @ self.y_train / self.X_train.shape[0]
        return torch.linalg.solve(self.hessian(lam), rhs)

    def hypergradient(self, lam: torch.Tensor) -> torch.Tensor:
        """Exact ``dF(w*(λ))/dλ = -exp(λ) ⊙ w* ⊙ H^{-1} ∇F(w*)`` (shape of ``lam``)."""
        w = self.solution(lam)
        z = torch.linalg.solve(self.hessian(lam), self.upper_grad(w))
        per_feature = -self._decay(lam) * w * z
        return per_feature if lam.dim() == 1 else per_feature.sum()
