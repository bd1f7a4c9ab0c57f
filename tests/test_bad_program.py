"""Bad programs: a wrong graph, optimizer, training_step or problem wiring fails before training
(or at the first update, before anything changes) with an error naming the problem and the fix."""

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
    return mlopt.Engine(problems, deps, mlopt.EngineConfig(**{"train_iters": 1, **kw}))


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


# ---------------------------------------------------------------------- shared parameters
def bilevel(up, low):
    return {"u2l": {up: [low]}, "l2u": {low: [up]}}


def test_two_problems_over_one_module():
    m = nn.Linear(2, 1, bias=False)
    a = P("a", m, torch.optim.SGD(m.parameters(), lr=0.1))
    b = P("b", m, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(
        ConfigError, match=r"problems 'a' and 'b' share 1 trainable.*copy.deepcopy\(net\) for 'b'"
    ):
        engine([a, b], {})


def test_maml_with_the_same_module_for_both_levels():
    m = nn.Linear(2, 1, bias=False)
    up = P("meta", m, torch.optim.Adam(m.parameters(), lr=0.1))
    low = P(
        "task",
        m,
        torch.optim.SGD(m.parameters(), lr=0.1),
        config=mlopt.Config(initialize_from="meta"),
    )
    with pytest.raises(ConfigError, match=r"'meta' and 'task' share.*initialize_from"):
        engine([up, low], bilevel(up, low))


def test_one_shared_tensor_between_two_modules():
    shared = nn.Linear(2, 2)
    a_net, b_net = nn.Sequential(shared, nn.Linear(2, 1)), nn.Sequential(shared, nn.Linear(2, 1))
    a = P("a", a_net, torch.optim.SGD(a_net.parameters(), lr=0.1))
    b = P("b", b_net, torch.optim.SGD(b_net.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match=r"problems 'a' and 'b' share 2 trainable"):
        engine([a, b], {})


def test_shared_frozen_parameters_are_fine():
    backbone = nn.Linear(2, 2).requires_grad_(False)

    class Q(mlopt.Problem):
        def training_step(self, batch):
            return self.module(torch.ones(1, 2)).sum() ** 2

    nets = [nn.Sequential(backbone, nn.Linear(2, 1)) for _ in range(2)]
    probs = [
        Q(n, net, torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=0.1))
        for n, net in zip("ab", nets)
    ]
    engine(probs, {}).run()


# ---------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("method", ["reverse", "first_order", "cg"])
def test_closure_optimizers_are_refused_for_every_method(method):
    up = prob("up")
    low = prob("low", mlopt.Config(type=method), opt=lambda ps: torch.optim.LBFGS(ps))
    with pytest.raises(
        ConfigError, match=r"problem 'low': optimizer LBFGS needs a closure in step\(closure\)"
    ):
        engine([up, low], bilevel(up, low))


def test_closure_optimizer_on_a_single_level_problem():
    with pytest.raises(ConfigError, match=r"problem 'a': optimizer LBFGS needs a closure"):
        engine([prob("a", opt=lambda ps: torch.optim.LBFGS(ps))], {})


def test_scheduler_wrapped_optimizer_is_not_mistaken_for_a_closure_one():
    m = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    p = P("a", m, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))
    engine([p], {}).run()


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_unsupported_optimizer_error_names_the_problem(method):
    up = prob("up")
    low = prob("inner", mlopt.Config(type=method), opt=lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    with pytest.raises(
        ConfigError, match=rf"problem 'inner' \({method} unroll\): optimizer Adagrad cannot be"
    ):
        engine([up, low], bilevel(up, low))


# ---------------------------------------------------------------------- transactional Engine
def test_failed_engine_leaves_problems_unbound_and_configs_editable(tmp_path):
    cfg = mlopt.Config(unroll_steps=1)
    a = prob("a", cfg)
    ecfg = mlopt.EngineConfig(train_iters=1, resume=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match=r"resume: checkpoint .*missing.pt' does not exist"):
        mlopt.Engine([a], {}, ecfg)
    assert a.engine is None
    cfg.unroll_steps = 2  # still editable
    ecfg.resume = None
    e = mlopt.Engine([a], {}, ecfg)  # the same objects build a working engine
    assert a.engine is e and e.run()["steps"] == {"a": 1}


def test_failed_engine_does_not_thaw_a_running_engines_config():
    a = prob("a")
    mlopt.Engine([a], {}, mlopt.EngineConfig(train_iters=1))
    with pytest.raises(ConfigError, match="already belongs to another Engine"):
        mlopt.Engine([a, prob("b")], {}, mlopt.EngineConfig(train_iters=1))
    with pytest.raises(ConfigError, match=r"Config.unroll_steps cannot change"):
        a.config.unroll_steps = 3


def test_failure_in_a_later_problem_unbinds_the_earlier_ones():
    a, b = prob("a"), prob("b", opt=lambda ps: torch.optim.LBFGS(ps))
    with pytest.raises(ConfigError, match="LBFGS"):
        engine([a, b], {})
    assert a.engine is None and b.engine is None
    engine([a], {}).run()


# ---------------------------------------------------------------------- silent zero gradients
class Returns(mlopt.Problem):
    def __init__(self, name, loss_fn, **kw):
        m = nn.Linear(2, 1, bias=False)
        super().__init__(name, m, torch.optim.SGD(m.parameters(), lr=0.1), **kw)
        self.__dict__["loss_fn"] = loss_fn

    def training_step(self, batch):
        return self.__dict__["loss_fn"](self)


@pytest.mark.parametrize(
    "loss_fn",
    [lambda p: None, lambda p: {"loss": None, "acc": 1.0}],
    ids=["None", "dict-with-None"],
)
def test_training_step_returning_none(loss_fn):
    p = Returns("lazy", loss_fn)
    before = p.module.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"problem 'lazy': training_step returned None; return"):
        engine([p], {}).run()
    assert torch.equal(p.module.weight, before)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda p: torch.tensor(1.0, requires_grad=True),
        lambda p: (p.module.weight.detach() ** 2).sum(),
        lambda p: torch.zeros(()),
    ],
    ids=["constant-leaf", "detached", "constant"],
)
def test_loss_that_does_not_depend_on_the_parameters(loss_fn):
    p = Returns("const", loss_fn)
    with pytest.raises(
        ConfigError, match=r"problem 'const': the loss .* does not depend on any of its 1 train"
    ):
        engine([p], {}).run()


