"""Programs ported from Betty run as Betty meant them, or fail with the mlopt way in the message."""

import pytest
import torch
from torch import nn

import mlopt
from mlopt import ConfigError
from mlopt.migration import BETTY_CONFIG, BETTY_ENGINE_CONFIG, BETTY_HOOKS


# ---------------------------------------------------------------------- config names
@pytest.mark.parametrize("key", sorted(BETTY_CONFIG))
def test_every_betty_config_field_names_the_mlopt_way(key):
    with pytest.raises(ConfigError, match=rf"^Config: {key} is Betty's option; mlopt: "):
        mlopt.Config(**{key: 1})


@pytest.mark.parametrize("key", sorted(BETTY_ENGINE_CONFIG))
def test_every_betty_engine_config_field_names_the_mlopt_way(key):
    with pytest.raises(ConfigError, match=rf"^EngineConfig: {key} is Betty's option; mlopt: "):
        mlopt.EngineConfig(**{key: 1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cg_iterations": 5}, r"cg_iterations is Betty's option; mlopt: Config\(type=CG\(iter"),
        ({"neumann_alpha": 0.1}, r"mlopt: Config\(type=Neumann\(iterations=K, alpha=a\)\)"),
        ({"darts_alpha": 0.1}, r"mlopt: Config\(type=FiniteDifference\(epsilon=darts_alpha\)\)"),
        ({"first_order": True}, r"first_order is Betty's.*Config\(type='first_order'\) on the lo"),
        ({"fp16": True}, r"fp16 is Betty's option; mlopt: Config\(precision='fp16'\)"),
        ({"log_step": -1}, r"log_step=-1 is Betty's 'no logging'; in mlopt use log_step=0"),
        ({"unrol_steps": 2}, r"unknown option 'unrol_steps'; did you mean \['unroll_steps'"),
    ],
)
def test_betty_config_messages(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        mlopt.Config(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"early_stopping_tolerance": 3}, r"mlopt: EngineConfig\(early_stopping_patience=\.\.\.\)"),
        ({"distributed": True}, r"distributed is Betty's option; mlopt: .*strategy='ddp'"),
        ({"strategy": "distributed"}, r"got 'distributed' \('distributed' is Betty's; in mlopt: "),
        ({"strategy": "gpu"}, r"'gpu' is Betty's; in mlopt: strategy='cuda'"),
        ({"train_iter": 10}, r"EngineConfig got an unknown option 'train_iter'; .*'train_iters'"),
    ],
)
def test_betty_engine_config_messages(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        mlopt.EngineConfig(**kwargs)


def test_betty_zero_strategy_keeps_its_meaning():
    # Betty's strategy="zero" is DDP with ZeroRedundancyOptimizer: so is mlopt's
    assert mlopt.EngineConfig(strategy="zero").strategy == "zero"


def test_betty_fsdp_strategy_is_fully_shard_for_first_order_methods():
    from mlopt.migration import BETTY_STRATEGIES

    assert mlopt.EngineConfig(strategy="fsdp").strategy == "fsdp"
    assert "first_order" in BETTY_STRATEGIES["fsdp"] and "'zero'" in BETTY_STRATEGIES["fsdp"]


def test_too_many_positional_config_arguments():
    with pytest.raises(ConfigError, match=r"Config takes at most 11 arguments; pass options by"):
        mlopt.Config(*range(12))


# ---------------------------------------------------------------------- hooks
class Quad(mlopt.Problem):
    def training_step(self, batch):
        return ((self.module.weight - 3.0) ** 2).sum()


@pytest.mark.parametrize("hook", sorted(BETTY_HOOKS))
def test_betty_hooks_that_mlopt_does_not_call_are_refused(hook):
    cls = type("Ported", (Quad,), {hook: lambda self, *a: None})
    with pytest.raises(ConfigError, match=rf"problem 'p' defines {hook}\(\), Betty's hook: "):
        cls("p", nn.Linear(1, 1, bias=False))


def test_betty_configure_hooks_are_called_in_betty_order():
    calls = []

    class Configured(Quad):
        def configure_train_data_loader(self):
            calls.append("loader")
            return [torch.zeros(1)] * 2

        def configure_module(self):
            calls.append("module")
            return nn.Linear(1, 1, bias=False)

        def configure_optimizer(self):
            calls.append("optimizer")
            return torch.optim.SGD(self.module.parameters(), lr=0.25)

        def configure_scheduler(self):
            calls.append("scheduler")
            return torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=0.5)

    p = Configured("p")
    assert calls == ["loader", "module", "optimizer", "scheduler"]
    w0 = p.module.weight.detach().clone()
    mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=2)).run()
    # SGD at lr 0.25 then 0.125 on (w - 3)^2: w <- w - lr * 2 (w - 3)
    want = w0 - 0.25 * 2 * (w0 - 3)
    want = want - 0.125 * 2 * (want - 3)
    torch.testing.assert_close(p.module.weight.detach(), want)


def test_passed_arguments_win_over_configure_hooks():
    class Configured(Quad):
        def configure_module(self):
            raise AssertionError("not called: a module was passed")

    net = nn.Linear(1, 1, bias=False)
    assert Configured("p", net, torch.optim.SGD(net.parameters(), lr=0.1)).module.wrapped is net


def test_forward_on_a_problem_subclass_is_honoured():
    class Scaled(Quad):
        def forward(self, x):
            return 2 * self.module(x)

    net = nn.Linear(1, 1, bias=False)
    p = Scaled("p", net, torch.optim.SGD(net.parameters(), lr=0.1))
    x = torch.ones(1, 1)
    torch.testing.assert_close(p(x), 2 * net(x))
    torch.testing.assert_close(p.module(x), net(x))


