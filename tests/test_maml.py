"""MAML's outer gradient through the Engine equals a hand-unrolled torch.autograd reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.testing import capture_gradients

F64 = torch.float64


def make_tasks(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        w = torch.randn(3, 1, generator=g, dtype=F64)
        xs, xq = (
            torch.randn(6, 3, generator=g, dtype=F64),
            torch.randn(5, 3, generator=g, dtype=F64),
        )
        tasks.append((xs, xs @ w, xq, xq @ w))
    return tasks


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)


class Inner(mlopt.Problem):
    def training_step(self, batch):
        xs, ys, _, _ = batch
        return F.mse_loss(self(xs), ys)


class Outer(mlopt.Problem):
    def training_step(self, batch):
        _, _, xq, yq = self.inner.batch
        return F.mse_loss(self.inner(xq), yq)


def adam_step(p, g, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    t = state.get("t", 0) + 1
    m = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * g
    v = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    state.update(t=t, m=m, v=v)
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * mhat / (vhat.sqrt() + eps)


def reference(net, tasks, inner_lr, steps, optimizer):
    names = [n for n, _ in net.named_parameters()]
    outer = list(net.parameters())
    total = [torch.zeros_like(p) for p in outer]
    for xs, ys, xq, yq in tasks:
        params = list(outer)
        states = [{} for _ in params]
        for _ in range(steps):
            loss = F.mse_loss(torch.func.functional_call(net, dict(zip(names, params)), (xs,)), ys)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            if optimizer == "sgd":
                params = [p - inner_lr * g for p, g in zip(params, grads)]
            else:
                params = [adam_step(p, g, s, inner_lr) for p, g, s in zip(params, grads, states)]
        q = F.mse_loss(torch.func.functional_call(net, dict(zip(names, params)), (xq,)), yq)
        for acc, g in zip(total, torch.autograd.grad(q, outer)):
            acc += g / len(tasks)
    return total


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["reverse", "first_order"])
def test_maml_outer_gradient_matches_hand_unrolled(optimizer, method):
    tasks = make_tasks()
    meta_net = mlp()
    ref_net = copy.deepcopy(meta_net)
    inner_net = copy.deepcopy(meta_net)
    inner_lr, steps = 0.1, 2
    inner_opt = (
        torch.optim.SGD(inner_net.parameters(), lr=inner_lr)
        if optimizer == "sgd"
        else torch.optim.Adam(inner_net.parameters(), lr=inner_lr)
    )
    inner = Inner(
        "inner",
        inner_net,
        inner_opt,
        train_data_loader=tasks,
        config=mlopt.Config(type=method, unroll_steps=steps, initialize_from="outer"),
    )
    outer_opt = torch.optim.SGD(meta_net.parameters(), lr=0.0)
    outer = Outer("outer", meta_net, outer_opt, config=mlopt.Config(gradient_accumulation=3))
    seen = capture_gradients(outer_opt)
    engine = mlopt.Engine(
        [outer, inner],
        {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        mlopt.EngineConfig(train_iters=steps * 3, strategy="cpu"),
    )
    engine.run()
    assert engine.step_counts == {"inner": 6, "outer": 3}
    assert len(seen) == 1  # one meta-update over the meta-batch of 3 tasks
    if method == "reverse":
        expected = reference(ref_net, tasks, inner_lr, steps, optimizer)
    else:  # FOMAML: gradient of the query loss at the adapted weights
        expected = fomaml_reference(ref_net, tasks, inner_lr, steps, optimizer)
    for got, exp in zip(seen[0], expected):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-10)


def fomaml_reference(net, tasks, inner_lr, steps, optimizer):
    names = [n for n, _ in net.named_parameters()]
    total = [torch.zeros_like(p) for p in net.parameters()]
    for xs, ys, xq, yq in tasks:
        params = [p.detach().clone().requires_grad_() for p in net.parameters()]
        states = [{} for _ in params]
        for _ in range(steps):
            loss = F.mse_loss(torch.func.functional_call(net, dict(zip(names, params)), (xs,)), ys)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if optimizer == "sgd":
                    params = [p - inner_lr * g for p, g in zip(params, grads)]
                else:
                    params = [
                        adam_step(p, g, s, inner_lr) for p, g, s in zip(params, grads, states)
                    ]
            params = [p.requires_grad_() for p in params]
        q = F.mse_loss(torch.func.functional_call(net, dict(zip(names, params)), (xq,)), yq)
        for acc, g in zip(total, torch.autograd.grad(q, params)):
            acc += g / len(tasks)
    return total


def test_reptile_gradient_is_init_minus_adapted():
    tasks = make_tasks(n_tasks=1)
    meta_net = mlp()
    inner_net = copy.deepcopy(meta_net)
    inner = Inner(
        "inner",
        inner_net,
        torch.optim.SGD(inner_net.parameters(), lr=0.1),
        train_data_loader=tasks,
        config=mlopt.Config(type="reptile", unroll_steps=3, initialize_from="outer"),
    )
    outer_opt = torch.optim.SGD(meta_net.parameters(), lr=0.0)
    outer = Outer("outer", meta_net, outer_opt)
    seen = capture_gradients(outer_opt)
    engine = mlopt.Engine(
        [outer, inner],
        {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
        mlopt.EngineConfig(train_iters=3, strategy="cpu"),
    )
    engine.run()
    # reference: three plain SGD steps from the meta-initialization on the task's support set
    net = copy.deepcopy(meta_net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    xs, ys, _, _ = tasks[0]
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(net(xs), ys).backward()
        opt.step()
    for got, init, adapted in zip(seen[0], meta_net.parameters(), net.parameters()):
        torch.testing.assert_close(got, (init - adapted).detach(), rtol=0, atol=1e-12)
