"""Pure functions over the dependency graph: normalization, validation and the schedule.

A program is a list of problem names plus two edge dicts: ``u2l`` (upper -> lowers whose loss
uses the upper's parameters) and ``l2u`` (lower -> uppers whose loss uses the lower's
parameters). Nothing here touches tensors.

Example:
    >>> deps = {"u2l": {"outer": ["inner"]}, "l2u": {"inner": ["outer"]}}
    >>> g = normalize(["outer", "inner"], deps)
    >>> validate(g)
    >>> order = step_order(g)
    >>> order
    ['inner', 'outer']
    >>> simulate(g, {"inner": 2, "outer": 1}, iterations=4)
    {'outer': 2, 'inner': 4}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlopt.errors import DependencyError

__all__ = ["Graph", "normalize", "validate", "step_order", "simulate", "describe", "Scheduler"]


@dataclass(frozen=True)
class Graph:
    """Problem names and dependency edges (names only)."""

    names: tuple[str, ...]
    u2l: dict[str, tuple[str, ...]] = field(default_factory=dict)
    l2u: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def lowers(self, name: str) -> tuple[str, ...]:
        """Problems that ``name`` must wait for: its u2l lowers and the problems it reads (l2u)."""
        out = list(self.u2l.get(name, ()))
        out += [low for low, ups in self.l2u.items() if name in ups and low not in out]
        return tuple(out)

    def uppers(self, name: str) -> tuple[str, ...]:
        """Problems that wait for ``name``."""
        return tuple(n for n in self.names if name in self.lowers(n))

    def hyper_uppers(self, name: str) -> tuple[str, ...]:
        """Problems whose parameters appear in ``name``'s loss (u2l edges into ``name``)."""
        return tuple(u for u, lows in self.u2l.items() if name in lows)