def test_loss_that_uses_only_some_parameters_is_fine():
    class Half(mlopt.Problem):
        def training_step(self, batch):
            return (self.module[0].weight ** 2).sum()

    net = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    engine([Half("h", net, torch.optim.SGD(net.parameters(), lr=0.1))], {}).run()


def test_problem_without_parameters_may_return_none():
    class Idle(mlopt.Problem):
        def training_step(self, batch):
            return None

    engine([Idle("idle")], {}).run()


# ---------------------------------------------------------------------- missing dependency edges
class Reads(mlopt.Problem):
    """Loss of its own weight plus the weight of the problem named ``other``."""

    def training_step(self, batch):
        other = getattr(self, self.config.options["reads"])
        if self.config.options.get("no_grad"):
            with torch.no_grad():
                target = other.module.weight.clone()
        else:
            target = other.module.weight
        return ((self.module.weight - target) ** 2).sum()


def reading(name, reads, **options):
    m = nn.Linear(2, 1, bias=False)
    cfg = mlopt.Config(options={"reads": reads, **options})
    return Reads(name, m, torch.optim.SGD(m.parameters(), lr=0.1), config=cfg)


def test_problems_that_read_each_other_without_edges():
    up, low = reading("up", "low"), reading("low", "up")
    with pytest.raises(
        DependencyError,
        match=r"problem '(up|low)' reads problem '(low|up)', whose training_step reads .*u2l",
    ):
        engine([up, low], {}, train_iters=2).run()


def test_upper_reading_a_lower_of_a_lower_without_an_edge():
    top, mid, low = reading("top", "low"), reading("mid", "low"), reading("low", "top")
    deps = {"u2l": {"top": ["mid"], "mid": ["low"]}, "l2u": {"mid": ["top"], "low": ["mid"]}}
    with pytest.raises(
        DependencyError, match=r"problem 'top' reads problem 'low'.*u2l \{'top': \['low'\]\}"
    ):
        engine([top, mid, low], deps, train_iters=2).run()


def test_reading_under_no_grad_is_allowed():
    up, low = reading("up", "low", no_grad=True), reading("low", "up")
    engine([up, low], {}, train_iters=3).run()


def test_reading_along_declared_edges_is_fine():
    up, low = reading("up", "low"), reading("low", "up")
    engine([up, low], bilevel(up, low), train_iters=3).run()


# ---------------------------------------------------------------------- validation()
@pytest.mark.parametrize(
    "result, match",
    [
        (0.5, r"validation\(\) must return a dict of metrics, got float"),
        ([("loss", 1.0)], r"validation\(\) must return a dict of metrics, got list"),
        ({"acc": "high"}, r"validation\(\) returned 'acc': str; each metric must be a number"),
        (
            {"acc": torch.ones(3)},
            r"validation\(\) returned 'acc': Tensor of shape \(3,\); .*\.mean\(\)",
        ),
        ({"acc": True}, r"validation\(\) returned 'acc': bool"),
        (
            {1: 0.5},
            r"validation\(\) returned 1: float; each metric must be a number .* under a string key",
        ),
    ],
)
def test_bad_validation_result(result, match):
    class E(mlopt.Engine):
        def validation(self):
            return result

    with pytest.raises(ConfigError, match=r"Engine\." + match):
        E([prob("a")], {}, mlopt.EngineConfig(train_iters=2, valid_step=1)).run()


