"""Vectorized meta-batches: vmap == loop == Engine bilevel path == hand-written autograd, in
float64, including a Conv4 with (transductive) batch normalization."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.data import Task, meta_batch
from mlopt.meta import (
    MetaSGD,
    adapt,
    choose_mode,
    maml_task_loss,
    map_tasks,
    meta_gradients,
    reptile_task_gradient,
)
from mlopt.meta.vectorize import auto_chunk_size, forget_measurements
from mlopt.models import Conv4
from mlopt.testing import capture_gradients

F64 = torch.float64
B, WAYS, STEPS, LR = 3, 3, 2, 0.3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small-op autograd on two shared cores stalls; one thread is several times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv4(seed=0):
    torch.manual_seed(seed)
    return Conv4(1, WAYS, hidden=4, image_size=16).to(F64)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, WAYS)).to(F64)


def tasks_for(net, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, 16) if isinstance(net, Conv4) else (6,)
    out = []
    for _ in range(n):
        sx = torch.randn(2 * WAYS, *shape, generator=g, dtype=F64)
        qx = torch.randn(3 * WAYS, *shape, generator=g, dtype=F64)
        out.append(Task(sx, torch.arange(WAYS).repeat(2), qx, torch.arange(WAYS).repeat(3)))
    return out


def reference(net, tasks, steps=STEPS, lr=LR, first_order=False, adapted=None, lrs=None):
    """Hand-unrolled MAML with torch.autograd, averaged over tasks (lrs: Meta-SGD tensors)."""
    names = [n for n, _ in net.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in net.parameters()]
    lr_leaves = None if lrs is None else [t.detach().clone().requires_grad_() for t in lrs]
    total = None
    for sx, sy, qx, qy in tasks:
        fast = list(leaves)
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, fast)), sx), sy)
            idx = [i for i, n in enumerate(names) if adapted is None or n in adapted]
            grads = torch.autograd.grad(loss, [fast[i] for i in idx], create_graph=not first_order)
            for i, g in zip(idx, grads):
                rate = lr if lr_leaves is None else lr_leaves[i]
                fast[i] = fast[i] - rate * g
        q = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, fast)), qx), qy)
        wrt = leaves + (lr_leaves or [])
        gs = torch.autograd.grad(q, wrt, allow_unused=True)
        gs = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, gs)]
        total = gs if total is None else [a + b for a, b in zip(total, gs)]
    return [t / len(tasks) for t in total]


class TaskLearner(mlopt.Problem):
    def training_step(self, task):
        sx, sy, _, _ = task
        return F.cross_entropy(self(sx), sy)


class MetaLearner(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        return F.cross_entropy(self.task(qx), qy)


def engine_gradient(net, tasks, method="reverse", steps=STEPS):
    """The bilevel Engine path (lower initialize_from upper, gradient_accumulation=B)."""
    meta_net, inner_net = copy.deepcopy(net), copy.deepcopy(net)
    task = TaskLearner(
        "task",
        inner_net,
        torch.optim.SGD(inner_net.parameters(), lr=LR),
        train_data_loader=tasks,
        config=mlopt.Config(type=method, unroll_steps=steps, initialize_from="meta"),
    )
    opt = torch.optim.SGD(meta_net.parameters(), lr=0.0)
    meta = MetaLearner("meta", meta_net, opt, config=mlopt.Config(gradient_accumulation=len(tasks)))
    seen = capture_gradients(opt)
    mlopt.Engine(
        [meta, task],
        {"u2l": {meta: [task]}, "l2u": {task: [meta]}},
        mlopt.EngineConfig(train_iters=steps * len(tasks), strategy="cpu"),
    ).run()
    assert len(seen) == 1
    return seen[0]


def close(got, expected, atol=1e-10):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


@pytest.mark.parametrize("make", [conv4, mlp], ids=["conv4_batchnorm", "mlp"])
def test_maml_vmap_equals_loop_equals_engine_equals_autograd(make):
    net = make()
    tasks = tasks_for(net)
    stacked = meta_batch(tasks)
    params = dict(net.named_parameters())
    fn = maml_task_loss(net, STEPS, LR)
    expected = reference(net, tasks)
    for mode in ("vmap", "loop"):
        out = meta_gradients(fn, params, stacked, mode=mode, has_aux=True)
        close(list(out.gradients.values()), expected)
    close(engine_gradient(net, tasks), expected)
    # the meta-loss is the mean query loss at the adapted weights
    losses = [fn(params, t)[0] for t in tasks]
    torch.testing.assert_close(out.loss, torch.stack(losses).mean().detach(), rtol=0, atol=1e-12)


def test_fomaml_vmap_equals_engine_first_order():
    net = conv4()
    tasks = tasks_for(net)
    expected = reference(net, tasks, first_order=True)
    fn = maml_task_loss(net, STEPS, LR, first_order=True)
    out = meta_gradients(
        fn, dict(net.named_parameters()), meta_batch(tasks), mode="vmap", has_aux=True
    )
    close(list(out.gradients.values()), expected)
    close(engine_gradient(net, tasks, method="first_order"), expected)


def test_anil_adapts_the_head_only():
    net = conv4()
    tasks = tasks_for(net)
    head = ["head.weight", "head.bias"]
    expected = reference(net, tasks, adapted=head)
    fn = maml_task_loss(net, STEPS, LR, adapted=head)
    for mode in ("vmap", "loop"):
        out = meta_gradients(
            fn, dict(net.named_parameters()), meta_batch(tasks), mode=mode, has_aux=True
        )
        close(list(out.gradients.values()), expected)


def test_meta_sgd_learned_rates_vmap_and_reference():
    net = mlp()
    meta = MetaSGD(net, init_lr=0.2).to(F64)
    with torch.no_grad():  # distinct rates per element
        for t in meta.lrs:
            t.uniform_(0.05, 0.4, generator=torch.Generator().manual_seed(3))
    tasks = tasks_for(net)
    params = {f"model.{n}": p for n, p in net.named_parameters()}
    params.update({f"lrs.{i}": t for i, t in enumerate(meta.lrs)})
    names = [n for n, _ in net.named_parameters()]

    def forward(p, x):
        return torch.func.functional_call(net, {n: p[f"model.{n}"] for n in names}, x)

    def rates(p):
        return {f"model.{n}": p[f"lrs.{i}"] for i, n in enumerate(names)}

    fn = maml_task_loss(
        net, STEPS, rates, forward=forward, model_keys=[f"model.{n}" for n in names]
    )
    expected = reference(net, tasks, lrs=list(meta.lrs))
    for mode in ("vmap", "loop"):
        out = meta_gradients(fn, params, meta_batch(tasks), mode=mode, has_aux=True)
        close(list(out.gradients.values()), expected)


def test_meta_sgd_rate_gradient_closed_form():
    """One step on a linear model: dL_q/dα = -∇L_s(θ0) ⊙ ∇L_q(θ1) (Li et al. 2017)."""
    net = nn.Linear(4, 1, bias=False).to(F64)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 1, generator=g, dtype=F64)
    xq, yq = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64)
    alpha = torch.rand(1, 4, generator=g, dtype=F64)
    params = {"weight": net.weight.detach(), "lr": alpha}

    def fn(p, task):
        sx, sy, qx, qy = task
        fwd = lambda w, x: x @ w.T  # noqa: E731
        fast = adapt(
            lambda q: F.mse_loss(fwd(q["weight"], sx), sy), {"weight": p["weight"]}, 1, p["lr"]
        )
        return F.mse_loss(fwd(fast["weight"], qx), qy)

    out = meta_gradients(fn, params, tuple(t.unsqueeze(0) for t in (xs, ys, xq, yq)), mode="vmap")
    w0 = net.weight.detach()
    gs = 2 * ((xs @ w0.T - ys).T @ xs) / 5
    w1 = w0 - alpha * gs
    gq = 2 * ((xq @ w1.T - yq).T @ xq) / 6
    torch.testing.assert_close(out.gradients["lr"], -gs * gq, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        out.gradients["weight"],
        gq * (1 - alpha * 0) - (gq * alpha) @ (2 * xs.T @ xs / 5),
        rtol=0,
        atol=1e-12,
    )


def test_reptile_map_tasks_equals_engine_reptile():
    net = mlp()
    tasks = tasks_for(net)
    fn = reptile_task_gradient(net, STEPS, LR, use_query=False)
    for mode in ("vmap", "loop"):
        grads, _ = map_tasks(fn, dict(net.named_parameters()), meta_batch(tasks), mode=mode)
        mean = [g.mean(0) for g in grads.values()]
        close(mean, engine_gradient(net, tasks, method="reptile"))


def test_mode_choice_and_errors():
    assert choose_mode("auto", "cpu") == "loop"
    assert choose_mode("auto", torch.device("cuda")) == "vmap"
    with pytest.raises(mlopt.ConfigError, match="mode must be one of"):
        choose_mode("threads", "cpu")
    with pytest.raises(mlopt.ConfigError, match="leading task dimension"):
        meta_gradients(
            lambda p, t: p[0].sum(), (torch.ones(2),), (torch.ones(3, 2), torch.ones(4, 2))
        )
    with pytest.raises(mlopt.ConfigError, match="params must be a dict"):
        meta_gradients(lambda p, t: p.sum(), torch.ones(2), torch.ones(3, 2))


@pytest.mark.parametrize(
    ("mode", "chunk_size"),
    [("vmap", None), ("vmap", 1), ("vmap", 2), ("vmap", 3), ("loop", 2), ("auto", None)],
)
def test_chunked_and_measured_meta_batches_equal_the_loop(mode, chunk_size):
    net = conv4()
    tasks = tasks_for(net, n=5)
    stacked = meta_batch(tasks)
    params = dict(net.named_parameters())
    fn = maml_task_loss(net, STEPS, LR)
    expected = reference(net, tasks)
    out = meta_gradients(fn, params, stacked, mode=mode, chunk_size=chunk_size, has_aux=True)
    close(list(out.gradients.values()), expected)
    ref = meta_gradients(fn, params, stacked, mode="loop", chunk_size=5, has_aux=True)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.aux, ref.aux, rtol=0, atol=1e-12)
    mapped = map_tasks(lambda p, t: fn(p, t)[0], params, stacked, mode=mode, chunk_size=chunk_size)
    looped = torch.stack([fn(params, t)[0] for t in tasks])
    torch.testing.assert_close(mapped, looped, rtol=0, atol=1e-12)


def test_auto_mode_measures_once_per_function_and_shape():
    forget_measurements()
    calls = []

    def loss(p, t):
        calls.append(1)  # once per task in a loop, once per chunk under vmap
        return (p[0] * t).sum() ** 2

    p, tasks = (torch.ones(2, dtype=F64),), torch.randn(4, 2, dtype=F64)
    first = meta_gradients(loss, p, tasks, mode="auto", chunk_size=2)
    assert len(calls) in (1 + 2 + 1, 1 + 2 + 2)  # chunk 1 both ways, then chunk 2 one way
    calls.clear()
    again = meta_gradients(loss, p, tasks, mode="auto", chunk_size=2)
    assert len(calls) in (2, 4)  # remembered: no second measurement
    torch.testing.assert_close(first.gradients, again.gradients, rtol=0, atol=1e-12)
    calls.clear()
    meta_gradients(loss, (torch.ones(3, dtype=F64),), torch.randn(4, 3, dtype=F64), chunk_size=2)
    assert len(calls) in (4, 5)  # another shape is measured again
    calls.clear()
    meta_gradients(loss, p, tasks, mode="auto", chunk_size=1)
    assert len(calls) == 4  # chunks of one task: vmap and loop are the same, nothing measured
    forget_measurements()


def test_chunk_size_choice_and_errors():
    assert auto_chunk_size(16, 400e6, 2e9) == 5
    assert auto_chunk_size(16, 400e6, 1e6) == 1  # at least one task
    assert auto_chunk_size(16, 1.0, 1e9) == 16  # at most all of them
    assert auto_chunk_size(3, 0.0, 1.0) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(mlopt.ConfigError, match="chunk_size must be None or an integer"):
            meta_gradients(
                lambda p, t: p[0].sum() * t.sum(),
                (torch.ones(2),),
                torch.ones(3, 2),
                chunk_size=bad,
            )


class VectorizedMeta(mlopt.Problem):
    def __init__(self, *a, fn, mode, **k):
        super().__init__(*a, **k)
        self.fn, self.mode = fn, mode

    def training_step(self, tasks):
        params = self.named_parameters()
        out = meta_gradients(self.fn, params, tasks, mode=self.mode, has_aux=True)
        return {"loss": out.loss, "gradient": tuple(out.gradients[n] for n in params)}


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_vectorized_problem_in_an_engine_gives_the_same_update(mode):
    net = conv4()
    tasks = tasks_for(net)
    expected = reference(net, tasks)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    seen = capture_gradients(opt)
    p = VectorizedMeta(
        "meta",
        net,
        opt,
        train_data_loader=[meta_batch(tasks)],
        fn=maml_task_loss(net, STEPS, LR),
        mode=mode,
    )
    mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=1, strategy="cpu")).run()
    close(seen[0], expected)


class AnilHead(mlopt.Problem):
    """ANIL's lower: only the head adapts, on the upper's (meta-learned) features."""

    def training_step(self, task):
        sx, sy, _, _ = task
        return F.cross_entropy(self(self.meta.module.features(sx)), sy)


class AnilMeta(mlopt.Problem):
    def training_step(self, batch):
        _, _, qx, qy = self.task.batch
        return F.cross_entropy(self.task(self.module.features(qx)), qy)


def test_anil_engine_program_equals_reference():
    net = conv4()
    tasks = tasks_for(net)
    expected = reference(net, tasks, adapted=["head.weight", "head.bias"])
    meta_net = copy.deepcopy(net)
    head = copy.deepcopy(net.head)
    task = AnilHead(
        "task",
        head,
        torch.optim.SGD(head.parameters(), lr=LR),
        train_data_loader=tasks,
        config=mlopt.Config(unroll_steps=STEPS, initialize_from="meta.head"),
    )
    opt = torch.optim.SGD(meta_net.parameters(), lr=0.0)
    meta = AnilMeta("meta", meta_net, opt, config=mlopt.Config(gradient_accumulation=B))
    seen = capture_gradients(opt)
    mlopt.Engine(
        [meta, task],
        {"u2l": {meta: [task]}, "l2u": {task: [meta]}},
        mlopt.EngineConfig(train_iters=STEPS * B, strategy="cpu"),
    ).run()
    close(seen[0], expected)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_running_batch_norm_is_a_clear_error(mode):
    net = Conv4(1, WAYS, hidden=2, image_size=16, batch_norm="running").to(F64)
    tasks = meta_batch(tasks_for(conv4(), n=2))
    with pytest.raises(mlopt.ConfigError, match="batch_norm='transductive'"):
        meta_gradients(
            maml_task_loss(net, 1, LR), dict(net.named_parameters()), tasks, mode=mode, has_aux=True
        )
