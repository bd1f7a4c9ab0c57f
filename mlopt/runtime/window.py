"""Unroll windows: opening one (meta-initialization, fresh state) and writing fast weights back.

Example:
    >>> import torch, mlopt
    >>> class P(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return (self.module.weight ** 2).sum()
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> engine = mlopt.Engine([P("p", net, torch.optim.SGD(net.parameters(), lr=0.1))])
    >>> engine.state("p").opened
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from mlopt.runtime import rollback
from mlopt.runtime.plan import Plan
from mlopt.runtime.state import ProblemState

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["begin_window", "sync_modules"]


def begin_window(
    plan: Plan, states: Mapping[str, ProblemState], problem: Problem, name: str
) -> None:
    """Commit ``name``'s previous window and start a new one, then call its
    ``on_inner_loop_start`` hook."""
    pp, st = plan.problems[name], states[name]
    if pp.dopt is not None and st.opt_state is not None:
        pp.dopt.commit(st.opt_state)
    st.commit()
    if pp.init is not None:
        full = states[pp.init[0]].current()
        src = tuple(full[i] for i in pp.init[1])
        if pp.differentiable:
            # distinct tensors (views) so that ∂f/∂θ_0 is not confused with ∂f/∂φ
            st.set_fast(tuple(t.view_as(t) for t in src))
        else:
            with torch.no_grad():
                for leaf, value in zip(st.leaves(), src):
                    leaf.copy_(value)
            if st.optimizer is not None:
                for leaf in st.leaves():
                    st.optimizer.state.pop(leaf, None)
    elif pp.differentiable:
        # a fresh copy: the leaf may already feed other graphs (e.g. an upper's fast weights
        # that depend on the previous window), and it is overwritten in place on commit
        st.set_fast(tuple(t.detach().clone().requires_grad_() for t in st.leaves()))
    if pp.dopt is not None:
        st.opt_state = pp.dopt.init_state(fresh=pp.init is not None)
    st.memory = pp.method.begin_window() if pp.method.tracks_dynamics else None
    st.window_batches = []
    st.segment = None
    st.opened = True
    if pp.snapshots:
        st.snapshot = rollback.snapshot(st)
    problem.on_inner_loop_start()


def sync_modules(plan: Plan, states: Mapping[str, ProblemState]) -> None:
    """Write fast weights and functional optimizer state into the modules and optimizers,
    keeping the unroll as it is (its tensors are copies, never the leaves themselves)."""
    for name, st in states.items():
        dopt = plan.problems[name].dopt
        if dopt is not None and st.opt_state is not None:
            dopt.commit(st.opt_state)
        if st.fast is not None:
            with torch.no_grad():
                for leaf, value in zip(st.leaves(), st.fast):
                    if value is not leaf:
                        leaf.copy_(value)