def test_validation_may_return_tensors_and_none():
    class E(mlopt.Engine):
        def validation(self):
            return {"loss": torch.tensor(0.25), "n": 3} if self.iteration == 1 else None

    e = E([prob("a")], {}, mlopt.EngineConfig(train_iters=2, valid_step=1))
    e.run()
    assert e.history == [{"iteration": 1, "loss": 0.25, "n": 3.0}, {"iteration": 2}]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed"
)
def test_missing_wandb_fails_before_any_problem_is_bound():
    a = prob("a")
    with pytest.raises(ConfigError, match=r"logger_type='wandb' but wandb is not installed; `pip"):
        engine([a], {}, logger_type="wandb")
    assert a.engine is None


# ---------------------------------------------------------------------- Engine arguments
def test_bad_engine_arguments():
    a = prob("a")
    with pytest.raises(
        ConfigError, match=r"problems must be a list of mlopt.Problem .*\[problem\]"
    ):
        mlopt.Engine(a)
    with pytest.raises(ConfigError, match=r"problems must be a list .* got int"):
        mlopt.Engine(3)
    with pytest.raises(ConfigError, match=r"problems is empty; pass the mlopt.Problem objects"):
        mlopt.Engine([])
    with pytest.raises(DependencyError, match=r"Engine: 'a' is not a mlopt.Problem"):
        mlopt.Engine(["a"])
    assert a.engine is None


@pytest.mark.parametrize(
    "deps, match",
    [
        ([("a", "b")], r"dependencies must be a dict \{'u2l': .*got list"),
        ({"U2L": {"a": ["b"]}}, r"unknown dependency keys \['U2L'\]; use 'u2l'"),
        ({"u2l": [("a", "b")]}, r"dependencies\['u2l'\] must be a dict"),
        ({"u2l": {"a": ["a"]}}, r"u2l edge from 'a' to itself; remove it"),
        ({"u2l": {"a": ["zz"]}}, r"problem 'zz' appears in dependencies\['u2l'\] but not in"),
    ],
)
def test_bad_dependencies(deps, match):
    with pytest.raises(DependencyError, match=match):
        engine([prob("a"), prob("b")], deps)


def test_single_items_stand_for_one_element_lists():
    a, b = prob("a"), prob("b")
    e = engine([a, b], {"u2l": {a: b}, "l2u": {b: a}})
    assert e.graph.u2l == {"a": ("b",)} and e.graph.l2u == {"b": ("a",)}


# ---------------------------------------------------------------------- user-defined methods
class BadVjp(mlopt.hypergrad.Method):
    """A method whose vjp returns ``self.output(ctx)``."""

    def __init__(self, output):
        self.output = output

    def __repr__(self):
        return "BadVjp()"

    def vjp(self, ctx, cotangent):
        return self.output(ctx)


@pytest.mark.parametrize(
    "output, match",
    [
        (lambda ctx: (), r"BadVjp\(\)\.vjp returned 0 for 1 upper tensor\(s\) shaped \[\(1, 2\)\]"),
        (lambda ctx: ctx.uppers[0], r"BadVjp\(\)\.vjp returned Parameter for 1 upper tensor"),
        (
            lambda ctx: (torch.zeros(3),),
            r"BadVjp\(\)\.vjp's output 0 is \(3,\), but ctx.uppers\[0\] has",
        ),
        (
            lambda ctx: ("grad",),
            r"BadVjp\(\)\.vjp's output 0 is str, but ctx.uppers\[0\] has shape",
        ),
    ],
    ids=["empty", "bare-tensor", "wrong-shape", "not-a-tensor"],
)
def test_user_method_with_a_wrong_vjp_output_names_the_lower(output, match):
    class Up(mlopt.Problem):
        def training_step(self, batch):
            return (self.low.module.weight**2).sum()

    class Low(mlopt.Problem):
        def training_step(self, batch):
            return ((self.module.weight - self.up.module.weight) ** 2).sum()

    nets = [nn.Linear(2, 1, bias=False).double() for _ in range(2)]
    up = Up("up", nets[0], torch.optim.SGD(nets[0].parameters(), lr=0.1))
    low = Low(
        "low",
        nets[1],
        torch.optim.SGD(nets[1].parameters(), lr=0.1),
        config=mlopt.Config(type=BadVjp(output)),
    )
    before = nets[0].weight.detach().clone()
    with pytest.raises(
        HypergradientError, match=r"problem 'up', step 0: hypergradient through 'low': " + match
    ):
        engine([up, low], bilevel(up, low), train_iters=2).run()
    assert torch.equal(nets[0].weight, before)  # the upper did not update
