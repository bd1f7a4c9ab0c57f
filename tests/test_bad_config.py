"""Bad configuration: every wrong option fails at construction (or Engine build) with a
ConfigError naming the option, the value and the fix; a compiled config cannot change."""

import math
import os

import pytest
import torch
from torch import nn

import mlopt
from mlopt import ConfigError
from mlopt.hypergrad import CG, FiniteDifference, FixedPoint, Forward, Neumann, Reverse


class P(mlopt.Problem):
    def training_step(self, batch):
        return (self.module.weight**2).sum()


def make(name="p", **kw):
    m = nn.Linear(2, 1, bias=False)
    return P(name, m, torch.optim.SGD(m.parameters(), lr=0.1), **kw)


# ---------------------------------------------------------------------- EngineConfig
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_iters": -1}, r"train_iters must be an integer >= 0, got -1"),
        ({"train_iters": 1.5}, r"train_iters must be an integer >= 0, got 1.5"),
        ({"train_iters": True}, r"train_iters must be an integer >= 0, got True"),
        ({"valid_step": -1}, r"valid_step must be an integer >= 0"),
        ({"checkpoint_step": "5"}, r"checkpoint_step must be an integer >= 0, got '5'"),
        ({"early_stopping_patience": 0}, r"early_stopping_patience must be an integer >= 1"),
        ({"logger_type": "csv"}, r"logger_type must be one of \['none', 'tensorboard'"),
        ({"strategy": "tpu"}, r"strategy must be one of \['default', 'cpu', 'cuda', 'ddp', 'zero'"),
        ({"early_stopping_mode": "avg"}, r"early_stopping_mode must be one of \['min', 'max'\]"),
        ({"progress": "false"}, r"progress must be True or False, got 'false' \(str\).*switch"),
        ({"early_stopping": "yes"}, r"early_stopping must be True or False, got 'yes'"),
        ({"roll_back": "false"}, r"roll_back must be True or False, got 'false'.*switch it on"),
        ({"roll_back": 1}, r"roll_back must be True or False, got 1 \(int\)"),
        ({"log_dir": ""}, r"log_dir must be a non-empty string"),
        ({"early_stopping_metric": ""}, r"early_stopping_metric must be a non-empty string"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"seed": 1.5}, r"seed must be an integer >= 0, got 1.5"),
        ({"device": "gpu0"}, r"device='gpu0' is not a device; use e.g. 'cpu', 'cuda'"),
        ({"device": 3.5}, r"device=3.5 is not a device"),
        ({"device": "meta"}, r"device='meta': mlopt runs on 'cpu', 'cuda' or 'mps'"),
        ({"checkpoint_dir": ""}, r"checkpoint_dir must be a non-empty string"),
        ({"early_stopping": True}, r"early_stopping needs validation: set valid_step > 0"),
        ({"checkpoint_step": 5}, r"checkpoint_step is set but checkpoint_dir is None"),
        ({"resume": 3}, r"resume must be a checkpoint path or True, got 3"),
        ({"resume": ""}, r"resume='' is empty; give a checkpoint path, True"),
        ({"resume": True}, r"resume=True needs checkpoint_dir"),
    ],
)
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ConfigError, match=r"EngineConfig: " + match):
        mlopt.EngineConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_on_a_machine_without_one():
    with pytest.raises(ConfigError, match=r"device='cuda:1' but this machine has 0 CUDA"):
        mlopt.EngineConfig(device="cuda:1")


