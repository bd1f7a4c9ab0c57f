"""Every bad input of DESIGN.md section 6 fails before training with a clear message."""

import pytest
import torch
from torch import nn

import mlopt
from mlopt import ConfigError, DependencyError, HypergradientError, MLOptError


class P(mlopt.Problem):
    def training_step(self, batch):
        return (self.module.weight**2).sum()


def prob(name, cfg=None, opt="sgd", module=True):
    m = nn.Linear(2, 1, bias=False)
    if opt == "sgd":
        o = torch.optim.SGD(m.parameters(), lr=0.1)
    elif opt is None:
        o = None
    else:
        o = opt(m.parameters())
    return P(name, m if module else None, o, config=cfg)


def engine(problems, deps, **kw):
    return mlopt.Engine(problems, deps, mlopt.EngineConfig(train_iters=1, **kw))


def test_errors_are_value_errors():
    for cls in (DependencyError, ConfigError, HypergradientError):
        assert issubclass(cls, MLOptError) and issubclass(cls, ValueError)


def test_cycle_in_l2u():
    a, b = prob("a"), prob("b")
    with pytest.raises(DependencyError, match=r"cycle a -> b -> a|cycle b -> a -> b"):
        engine([a, b], {"l2u": {a: [b], b: [a]}})


def test_name_used_twice():
    with pytest.raises(DependencyError, match="two problems are named 'a'"):
        engine([prob("a"), prob("a")], {})


def test_problem_missing_from_problems():
    a, b = prob("a"), prob("b")
    with pytest.raises(DependencyError, match="'b' appears in dependencies.*not in problems"):
        engine([a], {"u2l": {a: [b]}, "l2u": {b: [a]}})


def test_u2l_without_l2u_path_back():
    a, b = prob("a"), prob("b")
    with pytest.raises(
        DependencyError, match=r"no l2u path back from 'b' to 'a'.*Add \{'b': \['a'\]\}"
    ):
        engine([a, b], {"u2l": {a: [b]}})


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown hypergradient method 'rev'.*'reverse'"):
        mlopt.Config(type="rev")


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_bad_unroll_steps(value):
    with pytest.raises(ConfigError, match="unroll_steps must be an integer >= 1"):
        mlopt.Config(unroll_steps=value)


def test_unsupported_optimizer_in_differentiable_mode():
    up = prob("up")
    low = prob("low", mlopt.Config(type="reverse"), opt=lambda ps: torch.optim.RMSprop(ps, lr=0.1))
    with pytest.raises(ConfigError, match=r"RMSprop.*SGD.*Adam.*AdamW"):
        engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}})


def test_unsupported_optimizer_is_fine_for_non_differentiable_methods():
    up = prob("up")
    low = prob(
        "low", mlopt.Config(type="first_order"), opt=lambda ps: torch.optim.RMSprop(ps, lr=0.1)
    )
    engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}}).run()


def test_trainable_parameters_without_optimizer():
    with pytest.raises(ConfigError, match="problem 'a' has trainable parameters.*no optimizer"):
        engine([prob("a", opt=None)], {})


def test_training_step_returning_non_scalar():
    class Bad(mlopt.Problem):
        def training_step(self, batch):
            return self.module.weight * 2

    m = nn.Linear(2, 1, bias=False)
    bad = Bad("bad", m, torch.optim.SGD(m.parameters(), lr=0.1))
    e = engine([bad], {})
    before = m.weight.detach().clone()
    with pytest.raises(
        ConfigError, match=r"problem 'bad': training_step must return a scalar.*\(1, 2\)"
    ):
        e.run()
    assert torch.equal(m.weight, before)  # nothing was updated


def test_training_step_not_overridden():
    m = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="does not override training_step"):
        engine([mlopt.Problem("p", m, torch.optim.SGD(m.parameters(), lr=0.1))], {})


def test_non_finite_loss_raises_with_problem_and_step():
    class Nan(mlopt.Problem):
        def training_step(self, batch):
            return (self.module.weight**2).sum() * float("nan")

    m = nn.Linear(2, 1, bias=False)
    p = Nan("nanny", m, torch.optim.SGD(m.parameters(), lr=0.1))
    before = m.weight.detach().clone()
    with pytest.raises(HypergradientError, match=r"problem 'nanny', step 0: non-finite loss"):
        engine([p], {}).run()
    assert torch.equal(m.weight, before)


def test_non_finite_can_skip_with_warning():
    class Nan(mlopt.Problem):
        def training_step(self, batch):
            return (self.module.weight**2).sum() * float("nan")

    m = nn.Linear(2, 1, bias=False)
    p = Nan(
        "nanny",
        m,
        torch.optim.SGD(m.parameters(), lr=0.1),
        config=mlopt.Config(on_nonfinite="skip"),
    )
    before = m.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite loss; update skipped"):
        engine([p], {}).run()
    assert torch.equal(m.weight, before)


def test_initialize_from_must_be_an_upper_with_same_shapes():
    up = prob("up")
    low = prob("low", mlopt.Config(initialize_from="ghost"))
    with pytest.raises(ConfigError, match="initialize_from='ghost' is not a problem"):
        engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}})
    m = nn.Linear(3, 1, bias=False)
    other = P("other", m, torch.optim.SGD(m.parameters(), lr=0.1))
    low = prob("low", mlopt.Config(initialize_from="other"))
    with pytest.raises(ConfigError, match="same trainable parameter names and shapes"):
        engine([other, low], {"u2l": {other: [low]}, "l2u": {low: [other]}})


def test_reptile_needs_initialize_from():
    up, low = prob("up"), prob("low", mlopt.Config(type="reptile"))
    with pytest.raises(ConfigError, match="reptile.*initialize_from"):
        engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "tpu"}, "strategy must be one of"),
        ({"logger_type": "csv"}, "logger_type must be one of"),
        ({"early_stopping": True}, "early_stopping needs validation"),
        ({"checkpoint_step": 5}, "checkpoint_dir is None"),
        ({"train_iters": -1}, "train_iters must be an integer >= 0"),
    ],
)
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        mlopt.EngineConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"gradient_clipping": -1.0}, "gradient_clipping must be a finite number >= 0"),
        ({"resample": "epoch"}, "resample must be one of"),
        ({"type": mlopt.hypergrad.Reverse}, None),
    ],
)
def test_bad_config(kwargs, match):
    if match is None:
        assert mlopt.Config(**kwargs).type.name == "reverse"
        return
    with pytest.raises(ConfigError, match=match):
        mlopt.Config(**kwargs)


def test_bad_problem_arguments():
    with pytest.raises(ConfigError, match="must be a Python identifier"):
        P("my problem")
    with pytest.raises(ConfigError, match="module must be a torch.nn.Module"):
        P("p", module="net")
    with pytest.raises(ConfigError, match="optimizer must be a torch.optim.Optimizer"):
        P("p", nn.Linear(1, 1), optimizer="sgd")


def test_unknown_problem_attribute_lists_problems():
    a = prob("a")
    engine([a], {})
    with pytest.raises(AttributeError, match=r"no attribute 'b'; problems are \['a'\]"):
        _ = a.b


def test_optimizer_over_foreign_tensors():
    m = nn.Linear(2, 1)
    stray = nn.Parameter(torch.zeros(1))
    p = P("p", m, torch.optim.SGD([*m.parameters(), stray], lr=0.1))
    with pytest.raises(ConfigError, match="not parameters of its module"):
        engine([p], {})