def _name_of(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    name = getattr(item, "name", None)
    if isinstance(name, str):
        return name
    raise DependencyError(
        f"{where}: {item!r} is neither a problem name nor a Problem; use Problem objects or names"
    )


def normalize(names: Sequence[str], dependencies: Mapping[str, Any] | None) -> Graph:
    """Turn user dependency dicts (Problems or names, lists or single items) into a :class:`Graph`.

    Raises:
        DependencyError: unknown keys, a name used twice, or a problem missing from ``problems``.
    """
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DependencyError(
                f"two problems are named {n!r}; every problem needs a unique name"
            )
        seen.add(n)
    if dependencies is not None and not isinstance(dependencies, Mapping):
        raise DependencyError(
            "dependencies must be a dict {'u2l': {upper: [lowers]}, 'l2u': {lower: [uppers]}}, "
            f"got {type(dependencies).__name__}"
        )
    dependencies = dict(dependencies or {})
    unknown = set(dependencies) - {"u2l", "l2u"}
    if unknown:
        raise DependencyError(
            f"unknown dependency keys {sorted(unknown)}; use 'u2l' (upper -> lowers) and "
            "'l2u' (lower -> uppers)"
        )
    edges: dict[str, dict[str, tuple[str, ...]]] = {}
    for kind in ("u2l", "l2u"):
        table = dependencies.get(kind) or {}
        if not isinstance(table, Mapping):
            raise DependencyError(f"dependencies[{kind!r}] must be a dict, got {type(table)}")
        out: dict[str, tuple[str, ...]] = {}
        for key, values in table.items():
            src = _name_of(key, kind)
            if values is None:
                values = []
            if isinstance(values, (str,)) or not isinstance(values, Iterable):
                values = [values]
            dsts = tuple(dict.fromkeys(_name_of(v, kind) for v in values))
            for n in (src, *dsts):
                if n not in seen:
                    raise DependencyError(
                        f"problem {n!r} appears in dependencies[{kind!r}] but not in problems; "
                        "add it to Engine(problems=[...]) or remove the edge"
                    )
            if src in dsts:
                raise DependencyError(f"{kind} edge from {src!r} to itself; remove it")
            out[src] = tuple(dict.fromkeys(out.get(src, ()) + dsts))
        edges[kind] = out
    return Graph(tuple(names), edges["u2l"], edges["l2u"])


def _reaches(graph: Graph, start: str, goal: str) -> bool:
    """Whether ``goal`` is reachable from ``start`` following l2u edges (lower -> upper)."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(graph.l2u.get(node, ()))
    return False


def validate(graph: Graph) -> None:
    """Check the program before training.

    Raises:
        DependencyError: a cycle in the step order, or a ``u2l`` edge with no ``l2u`` path back
            from the lower to the upper (the upper would never see the lower's solution).
    """
    step_order(graph)  # raises on cycles
    for upper, lowers in graph.u2l.items():
        for lower in lowers:
            if not _reaches(graph, lower, upper):
                raise DependencyError(
                    f"u2l edge {upper!r} -> {lower!r} has no l2u path back from {lower!r} to "
                    f"{upper!r}: the upper's loss never uses the lower's solution, so no "
                    f"hypergradient can reach it. Add {{{lower!r}: [{upper!r}]}} to l2u."
                )


def step_order(graph: Graph) -> list[str]:
    """Problems ordered lowest first (every problem after all of its lowers).

    Raises:
        DependencyError: if the "waits for" relation has a cycle (the cycle is named).
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = path[path.index(node) :] + [node]
            raise DependencyError(
                "dependency cycle " + " -> ".join(cycle) + ": a problem cannot (indirectly) wait "
                "for itself; remove one of these l2u/u2l edges"
            )
        state[node] = 1
        for low in graph.lowers(node):
            visit(low, path + [node])
        state[node] = 2
        order.append(node)

    for name in graph.names:
        visit(name, [])
    return order


class Scheduler:
    """Who steps at each iteration: pure bookkeeping, no tensors.

    The lowest problems (no lowers) step every iteration. A problem with lowers steps once each
    of them has finished a window of its own ``unroll_steps`` updates since its last step.
    """

    def __init__(self, graph: Graph, unroll_steps: Mapping[str, int]) -> None:
        self.graph = graph
        self.order = step_order(graph)
        self.unroll = dict(unroll_steps)
        self.window_count = {n: 0 for n in graph.names}  # updates in the current window
        self.steps = {n: 0 for n in graph.names}
        self.ready = {(u, low): False for u in graph.names for low in graph.lowers(u)}

    def should_step(self, name: str) -> bool:
        """Whether ``name`` steps now (call in ``self.order`` within an iteration)."""
        lows = self.graph.lowers(name)
        return not lows or all(self.ready[(name, low)] for low in lows)

    def window_starts(self, name: str) -> bool:
        """Whether the next step of ``name`` opens a new unroll window."""
        return self.window_count[name] == 0

    def record_step(self, name: str) -> bool:
        """Book a step of ``name``; returns True when it completes an unroll window."""
        self.steps[name] += 1
        for low in self.graph.lowers(name):
            self.ready[(name, low)] = False
        self.window_count[name] += 1
        if self.window_count[name] >= self.unroll[name]:
            self.window_count[name] = 0
            for up in self.graph.uppers(name):
                self.ready[(up, name)] = True
            return True
        return False

    def state_dict(self) -> dict:
        """Counters, for checkpoints."""
        return {
            "window_count": dict(self.window_count),
            "steps": dict(self.steps),
            "ready": [[u, low, v] for (u, low), v in self.ready.items()],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore counters saved by :meth:`state_dict`."""
        self.window_count.update(state["window_count"])
        self.steps.update(state["steps"])
        for u, low, v in state["ready"]:
            self.ready[(u, low)] = bool(v)


def simulate(graph: Graph, unroll_steps: Mapping[str, int], iterations: int) -> dict[str, int]:
    """Step counts of every problem after ``iterations`` iterations of the schedule."""
    sched = Scheduler(graph, unroll_steps)
    for _ in range(iterations):
        for name in sched.order:
            if sched.should_step(name):
                sched.record_step(name)
    return dict(sched.steps)


def describe(graph: Graph, unroll_steps: Mapping[str, int], methods: Mapping[str, str]) -> str:
    """Human-readable schedule: levels, edges, methods and who steps in the first iterations."""
    lines = ["mlopt program (lowest first):"]
    for name in step_order(graph):
        lows = graph.lowers(name)
        ups = graph.hyper_uppers(name)
        parts = [f"  {name}: unroll_steps={unroll_steps[name]}"]
        if ups:
            parts.append(f"hypergradient to {list(ups)} by {methods[name]}")
        if lows:
            parts.append(f"waits for {list(lows)}")
        else:
            parts.append("steps every iteration")
        lines.append(", ".join(parts))
    horizon = 1
    for n in graph.names:
        horizon *= unroll_steps[n]
    horizon = max(2, min(2 * horizon, 1000))
    sched = Scheduler(graph, unroll_steps)
    when: dict[str, list[int]] = {n: [] for n in graph.names}
    for it in range(1, horizon + 1):
        for name in sched.order:
            if sched.should_step(name):
                sched.record_step(name)
                when[name].append(it)
    lines.append("iterations at which each problem steps:")
    for name in sched.order:
        its = when[name]
        shown = ", ".join(map(str, its[:6])) + (", ..." if len(its) > 6 else "")
        lines.append(f"  {name}: {shown or 'none in the first ' + str(horizon)}")
    return "\n".join(lines)
