"""Unroll windows: closing one (commit), starting the next (hook, meta-initialization, fresh
state) at its first update, and writing fast weights back.

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

from mlopt.errors import ConfigError
from mlopt.functional import versions
from mlopt.runtime import rollback
from mlopt.runtime.plan import Plan
from mlopt.runtime.state import ProblemState

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["end_window", "start_window", "hook_changed_parameters", "sync_modules"]


def end_window(plan: Plan, states: Mapping[str, ProblemState], name: str) -> None:
    """Close ``name``'s finished window at the end of the iteration (and prepare the first one):
    fast weights and optimizer state are written back, so that until its next update the problem
    holds its trained state (``validation()``, the end of ``run()``). A persistent lower unrolled
    differentiably gets fresh copies of its parameters at once: problems that read it before its
    next update then differentiate through the tensors its next window starts from."""
    pp, st = plan.problems[name], states[name]
    if pp.dopt is not None and st.opt_state is not None:
        pp.dopt.commit(st.opt_state)
    st.commit()
    if pp.differentiable and pp.init is None:
        # a fresh copy: the leaf may already feed other graphs (e.g. an upper's fast weights
        # that depend on the previous window), and it is overwritten in place on commit
        st.set_fast(tuple(t.detach().clone().requires_grad_() for t in st.leaves()))
    if pp.dopt is not None and pp.differentiable:  # (forward mode steps its optimizer itself)
        st.opt_state = pp.dopt.init_state(fresh=pp.init is not None)


def start_window(
    plan: Plan, states: Mapping[str, ProblemState], problem: Problem, name: str
) -> None:
    """Start ``name``'s next window at its first update: its ``on_inner_loop_start`` hook, then
    the meta-initialization from the ``initialize_from`` upper and the window's fresh state.

    Raises:
        ConfigError: the hook changed parameters in place that the window then does not use
            (a meta-initialized lower, or one unrolled differentiably from a copy).
    """
    pp, st = plan.problems[name], states[name]
    before, current = versions(st.leaves()), versions(st.current())
    problem.on_inner_loop_start()
    if pp.resample_window is None and st.per_task is None:  # does the hook restart it?
        st.per_task = current != versions(st.current())
    if (pp.init is not None or pp.differentiable) and before != versions(st.leaves()):
        raise hook_changed_parameters(name, pp.init[0] if pp.init is not None else None)
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
    st.memory = pp.method.begin_window() if pp.method.tracks_dynamics else None
    st.window_batches = []
    st.segment = None
    st.opened = True
    if pp.snapshots:
        st.snapshot = rollback.snapshot(st)


def hook_changed_parameters(name: str, init: str | None) -> ConfigError:
    """The error for an ``on_inner_loop_start`` that changed parameters the window ignores."""
    why = (
        f"they are reset from {init!r} right after it (Config(initialize_from={init!r}))"
        if init is not None
        else "the window is unrolled differentiably from a copy taken when the previous one ended"
    )
    return ConfigError(
        f"problem {name!r}: on_inner_loop_start() changed its parameters in place, but {why}, so "
        "the change would be ignored; to start every window from another problem's parameters "
        "use Config(initialize_from=<upper>), or change them in training_step"
    )


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