def test_checkpoint_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    cfg = mlopt.EngineConfig(train_iters=1, checkpoint_dir=str(path))
    with pytest.raises(ConfigError, match=r"checkpoint_dir=.*file' is a file, not a directory"):
        mlopt.Engine([make()], {}, cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_checkpoint_dir_that_is_not_writable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        cfg = mlopt.EngineConfig(train_iters=1, checkpoint_dir=str(folder))
        with pytest.raises(ConfigError, match=r"checkpoint_dir=.*ro'.*cannot"):
            mlopt.Engine([make()], {}, cfg)
    finally:
        folder.chmod(0o700)


def test_engine_config_of_the_wrong_type():
    with pytest.raises(
        ConfigError, match=r"config must be a mlopt.EngineConfig, got <class 'dict'>"
    ):
        mlopt.Engine([make()], {}, {"train_iters": 1})


# ---------------------------------------------------------------------- Config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"unroll_steps": 0}, r"unroll_steps must be an integer >= 1, got 0"),
        ({"unroll_steps": -1}, r"unroll_steps must be an integer >= 1, got -1"),
        ({"unroll_steps": 1.5}, r"unroll_steps must be an integer >= 1, got 1.5"),
        ({"unroll_steps": True}, r"unroll_steps must be an integer >= 1, got True"),
        ({"gradient_accumulation": 0}, r"gradient_accumulation must be an integer >= 1"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0"),
        ({"log_step": -2}, r"log_step must be an integer >= 0"),
        ({"precision": "fp8"}, r"precision must be one of \['fp32', 'fp16', 'bf16'\]"),
        ({"on_nonfinite": "ignore"}, r"on_nonfinite must be one of \['raise', 'skip'\]"),
        ({"gradient_clipping": -1.0}, r"gradient_clipping must be a finite number >= 0"),
        ({"gradient_clipping": math.nan}, r"gradient_clipping must be a finite number >= 0"),
        ({"gradient_clipping": math.inf}, r"gradient_clipping must be a finite number >= 0"),
        ({"gradient_clipping": "1"}, r"gradient_clipping must be a finite number >= 0"),
        ({"options": [1]}, r"options must be a dict, got list"),
        ({"initialize_from": 3}, r"initialize_from must be the name of an upper problem"),
        ({"resample": "epoch"}, r"resample must be one of \['step', 'window'\]"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=r"Config: " + match):
        mlopt.Config(**kwargs)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown hypergradient method 'rev'.*'reverse'"):
        mlopt.Config(type="rev")


def test_method_of_the_wrong_kind():
    with pytest.raises(ConfigError, match=r"Config.type must be a method name .* got 3"):
        mlopt.Config(type=3)


def test_method_class_is_instantiated():
    assert mlopt.Config(type=Reverse).type.name == "reverse"


def test_initialize_from_a_problem_object_becomes_its_name():
    assert mlopt.Config(initialize_from=make("up")).initialize_from == "up"


# ---------------------------------------------------------------------- method options
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: CG(iterations=0), r"CG: iterations must be an integer >= 1, got 0"),
        (lambda: CG(iterations=2.0), r"CG: iterations must be an integer >= 1, got 2.0"),
        (lambda: CG(tol=math.nan), r"CG: tol must be a finite number >= 0, got nan"),
        (lambda: CG(tol=-1e-3), r"CG: tol must be a finite number >= 0"),
        (lambda: CG(damping=math.inf), r"CG: damping must be a finite number >= 0, got inf"),
        (lambda: CG(damping=-1.0), r"CG: damping must be a finite number >= 0"),
        (lambda: Neumann(alpha=0.0), r"Neumann: alpha must be a finite number > 0, got 0.0"),
        (lambda: Neumann(alpha=math.nan), r"Neumann: alpha must be a finite number > 0"),
        (lambda: Neumann(iterations=1.5), r"Neumann: iterations must be an integer >= 1"),
        (lambda: FixedPoint(tol=math.inf), r"FixedPoint: tol must be a finite number >= 0"),
        (lambda: FixedPoint(iterations=0), r"FixedPoint: iterations must be an integer >= 1"),
        (lambda: FiniteDifference(epsilon=0.0), r"FiniteDifference: epsilon must be a finite"),
        (lambda: FiniteDifference(epsilon=math.nan), r"FiniteDifference: epsilon must be a fin"),
        (lambda: Forward(chunk_size=0), r"Forward: chunk_size must be an integer >= 1"),
        (lambda: Reverse(truncate=0), r"Reverse: truncate must be None or an integer >= 1"),
        (lambda: Reverse(checkpoint=-1), r"Reverse: checkpoint must be None or an integer >= 1"),
        (lambda: Reverse(truncate=True), r"Reverse: truncate must be None or an integer >= 1"),
    ],
)
def test_bad_method_options(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


class DuckBadFlag:
    differentiable_unroll = "yes"

    def vjp(self, ctx, cotangent):
        return cotangent


class DuckNoHooks:
    def vjp(self, ctx, cotangent):
        return cotangent


def test_duck_typed_method_with_a_non_boolean_flag():
    with pytest.raises(ConfigError, match=r"\['differentiable_unroll'\] must be True or False"):
        mlopt.Config(type=DuckBadFlag())


def test_duck_typed_method_without_the_runtime_hooks():
    with pytest.raises(
        ConfigError, match=r"has vjp\(\) but lacks \['direct_gradient'.*subclass mlopt"
    ):
        mlopt.Config(type=DuckNoHooks())


# ---------------------------------------------------------------------- kept valid
def test_config_cannot_change_once_compiled():
    cfg = mlopt.Config(unroll_steps=1)
    p = make(config=cfg)
    ecfg = mlopt.EngineConfig(train_iters=1)
    mlopt.Engine([p], {}, ecfg)
    with pytest.raises(ConfigError, match=r"problem 'p': Config.unroll_steps cannot change"):
        cfg.unroll_steps = 5
    with pytest.raises(ConfigError, match=r"EngineConfig.train_iters cannot change.*before"):
        ecfg.train_iters = 5
    assert cfg.unroll_steps == 1 and ecfg.train_iters == 1


def test_config_changed_into_an_invalid_state_before_the_engine_is_refused():
    cfg = mlopt.Config()
    cfg.unroll_steps = 0  # allowed until compiled, then validated again
    with pytest.raises(ConfigError, match=r"unroll_steps must be an integer >= 1, got 0"):
        mlopt.Engine([make(config=cfg)], {}, mlopt.EngineConfig(train_iters=1))


def test_engine_config_flag_changed_to_a_string_before_the_engine_is_refused():
    ecfg = mlopt.EngineConfig(train_iters=1)
    ecfg.roll_back = "false"
    with pytest.raises(ConfigError, match=r"roll_back must be True or False, got 'false'"):
        mlopt.Engine([make()], {}, ecfg)


# ---------------------------------------------------------------------- Problem arguments
@pytest.mark.parametrize(
    "name, match",
    [
        ("my problem", r"must be a Python identifier.*got 'my problem'"),
        (3, r"must be a Python identifier.*got 3"),
        ("class", r"must be a Python identifier.*got 'class'"),
        ("", r"must be a Python identifier"),
        ("_low", r"'_low' would shadow a private attribute.*choose another name, e.g. 'low_pr"),
        ("__dict__", r"'__dict__' would shadow a private attribute"),
        ("module", r"'module' would shadow Problem.module.*e.g. 'module_problem'"),
        ("parameters", r"'parameters' would shadow Problem.parameters"),
        ("training_step", r"'training_step' would shadow Problem.training_step"),
        ("config", r"'config' would shadow Problem.config"),
        ("name", r"'name' would shadow Problem.name"),
        ("optimizer", r"'optimizer' would shadow Problem.optimizer"),
        ("train_data_loader", r"'train_data_loader' would shadow"),
    ],
)
def test_bad_problem_name(name, match):
    with pytest.raises(ConfigError, match=match):
        P(name)


def test_bad_problem_arguments():
    with pytest.raises(ConfigError, match=r"problem 'p': module must be a torch.nn.Module"):
        P("p", module="net")
    with pytest.raises(ConfigError, match=r"problem 'p': optimizer must be a torch.optim.Opt"):
        P("p", nn.Linear(1, 1), optimizer="sgd")
    with pytest.raises(ConfigError, match=r"problem 'p': config must be a mlopt.Config"):
        P("p", config={"unroll_steps": 2})


@pytest.mark.parametrize(
    "loader, match",
    [
        (3, r"train_data_loader must be an iterable of batches .*got int"),
        (
            (x for x in range(3)),
            r"train_data_loader is a one-shot iterator \(generator\).*Pass a re-iterable",
        ),
        (
            iter([1, 2]),
            r"train_data_loader is a one-shot iterator \(list_iterator\).*Pass a re-iterable",
        ),
    ],
)
def test_bad_loader(loader, match):
    with pytest.raises(ConfigError, match=r"problem 'p': " + match):
        make(train_data_loader=loader)


def test_bad_scheduler():
    class NoState:
        def step(self):
            pass

    with pytest.raises(
        ConfigError, match=r"problem 'p': scheduler NoState lacks \['state_dict', 'load_state"
    ):
        make(scheduler=NoState())
    with pytest.raises(ConfigError, match=r"scheduler str lacks \['step'.*torch.optim.lr_sch"):
        make(scheduler="cosine")
