"""Meta-learning hypergradient methods and Problem helpers built on the public seams.

:class:`WarpGrad` is the meta-objective of WarpGrad (Flennerhag et al. 2020, "Meta-Learning with
Warped Gradient Descent", eq. 6-7): the warp parameters ``ω`` minimize the loss after ONE
warped step from a point ``θ_k`` of the task's trajectory, ``L(θ_k - α ∇L_task(θ_k; ω); ω)``,
with ``θ_k`` held constant, so nothing is backpropagated through the inner loop. Here the point
is the last one of the window (``θ_{K-1}``): the method is ``Reverse(truncate=1)``, cut at the
window's last update also when ``unroll_steps == 1``. The initialization, which the truncated
graph does not reach, receives Reptile's gradient ``θ_init - θ_K`` (``init="reptile"``, Nichol
et al. 2018; the paper pairs warps with Leap or Reptile-like initializations) or nothing
(``init="none"``).

:func:`reset_parameters` starts a lower problem's window from fixed values (zeros): the
meta-feature setting of BOML (Liu et al. 2021), where a task-specific linear head is learned
from scratch on top of the shared (upper) feature extractor. Call it from the lower's
``on_inner_loop_start``.

Example:
    >>> import mlopt, mlopt.meta
    >>> mlopt.Config(type="warpgrad", unroll_steps=5, initialize_from="outer.model").type
    WarpGrad(truncate=1, checkpoint=None, init='reptile')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlopt.errors import ConfigError
from mlopt.hypergrad import Reverse, register_method, reptile_gradient
from mlopt.hypergrad.base import LowerContext, Vec, zeros_for

__all__ = ["WarpGrad", "reset_parameters"]


@dataclass(repr=False)
class WarpGrad(Reverse):
    """WarpGrad's one-step trajectory objective for warps, Reptile (or nothing) for the init.

    Args:
        truncate: backpropagate through the last ``truncate`` inner updates (1 in the paper).
        init: ``"reptile"`` or ``"none"``: the gradient given to the meta-initialization.
    """

    truncate: int | None = 1
    init: str = "reptile"

    name = "warpgrad"

    def __post_init__(self) -> None:
        if self.truncate is None:
            raise ConfigError("WarpGrad: truncate must be an integer >= 1 (1 in the paper)")
        super().__post_init__()
        if self.init not in ("reptile", "none"):
            raise ConfigError(f"WarpGrad: init must be 'reptile' or 'none', got {self.init!r}")

    def truncate_at(self, unroll_steps: int) -> int | None:
        return max(0, unroll_steps - int(self.truncate))

    def direct_gradient(self, ctx: LowerContext) -> Vec | None:
        if self.init != "reptile" or ctx.init is None:
            return None
        out = list(zeros_for(ctx.uppers))
        start = tuple(ctx.uppers[i].detach() for i in ctx.init)
        for i, g in zip(ctx.init, reptile_gradient(start, ctx.params)):
            out[i] = g
        return tuple(out)


register_method("warpgrad", WarpGrad, overwrite=True)


def reset_parameters(problem: Any, value: float = 0.0) -> None:
    """Set the problem's current parameters to ``value`` in place (no gradient recorded).

    Call it from ``on_inner_loop_start`` so that every unroll window (task) starts from the
    same point, without a meta-initialization. The hypergradient methods then see a start that
    does not depend on any upper problem.

    Example:
        >>> import torch, mlopt
        >>> class Head(mlopt.Problem):
        ...     def training_step(self, batch):
        ...         return self.module.weight.sum()
        >>> head = torch.nn.Linear(2, 2)
        >>> p = Head("head", head, torch.optim.SGD(head.parameters(), lr=0.1))
        >>> reset_parameters(p)
        >>> float(head.weight.detach().abs().sum())
        0.0
    """
    with torch.no_grad():
        for t in problem.parameters():
            t.fill_(value)
