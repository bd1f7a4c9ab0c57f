"""Gradients and lower evaluations of problems whose modules are sharded by ``fully_shard``.

Under ``EngineConfig(strategy="fsdp")`` (:mod:`mlopt.fsdp`) some problems' modules are wrapped
by torch's ``fully_shard`` (FSDP2). Their parameters are sharded ``DTensor`` s; the forward pass
all-gathers them into other tensors, so ``torch.autograd.grad`` with respect to the sharded
parameters finds them unused, and a module called with substituted parameters
(``functional_call``) fails. What the runtime does instead, for a program with sharded problems:

- a problem's gradient comes from ``loss.backward()``: FSDP reduce-scatters it into the sharded
  parameters' ``.grad`` (averaged over ranks); the ``.grad`` of every other problem's parameters
  is put back as it was, so nothing else sees the pass;
- an upper reads a sharded lower through the module itself (not through a hypergradient node):
  the same backward pass leaves ``v = ∂L_upper/∂θ`` (rank-averaged) in the lower's ``.grad``, and
  the lower's method maps it to the upper's hypergradient afterwards
  (:meth:`Sharded.loss_gradient`);
- a method evaluating the lower at other parameters (DARTS's and SAMA's ``θ ± εv``) gets a
  ``loss_fn`` that writes them into the sharded parameters in place; the parameters are restored
  exactly (copied back from a saved copy) once the method returns.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> with restoring([w]):
    ...     write_([w], (torch.zeros(2),))
    ...     w.sum().item()
    0.0
    >>> w.sum().item()
    2.0
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mlopt.errors import ConfigError
from mlopt.hypergrad.base import LowerContext
from mlopt.runtime.context import Exposure, named_vjp
from mlopt.step import gradient

__all__ = ["Sharded", "backward_gradients", "restoring", "write_"]

Vec = tuple[torch.Tensor, ...]


def write_(leaves: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``leaves`` in place (sharded parameters take sharded values)."""
    with torch.no_grad():
        for leaf, value in zip(leaves, values, strict=True):
            leaf.copy_(value)


@contextlib.contextmanager
def restoring(leaves: Sequence[torch.Tensor]) -> Iterator[None]:
    """Put ``leaves`` back exactly as they are now when the block ends."""
    saved = [t.detach().clone() for t in leaves]
    try:
        yield
    finally:
        write_(leaves, saved)


def backward_gradients(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    lowers: Mapping[str, Sequence[torch.Tensor]],
    everyone: Sequence[torch.Tensor],
    name: str | None = None,
) -> tuple[Vec, dict[str, Vec]]:
    """``∂loss/∂params`` and ``∂loss/∂`` each of ``lowers``'s tensors, by ``loss.backward()``.

    The ``.grad`` of ``everyone`` (every problem's parameters) is cleared for the pass and put
    back afterwards. Sharded tensors receive FSDP's rank-averaged gradient, others their rank's.

    Raises:
        ConfigError: with ``name``, when the loss depends on none of ``params``.
    """
    saved = [t.grad for t in everyone]
    for t in everyone:
        t.grad = None
    try:
        if loss.requires_grad:
            loss.backward()
        got = [p.grad for p in params]
        cot = {
            low: tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in ts)
            for low, ts in lowers.items()
        }
    finally:
        for t, g in zip(everyone, saved):
            t.grad = g
    if name is not None and params and not lowers and all(g is None for g in got):
        raise ConfigError(
            f"problem {name!r}: the loss returned by training_step does not depend on any of its "
            f"{len(params)} trainable parameter tensor(s); compute it through self.module(...)"
        )
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, got)), cot


class Sharded(Exposure):
    """Exposure with the sharded problems' paths (a program without any keeps the plain ones).

    Attributes:
        sharded: the problems whose modules are sharded (set by the Engine under ``fsdp``).
    """

    sharded: frozenset[str] = frozenset()

    def loss_gradient(self, name: str, loss: torch.Tensor, params: Vec, keep_graph: bool) -> Vec:
        """The gradient of ``name``'s loss with respect to its parameters ``params``, the
        hypergradients of the lowers it reads included."""
        pp = self.plan.problems[name]
        label = None if pp.direct_lowers else name
        if not self.sharded:
            return gradient(loss, params, create_graph=keep_graph, name=label)
        reads = sorted(low for low in pp.reads if low in self.sharded)
        lowers = {low: self.states[low].leaves() for low in reads}
        everyone = [t for st in self.states.values() for t in st.leaves()]
        grads, cotangents = backward_gradients(loss, params, lowers, everyone, label)
        for low, v in cotangents.items():
            ctx = self.context(low)
            sl = ctx.extra["slices"].get(name)
            if sl is None:
                continue
            with restoring(lowers[low]):
                extra = named_vjp(self.plan.problems[low].method, ctx, v)[sl]
            grads = tuple(g if e is None else g + e for g, e in zip(grads, extra))
        return grads

    def context(self, name: str) -> LowerContext:
        """The lower context; a sharded lower's ``loss_fn`` evaluates it in place."""
        ctx = super().context(name)
        if name in self.sharded:
            st = self.states[name]
            ctx.loss_fn = functools.partial(
                self.in_place_loss, name, st.batch, ctx.uppers, ctx.extra["slices"]
            )
        return ctx

    def in_place_loss(
        self, name: str, batch: Any, uppers: Vec, slices: dict[str, slice], params: Vec
    ) -> torch.Tensor:
        """``name``'s loss with ``params`` written into its sharded parameters (the caller
        restores them: see :func:`restoring`) and its uppers pinned to ``uppers``."""
        write_(self.states[name].leaves(), params)
        with self.pinned(slices, uppers):
            return self.loss_at(name, None, batch)
