"""Reverse(checkpoint=k): the unroll recomputed in segments gives reverse mode's gradient."""

import pytest
import torch
import torch.nn.functional as F
from helpers import F64, quadratic_program
from torch import nn

import mlopt
from mlopt.hypergrad import Reverse
from mlopt.hypergrad.checkpointed import (
    Schedule,
    budget_schedule,
    graph_bytes,
    rebuild_state,
    schedule,
    state_tensors,
)
from mlopt.testing import QuadraticBilevel, capture_gradients


@pytest.mark.parametrize("checkpoint", [1, 2, 3, 7, 50, 0.5, "auto"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("init", [False, True])
def test_checkpointed_reverse_matches_unrolled_closed_form(checkpoint, momentum, init):
    q = QuadraticBilevel.random(n=3, m=3, seed=1)
    phi0, theta0 = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)
    engine, *_, grads = quadratic_program(
        q,
        phi0,
        theta0,
        steps=7,
        lr=0.05,
        momentum=momentum,
        init=init,
        method=Reverse(checkpoint=checkpoint),
    )
    engine.run()
    expected = q.unrolled_hypergradient(
        phi0, None if init else theta0, lr=0.05, steps=7, momentum=momentum, init_from_phi=init
    )
    assert len(grads) == 1
    torch.testing.assert_close(grads[0][0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [1, 3])
def test_checkpoint_with_truncation_matches_closed_form(checkpoint):
    q = QuadraticBilevel.random(n=4, m=2, seed=3)
    phi0, theta0 = torch.randn(2, dtype=F64), torch.randn(4, dtype=F64)
    engine, *_, grads = quadratic_program(
        q, phi0, theta0, steps=8, lr=0.1, method=Reverse(truncate=5, checkpoint=checkpoint)
    )
    engine.run()
    theta_cut, _, _ = q.unroll(phi0, theta0, 0.1, 3)
    expected = q.unrolled_hypergradient(phi0, theta_cut, lr=0.1, steps=5)
    torch.testing.assert_close(grads[0][0], expected, rtol=0, atol=1e-12)


class Inner(mlopt.Problem):
    """Dropout, a learned per-input scale from the upper, and a schedule: all must replay."""

    calls = 0

    def training_step(self, batch):
        Inner.calls += 1
        x, y = batch
        h = F.dropout(x * self.outer.module.scale, p=0.3, training=True)
        return F.mse_loss(self(h), y)


class Outer(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.inner(x * self.module.scale), y)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=F64))
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)

    def forward(self, x):
        return self.net(x)


def _mlp_program(method, optimizer):
    torch.manual_seed(0)
    up = Scaled()
    low = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64))]
    opt = optimizer(low.parameters())
    inner = Inner(
        "inner",
        low,
        opt,
        train_data_loader=data * 6,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        config=mlopt.Config(
            type=method, unroll_steps=6, initialize_from="outer.net", gradient_clipping=5.0
        ),
    )
    up_opt = torch.optim.SGD(up.parameters(), lr=0.1)
    outer = Outer("outer", up, up_opt, train_data_loader=data)
    grads = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [outer, inner],
        {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        mlopt.EngineConfig(train_iters=12, strategy="cpu", seed=0),
    )
    return engine, grads


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5),
        lambda p: torch.optim.Adam(p, lr=0.05),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_checkpoint_replays_dropout_schedules_and_learned_inputs(optimizer):
    """Two meta-updates of an MLP: every checkpointed gradient equals plain reverse's."""
    results = {}
    for checkpoint in (None, 1, 2, 4, 0.3, "auto"):
        torch.manual_seed(123)
        engine, grads = _mlp_program(Reverse(checkpoint=checkpoint), optimizer)
        engine.run()
        results[checkpoint] = grads
    assert len(results[None]) == 2
    for checkpoint in (1, 2, 4, 0.3, "auto"):
        for got, want in zip(results[checkpoint], results[None], strict=True):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert results[None][0][0].abs().max() > 1e-3  # the learned input scale gets a gradient


@pytest.mark.parametrize(
    ("checkpoint", "recomputed"),
    # 6 updates per window, 2 windows: the last segment keeps its graph (k=4: 4 of 6 replayed)
    [(None, 0), (1, 5), (2, 4), (4, 4), (6, 0), (50, 0)],
)
def test_last_segment_is_not_replayed(checkpoint, recomputed):
    engine, _ = _mlp_program(Reverse(checkpoint=checkpoint), lambda p: torch.optim.SGD(p, lr=0.2))
    Inner.calls = 0
    engine.run()
    assert Inner.calls == 12 + 2 * recomputed


