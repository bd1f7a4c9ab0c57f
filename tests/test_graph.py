"""Dependency validation and the schedule: who steps when, for 2, 3 and 4 levels."""

import pytest
import torch
from torch import nn

import mlopt
from mlopt.graph import normalize, simulate, step_order, validate


class Count(mlopt.Problem):
    """A problem whose loss touches the parameters of every problem it shares an edge with (so
    all edges are real; reading a problem across no edge is a DependencyError)."""

    def training_step(self, batch):
        loss = self.module.weight.sum() ** 2
        g, name = self.engine.graph, self.name
        near = {*g.u2l.get(name, ()), *g.l2u.get(name, ())}
        near |= {n for edges in (g.u2l, g.l2u) for n, ends in edges.items() if name in ends}
        for other in near:
            loss = loss + 1e-3 * self.engine.problems_by_name[other].module.weight.sum()
        return loss


def problem(name, unroll=1, method="first_order"):
    m = nn.Linear(1, 1, bias=False).double()
    return Count(
        name,
        m,
        torch.optim.SGD(m.parameters(), lr=0.01),
        config=mlopt.Config(type=method, unroll_steps=unroll),
    )


def chain(names):
    u2l = {a: [b] for a, b in zip(names, names[1:])}
    l2u = {b: [a] for a, b in zip(names, names[1:])}
    return {"u2l": u2l, "l2u": l2u}


def run_counts(problems, deps, iters):
    engine = mlopt.Engine(problems, deps, mlopt.EngineConfig(train_iters=iters, strategy="cpu"))
    return engine.run()["steps"], engine


def test_two_levels():
    steps, _ = run_counts([problem("up"), problem("low", 3)], chain(["up", "low"]), 9)
    assert steps == {"low": 9, "up": 3}


def test_three_levels_design_example():
    # DESIGN.md: top -> mid -> low with unroll_steps=2 on mid and low: 8, 4, 2 steps.
    probs = [problem("top"), problem("mid", 2), problem("low", 2)]
    steps, engine = run_counts(probs, chain(["top", "mid", "low"]), 8)
    assert steps == {"low": 8, "mid": 4, "top": 2}
    assert "steps every iteration" in str(engine)


@pytest.mark.parametrize("method", ["first_order", "reverse"])
def test_four_levels(method):
    probs = [
        problem("a"),
        problem("b", 2, method),
        problem("c", 3, method),
        problem("d", 2, method),
    ]
    steps, _ = run_counts(probs, chain(["a", "b", "c", "d"]), 24)
    assert steps == {"d": 24, "c": 12, "b": 4, "a": 2}


def test_several_lowers_keep_their_own_windows():
    up, a, b = problem("up"), problem("a", 2), problem("b", 3)
    deps = {"u2l": {"up": ["a", "b"]}, "l2u": {"a": ["up"], "b": ["up"]}}
    steps, _ = run_counts([up, a, b], deps, 12)
    # up waits until both a (every 2) and b (every 3) finished a window: iterations 3, 6, 9, 12
    assert steps == {"a": 12, "b": 12, "up": 4}
    g = normalize(["up", "a", "b"], deps)
    assert simulate(g, {"up": 1, "a": 2, "b": 3}, 5) == {"a": 5, "b": 5, "up": 1}


def test_step_order_and_describe():
    g = normalize(["top", "mid", "low"], chain(["top", "mid", "low"]))
    validate(g)
    assert step_order(g) == ["low", "mid", "top"]
    probs = [problem("top"), problem("mid", 2), problem("low", 2)]
    engine = mlopt.Engine(probs, chain(["top", "mid", "low"]), mlopt.EngineConfig(train_iters=1))
    text = engine.describe()
    assert "mid: unroll_steps=2" in text and "hypergradient to ['top']" in text
    assert "  low: 1, 2, 3, 4, 5, 6, ..." in text
    assert "  mid: 2, 4, 6, 8" in text
    assert "  top: 4, 8" in text


def test_engine_step_returns_who_stepped():
    engine = mlopt.Engine(
        [problem("up"), problem("low", 2)], chain(["up", "low"]), mlopt.EngineConfig(train_iters=10)
    )
    assert engine.step() == ["low"]
    assert engine.step() == ["low", "up"]
