"""First-order rules: drop the second-order term (FOMAML, first-order DARTS) or Reptile.

``FirstOrder`` treats the lower's solution as independent of its uppers, except that a
meta-initialized lower passes its cotangent straight to the initialization (FOMAML, Finn et al.
2017: ``dθ_T/dθ_0 ≈ I``). ``Reptile`` ignores the upper loss and moves the initialization toward
the adapted weights: gradient ``θ_init - θ_adapted`` (Nichol et al. 2018).

Example:
    >>> import torch
    >>> init, adapted = (torch.tensor([1.0]),), (torch.tensor([0.25]),)
    >>> reptile_gradient(init, adapted)
    (tensor([0.7500]),)
"""

from __future__ import annotations

from dataclasses import dataclass

from mlopt.hypergrad.base import LowerContext, Method, Vec, register_method, zeros_for

__all__ = ["FirstOrder", "Reptile", "first_order_vjp", "reptile_gradient"]


def first_order_vjp(uppers: Vec, cotangent: Vec, init: tuple[int, ...] | None) -> Vec:
    """Zero for every upper except the meta-initialization, which receives the cotangent."""
    out = list(zeros_for(uppers))
    if init is not None:
        for i, v in zip(init, cotangent):
            out[i] = out[i] + v
    return tuple(out)


def reptile_gradient(init: Vec, adapted: Vec) -> Vec:
    """Reptile's meta-gradient ``θ_init - θ_adapted``."""
    return tuple(a - b for a, b in zip(init, adapted))


@dataclass(repr=False)
class FirstOrder(Method):
    """First-order hypergradient (FOMAML, first-order DARTS)."""

    name = "first_order"

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        return first_order_vjp(ctx.uppers, cotangent, ctx.init)


@dataclass(repr=False)
class Reptile(Method):
    """Reptile: the meta-initialization's gradient is ``θ_init - θ_adapted``.

    Needs ``Config(initialize_from=...)`` on the lower. The upper's own loss only adds its direct
    gradient (usually zero); return any loss from its ``training_step`` for logging.
    """

    name = "reptile"

    def direct_gradient(self, ctx: LowerContext) -> Vec | None:
        out = list(zeros_for(ctx.uppers))
        if ctx.init is None:
            return None
        init = tuple(ctx.uppers[i].detach() for i in ctx.init)
        for i, g in zip(ctx.init, reptile_gradient(init, ctx.params)):
            out[i] = g
        return tuple(out)

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        return zeros_for(ctx.uppers)


register_method("first_order", FirstOrder)
register_method("reptile", Reptile)
