"""Losses and lower contexts: what a hypergradient method sees of a lower problem.

While an upper's ``training_step`` runs, a lower that it reads (an ``l2u`` edge) shows it either
its differentiable unroll (``reverse``) or an autograd node (:func:`mlopt.hypergrad.attach`) whose
backward is the lower's method applied to the :class:`LowerContext` built here
(:meth:`mlopt.runtime.replay.Replay.exposed_params` decides which). The upper's gradient is then
plain ``torch.autograd.grad``, and a middle level differentiates through its own lowers the same
way.

Example:
    >>> from mlopt.errors import HypergradientError
    >>> class Diverges:
    ...     def vjp(self, ctx, cotangent):
    ...         raise HypergradientError("cg diverged")
    >>> ctx = LowerContext("low", (), None, (), lambda p: 0.0, ())
    >>> try:
    ...     named_vjp(Diverges(), ctx, ())
    ... except HypergradientError as err:
    ...     print(str(err).split(" (")[0])
    hypergradient through 'low'
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.hypergrad.base import LowerContext, Transition
from mlopt.hypergrad.transition import transition_map
from mlopt.runtime.plan import Plan
from mlopt.runtime.state import ProblemState
from mlopt.step import autocast, split_output

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["check_vjp", "Exposure", "named_vjp", "forward_step"]

Vec = tuple[torch.Tensor, ...]


def named_vjp(method: Any, ctx: LowerContext, cotangent: Vec) -> Vec:
    """``method.vjp`` whose errors name the lower problem they come from."""
    try:
        grads = method.vjp(ctx, cotangent)
    except HypergradientError as err:
        if str(err).startswith("hypergradient through"):
            raise
        raise HypergradientError(f"hypergradient through {ctx.name!r} ({method!r}): {err}") from err
    return check_vjp(ctx.name, method, grads, ctx.uppers)


def check_vjp(name: str, method: Any, grads: Any, uppers: Vec) -> Vec:
    """A method's vjp output checked: one tensor (or None) per upper tensor, shaped like it.

    Raises:
        HypergradientError: naming the lower, the method and what is wrong.
    """
    want = [tuple(u.shape) for u in uppers]
    if not isinstance(grads, (tuple, list)) or len(grads) != len(uppers):
        got = len(grads) if isinstance(grads, (tuple, list)) else type(grads).__name__
        raise HypergradientError(
            f"hypergradient through {name!r}: {method!r}.vjp returned {got} for {len(uppers)} "
            f"upper tensor(s) shaped {want}; return a tuple with one tensor per ctx.uppers"
        )
    for i, (g, u) in enumerate(zip(grads, uppers)):
        if g is not None and (not isinstance(g, torch.Tensor) or g.shape != u.shape):
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise HypergradientError(
                f"hypergradient through {name!r}: {method!r}.vjp's output {i} is {got}, but "
                f"ctx.uppers[{i}] has shape {tuple(u.shape)}; return one tensor per upper tensor"
            )
    return tuple(grads)


def forward_step(name: str, method: Any, memory: Any, transition: Any) -> Any:
    """``method.after_step`` whose torch.func limitation is reported as a named error."""
    try:
        return method.after_step(memory, transition)
    except RuntimeError as err:
        if "ZeroTensors are immutable" not in str(err):
            raise
        raise ConfigError(
            f"problem {name!r}: {method!r} pushes tangents through training_step with "
            "torch.func (forward over reverse), which fails inside some torch losses in torch "
            f"{torch.__version__} (torch.nn.functional.mse_loss: 'ZeroTensors are immutable'); "
            "write the loss out, e.g. ((pred - y) ** 2).mean(), or use Config(type='reverse')"
        ) from err


class Exposure:
    """Losses, lower contexts and what an active upper sees of the problems it reads."""

    def __init__(
        self, plan: Plan, problems: Mapping[str, Problem], states: Mapping[str, ProblemState]
    ) -> None:
        self.plan, self.problems, self.states = plan, problems, states
        self.version = 0  # bumped by every update: invalidates cached hypergradient nodes
        self._cache: dict[str, tuple] = {}
        self._active: list[str] = []
        self._reads: set[tuple[str, str]] = set()  # (reader, read) outside any dependency edge
        self.average_unroll: Callable[[Vec], Vec] | None = None  # set under data parallelism
        self._replaying: tuple[str, int] | None = None

    # ------------------------------------------------------------------ losses
    def loss(self, problem: Problem, batch: Any) -> tuple[torch.Tensor | None, dict]:
        """Run ``problem.training_step(batch)`` under its precision, with ``problem`` marked as
        the one whose loss is being computed; returns (loss, metrics)."""
        precision = self.plan.problems[problem.name].precision
        self._active.append(problem.name)  # (no context managers: this runs every update)
        try:
            if precision == "fp32":
                out = problem.training_step(batch)
            else:
                with autocast(precision, self.plan.device):
                    out = problem.training_step(batch)
        finally:
            self._active.pop()
        return split_output(problem.name, out)

    def loss_at(self, name: str, params: Vec, batch: Any) -> torch.Tensor:
        """The loss of ``name`` with ``params`` as its current parameters."""
        with self.states[name].using(params):
            loss, _ = self.loss(self.problems[name], batch)
        if loss is None:
            raise ConfigError(f"problem {name!r}: training_step returned no loss")
        return loss

    @contextlib.contextmanager
    def pinned(self, slices: Mapping[str, slice], uppers: Vec) -> Iterator[None]:
        """Every upper in ``slices`` runs with its slice of ``uppers`` as its parameters."""
        with contextlib.ExitStack() as stack:
            for up, sl in slices.items():
                stack.enter_context(self.states[up].using(uppers[sl]))
            yield

    def pinned_loss(
        self, name: str, batch: Any, uppers: Vec, slices: dict[str, slice], params: Vec
    ) -> torch.Tensor:
        """The loss of ``name`` at ``params`` with every upper pinned to the given tensors.

        A method's vjp runs later, during an upper's backward pass, when the uppers' current
        parameters may have changed (a middle level evaluating at temporary parameters): pinning
        makes the closure depend on its captured tensors only.
        """
        with self.pinned(slices, uppers):
            return self.loss_at(name, params, batch)

    # ------------------------------------------------------------------ windows
    @contextlib.contextmanager
    def replaying(self, name: str, position: int) -> Iterator[None]:
        """Report ``position`` as ``name``'s window position (a replayed or redone update)."""
        saved, self._replaying = self._replaying, (name, position)
        try:
            yield
        finally:
            self._replaying = saved

    def window_position(self, name: str) -> int:
        """1-based position of ``name``'s current (or replayed) update in its unroll window;
        ``unroll_steps`` once the window has closed (an upper re-evaluating the last update)."""
        if self._replaying is not None and self._replaying[0] == name:
            return self._replaying[1]
        st = self.states[name]
        if st.opened:
            return st.window_count + 1
        return self.plan.problems[name].unroll_steps

    # ------------------------------------------------------------------ exposure
    def upper_tensors(self, name: str) -> tuple[Vec, dict[str, slice]]:
        """The current parameters of ``name``'s uppers, concatenated, and each one's slice."""
        tensors: list[torch.Tensor] = []
        slices: dict[str, slice] = {}
        for up in self.plan.problems[name].uppers:
            cur = self.states[up].current()
            slices[up] = slice(len(tensors), len(tensors) + len(cur))
            tensors.extend(cur)
        return tuple(tensors), slices

    def context(self, name: str) -> LowerContext:
        """The :class:`LowerContext` of ``name`` with its uppers' current parameters."""
        pp, st = self.plan.problems[name], self.states[name]
        tensors, slices = self.upper_tensors(name)
        init = None
        if pp.init is not None:
            start = slices[pp.init[0]].start
            init = tuple(start + i for i in pp.init[1])
        return LowerContext(
            name=name,
            params=tuple(t.detach() for t in st.current()),
            params_before=st.before,
            uppers=tensors,
            loss_fn=functools.partial(self.pinned_loss, name, st.batch, tensors, slices),
            lr=st.learning_rates(),
            init=init,
            memory=st.memory,
            step=st.steps,
            extra=(
                {
                    "slices": slices,
                    "optimizer": st.optimizer,
                    "leaves": tuple(st.leaves()),
                    "grad": st.last_grad,
                }
                if pp.keeps_gradient  # (only SAMA needs them: not built at every read)
                else {"slices": slices}
            ),
        )

    def transition(self, name: str, params: Vec) -> Transition:
        """The pure update map of ``name`` for forward mode (see
        :func:`mlopt.hypergrad.forward.transition_map`)."""
        pp, st, batch = self.plan.problems[name], self.states[name], self.states[name].batch
        if pp.dopt is None:
            raise ConfigError(f"problem {name!r}: forward mode needs an optimizer")
        ctx = self.context(name)
        problem = self.problems[name]

        def gradient_at(ps: Vec, uppers: Vec) -> Vec:
            with self.pinned(ctx.extra["slices"], uppers):
                return torch.func.grad(lambda q: self.loss_at(name, q, batch))(ps)

        return transition_map(
            pp.dopt,
            st.optimizer,
            params,
            ctx,
            gradient_at,
            warmup=pp.warmup(st.updates),
            lr=problem.learning_rates,
            first=st.window_count == 0,
        )
