"""The optimizer fast path (mlopt.step.optimizer_step): the same update as ``optimizer.step()``,
bit for bit, taken only where torch's wrapper would do nothing (no hooks, no profiler)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import mlopt
from mlopt.step import clear_grads, optimizer_step

MAKERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True),
    "sgd-groups": lambda ps: torch.optim.SGD(
        [{"params": ps[:1], "lr": 0.3}, {"params": ps[1:], "momentum": 0.5}], lr=0.1
    ),
    "sgd-momentum-nesterov-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_fast_step_is_bitwise_the_wrapped_step(kind):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(4)]
    runs = []
    for fast in (False, True):
        ps = [nn.Parameter(t.clone()) for t in init]
        opt = MAKERS[kind](ps)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            if fast:
                assert optimizer_step(opt)
                clear_grads(opt)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ps)
        runs.append(([p.detach() for p in ps], opt.state_dict()))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert str(runs[0][1]) == str(runs[1][1])


def test_a_step_hook_takes_the_wrapped_step():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    p.grad = torch.ones(2)
    assert not optimizer_step(opt)
    assert calls == [1] and torch.equal(p.detach(), torch.full((2,), 0.5))


def test_a_global_hook_takes_the_wrapped_step():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(1))
    try:
        p.grad = torch.ones(2)
        assert not optimizer_step(opt)
    finally:
        handle.remove()
    assert calls == [1]


class Quad(mlopt.Problem):
    def training_step(self, batch):
        return ((self.module.weight - 3.0) ** 2).sum()


def _engine(scheduler: bool):
    m = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5) if scheduler else None
    p = Quad("p", m, opt, scheduler=sched)
    return mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=3)), opt


def test_the_profiler_still_sees_each_optimizer_step():
    engine, _ = _engine(False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.run()
    names = [e.name for e in prof.events()]
    assert sum("Optimizer.step#SGD.step" in n for n in names) == 3


def test_a_scheduler_steps_without_torch_order_warnings_on_the_fast_path():
    engine, opt = _engine(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.run()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3