def test_budget_schedule_fits_its_model_and_replays_least():
    for n, budget, cost in [(200, 0.4, 1.0), (200, 0.5, 5.0), (50, 0.5, 1.0), (7, 0.8, 1.0)]:
        k, live = budget_schedule(n, budget, cost)
        assert k == live and 1 <= live <= n

        def peak(L, n=n, cost=cost):
            return L + cost * (-(-(n - L) // L) + 2)

        assert peak(live) <= budget * (n + 2 * cost)
        assert live == n or peak(live + 1) > budget * (n + 2 * cost)
    assert budget_schedule(100, 0.01, 1.0) == (10, 10)  # nothing fits: minimum memory
    assert budget_schedule(5, 1.0, 0.0) == (5, 5)  # free starts: all live


def test_schedule_segments_and_live_tail():
    s = schedule(3, 10, None)  # segments [0, 3), [3, 6), [6, 9) replayed, [9] live
    assert (s.segment, s.live_from) == (3, 9)
    assert [t for t in range(10) if s.records(t)] == list(range(9))
    assert [s.ends(r, t) for r, t in [(3, 2), (2, 7), (1, 8)]] == [True, False, True]
    assert schedule(3, 10, 4).live_from == 7  # truncated at 4: [4, 7) replayed, [7, 10) live
    assert schedule(None, 10, None) is None
    auto = schedule("auto", 200, None)
    assert auto.budget == 0.4 and not auto.calibrated
    auto.calibrate(start_bytes=500, update_bytes=100.0)  # measured: a start costs 5 updates
    assert auto.calibrated and (auto.segment, 200 - auto.live_from) == budget_schedule(200, 0.4, 5)
    fixed = Schedule(4, 8)
    fixed.calibrate(1, 1.0)
    assert (fixed.segment, fixed.live_from, fixed.calibrated) == (4, 8, False)


def test_budget_is_calibrated_by_the_first_replay():
    engine, _ = _mlp_program(Reverse(checkpoint=0.3), lambda p: torch.optim.SGD(p, lr=0.2))
    engine.run()
    plan = engine.plan.problems["inner"].checkpoint
    assert plan.calibrated and plan.segment >= 1 and plan.live_from <= 6


def test_graph_bytes_excludes_held_storages():
    a, b = torch.ones(4), torch.ones(2, dtype=F64)
    saved = {a.untyped_storage().data_ptr(): 16, b.untyped_storage().data_ptr(): 16}
    assert graph_bytes(saved, (a[1:],)) == 16  # a view holds its base's storage


def test_state_tensors_round_trip():
    state = [{"exp_avg": torch.ones(2), "exp_avg_sq": torch.zeros(2), "step": torch.tensor(3.0)}]
    keys, flat = state_tensors(state)
    assert keys == [["exp_avg", "exp_avg_sq"]] and len(flat) == 2
    new = rebuild_state(state, keys, (torch.full((2,), 5.0), torch.full((2,), 6.0)))
    assert new[0]["step"] is state[0]["step"] and float(new[0]["exp_avg_sq"][0]) == 6.0


def test_checkpoint_bad_input():
    for bad in (0, 1.0, 0.0, 1.5, "fast", True):
        with pytest.raises(mlopt.ConfigError, match="checkpoint must be None or an integer >= 1"):
            Reverse(checkpoint=bad)
    q = QuadraticBilevel.random(n=3, m=3, seed=1)
    from helpers import QuadLower, QuadUpper, Vector

    mods = [Vector(torch.zeros(3)) for _ in range(3)]
    top = QuadUpper(q, "mid", name="top", module=mods[0], optimizer=None)
    mid = QuadLower(
        q,
        "top",
        name="mid",
        module=mods[1],
        optimizer=torch.optim.SGD(mods[1].parameters(), lr=0.1),
        config=mlopt.Config(type=Reverse(checkpoint=2), unroll_steps=2),
    )
    low = QuadLower(
        q,
        "mid",
        name="low",
        module=mods[2],
        optimizer=torch.optim.SGD(mods[2].parameters(), lr=0.1),
        config=mlopt.Config(type="reverse", unroll_steps=2),
    )
    mods[0].weight.requires_grad_(False)
    with pytest.raises(mlopt.ConfigError, match="replays its updates in the backward pass"):
        mlopt.Engine(
            [top, mid, low],
            {"u2l": {top: [mid], mid: [low]}, "l2u": {mid: [top], low: [mid]}},
            mlopt.EngineConfig(train_iters=4, strategy="cpu"),
        )
