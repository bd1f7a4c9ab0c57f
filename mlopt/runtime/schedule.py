"""The schedule: typed operations of one iteration, from the plan and the problems' counters.

:func:`iteration` yields the operations lazily (whether an upper steps depends on its lowers'
updates earlier in the same iteration); the Engine's loop executes each one before asking for
the next, and ``print(engine)`` lists the operations of the first iterations by running the same
generator over counters that only book steps.

Example:
    >>> ops = (StartWindow("low"), Update("low"), RollBack("up", ("low",)), EndWindow("low"))
    >>> [str(op) for op in ops]
    ['start window low', 'update low', 'roll back low (after up)', 'end window low']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from mlopt.runtime.plan import Plan
from mlopt.runtime.state import ProblemState

__all__ = [
    "Update",
    "RollBack",
    "StartWindow",
    "EndWindow",
    "windows_to_open",
    "iteration",
    "should_step",
    "book",
    "operations",
]


@dataclass(frozen=True)
class Update:
    """One update of a problem (its optimizer or its differentiable rule)."""

    problem: str

    def __str__(self) -> str:
        return f"update {self.problem}"


@dataclass(frozen=True)
class RollBack:
    """DARTS roll-back: the lowers of ``upper`` return to their window start and redo it."""

    upper: str
    lowers: tuple[str, ...]

    def __str__(self) -> str:
        return f"roll back {', '.join(self.lowers)} (after {self.upper})"


@dataclass(frozen=True)
class StartWindow:
    """Start a problem's next unroll window, just before its first update (its hook, the
    meta-initialization, fresh window state)."""

    problem: str

    def __str__(self) -> str:
        return f"start window {self.problem}"


@dataclass(frozen=True)
class EndWindow:
    """Close a problem's finished window at the end of the iteration (commit its state)."""

    problem: str

    def __str__(self) -> str:
        return f"end window {self.problem}"


Op = Update | RollBack | StartWindow | EndWindow


def should_step(plan: Plan, states: Mapping[str, ProblemState], name: str) -> bool:
    """Whether ``name`` steps now: it has no lowers, or each finished a window since."""
    waits = plan.problems[name].waits_for
    return not waits or all(states[name].ready[low] for low in waits)


def book(plan: Plan, states: Mapping[str, ProblemState], name: str) -> bool:
    """Book an update of ``name``; returns True when it completes an unroll window."""
    pp, st = plan.problems[name], states[name]
    st.steps += 1
    for low in pp.waits_for:
        st.ready[low] = False
    st.window_count += 1
    if st.window_count >= pp.unroll_steps:
        st.window_count = 0
        st.opened = False
        for up in pp.readers:
            states[up].ready[name] = True
        return True
    return False


def iteration(
    plan: Plan, states: Mapping[str, ProblemState], run: Callable[[Op], None]
) -> list[str]:
    """Emit and ``run`` the operations of one iteration; returns the problems that updated."""
    stepped, ended = [], []
    for name in plan.order:
        if should_step(plan, states, name):
            if not states[name].opened:  # (until then it holds its trained state)
                run(StartWindow(name))
            run(Update(name))
            stepped.append(name)
            if states[name].window_count == 0:
                ended.append(name)
    if plan.roll_back:
        for upper in stepped:
            lowers = tuple(
                low
                for low in plan.graph.lowers(upper)
                if plan.problems[low].snapshots and states[low].window_count == 0
            )
            if lowers:
                run(RollBack(upper, lowers))
    for name in ended:
        run(EndWindow(name))
    return stepped


def windows_to_open(
    plan: Plan, states: Mapping[str, ProblemState]
) -> Iterator[EndWindow | StartWindow]:
    """Prepare and start every window not yet open (at the start and on resume; later a window
    starts at its problem's first update)."""
    for name in plan.order:
        if not states[name].opened and states[name].window_count == 0:
            yield EndWindow(name)
            yield StartWindow(name)


def operations(plan: Plan, iterations: int) -> list[list[Op]]:
    """The operations of the first ``iterations`` iterations (simulated on fresh counters)."""
    states = {n: ProblemState(n) for n in plan.order}
    for n, st in states.items():
        st.ready = dict.fromkeys(plan.problems[n].waits_for, False)
    out: list[list[Op]] = []

    def dry(op: Op) -> None:
        ops.append(op)
        if isinstance(op, Update):
            book(plan, states, op.problem)
        elif isinstance(op, StartWindow):
            states[op.problem].opened = True

    for _ in windows_to_open(plan, states):
        pass
    for n in states:
        states[n].opened = True
    for _ in range(iterations):
        ops: list[Op] = []
        iteration(plan, states, dry)
        out.append(ops)
    return out