def test_betty_argument_order_is_caught():
    net = nn.Linear(1, 1)
    with pytest.raises(ConfigError, match=r"got <class 'mlopt.config.Config'> \(mlopt's order is"):
        Quad("p", mlopt.Config(), net)


# ---------------------------------------------------------------------- window timing
class Task(mlopt.Problem):
    """½‖w - 3‖² with first-order MAML from 'meta'; records w before each update."""

    def training_step(self, batch):
        self.__dict__.setdefault("seen", []).append(self.module.weight.detach().clone())
        return 0.5 * ((self.module.weight - 3.0) ** 2).sum()

    def on_inner_loop_start(self):
        self.__dict__["starts"] = self.__dict__.get("starts", 0) + 1


class Meta(mlopt.Problem):
    def training_step(self, batch):
        return 0.5 * ((self.task.module.weight - 1.0) ** 2).sum()


def maml(method="first_order", iters=4, unroll=2, engine_cls=mlopt.Engine, **kw):
    up_net, low_net = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.constant_(up_net.weight, 0.5)
    meta = Meta("meta", up_net, torch.optim.SGD(up_net.parameters(), lr=0.1))
    cfg = mlopt.Config(type=method, unroll_steps=unroll, initialize_from="meta")
    task = Task("task", low_net, torch.optim.SGD(low_net.parameters(), lr=0.5), config=cfg)
    deps = {"u2l": {meta: [task]}, "l2u": {task: [meta]}}
    return engine_cls([meta, task], deps, mlopt.EngineConfig(train_iters=iters, **kw)), meta, task


def adapted(task):
    """The weight after the last recorded update: w - 0.5 (w - 3)."""
    w = task.seen[-1]
    return w - 0.5 * (w - 3.0)


@pytest.mark.parametrize("method", ["first_order", "reverse"])
def test_after_run_the_lower_holds_its_trained_weights(method):
    engine, meta, task = maml(method)
    engine.run()
    torch.testing.assert_close(task.module.weight.detach(), adapted(task), rtol=0, atol=1e-7)
    assert not torch.equal(task.module.weight, meta.module.weight)
    assert task.starts == 2  # at build, then at the first update of the second window


@pytest.mark.parametrize("method", ["first_order", "reverse"])
def test_validation_sees_the_trained_lower_through_engine_attributes(method):
    seen = []

    class Validating(mlopt.Engine):
        def validation(self):
            # Betty's habits: problems as self.<name>, the iteration as self.global_step
            seen.append((self.global_step, self.task.module.weight.detach().clone()))
            return {"w": float(self.task.module.weight)}

    engine, _, task = maml(method, iters=4, engine_cls=Validating, valid_step=2)
    engine.run()
    assert [step for step, _ in seen] == [2, 4]
    torch.testing.assert_close(seen[-1][1], adapted(task), rtol=0, atol=1e-7)
    assert engine.global_step == engine.iteration == 4


def test_the_next_window_starts_from_the_meta_parameters():
    engine, meta, task = maml("first_order", iters=3)
    engine.run()  # the third update starts window 2 from the meta-parameters after one step
    torch.testing.assert_close(task.seen[2], meta.module.weight.detach(), rtol=0, atol=0)


def test_unknown_engine_attribute_lists_the_problems():
    engine, *_ = maml()
    with pytest.raises(AttributeError, match=r"no attribute 'inner'; problems are \['meta', 'ta"):
        _ = engine.inner


@pytest.mark.parametrize("method", ["first_order", "reverse"])
def test_hook_changing_a_meta_initialized_lower_is_refused(method):
    class Resetting(Task):
        def on_inner_loop_start(self):
            with torch.no_grad():
                self.module.weight.zero_()

    up_net, low_net = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    meta = Meta("meta", up_net, torch.optim.SGD(up_net.parameters(), lr=0.1))
    cfg = mlopt.Config(type=method, initialize_from="meta")
    task = Resetting("task", low_net, torch.optim.SGD(low_net.parameters(), lr=0.5), config=cfg)
    with pytest.raises(
        ConfigError, match=r"problem 'task': on_inner_loop_start\(\) changed its parameters .*reset"
    ):
        mlopt.Engine([meta, task], {"u2l": {meta: [task]}, "l2u": {task: [meta]}})
    assert task.engine is None


def test_betty_style_reset_in_the_hook_works_for_a_persistent_lower():
    class Lower(mlopt.Problem):
        def training_step(self, batch):
            return 0.5 * ((self.module.weight - self.upper.module.weight) ** 2).sum()

        def on_inner_loop_start(self):  # Betty's way to restart the inner problem
            with torch.no_grad():
                self.module.weight.zero_()

    class Upper(mlopt.Problem):
        def training_step(self, batch):
            return 0.5 * ((self.lower.module.weight - 1.0) ** 2).sum()

    up_net, low_net = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    upper = Upper("upper", up_net, torch.optim.SGD(up_net.parameters(), lr=0.1))
    cfg = mlopt.Config(type="cg", unroll_steps=3)
    lower = Lower("lower", low_net, torch.optim.SGD(low_net.parameters(), lr=0.5), config=cfg)
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=4),
    )
    engine.run()  # window 2 restarted from 0: one SGD step towards the upper's weight
    phi = up_net.weight.detach()
    torch.testing.assert_close(low_net.weight.detach(), 0.5 * phi, rtol=0, atol=1e-7)
