"""Runtime v2: module boundaries, the shared update pipeline in roll-back, exact resume of data
streams with their own generators and of BDA's upper stream, frozen configs, lazy methods."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlopt
from mlopt.dynamics import BDA, BDAProblem
from mlopt.hypergrad import FiniteDifference

F64 = torch.float64
ROOT = pathlib.Path(mlopt.__file__).parent
RUNTIME_MODULES = [
    *sorted((ROOT / "runtime").glob("*.py")),
    ROOT / "engine.py",
    ROOT / "checkpoint.py",
    ROOT / "distributed.py",
    ROOT / "dynamics" / "problem.py",
    ROOT / "hypergrad" / "checkpointed.py",
    ROOT / "hypergrad" / "transition.py",
]


# ---------------------------------------------------------------------- boundaries
def _private_reaches(path: pathlib.Path) -> list[str]:
    """``x._name`` (x not self/cls) and ``x.__dict__`` accesses in a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        private = attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))
        if not (private or attr == "__dict__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        out.append(f"{path.name}:{node.lineno} .{attr}")
    return out


def test_runtime_modules_never_reach_into_private_members_of_other_objects():
    found = [hit for path in RUNTIME_MODULES for hit in _private_reaches(path)]
    assert found == []


def test_the_boundary_check_detects_a_reach(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(engine):\n    return engine._runtime, engine.__dict__\n")
    assert _private_reaches(bad) == ["bad.py:2 ._runtime", "bad.py:2 .__dict__"]


def test_runtime_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "runtime").glob("*.py")}
    assert max(sizes.values()) <= 250, sizes


def _config_reads() -> dict[str, set[str]]:
    """Files of mlopt/ that read each Config/EngineConfig field (``config.x``, ``cfg.x``)."""
    import dataclasses

    fields = {f.name for c in (mlopt.Config, mlopt.EngineConfig) for f in dataclasses.fields(c)}
    fields.discard("options")  # free-form, for user extensions
    reads: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in fields:
                v = node.value
                base = v.id if isinstance(v, ast.Name) else getattr(v, "attr", None)
                if base in ("config", "cfg"):
                    reads.setdefault(node.attr, set()).add(str(path.relative_to(ROOT)))
    return reads


def test_each_config_field_has_one_read_site():
    reads = _config_reads()
    assert all(len(files) == 1 for files in reads.values()), reads
    assert {f for files in reads.values() for f in files} == {
        "runtime/plan.py",
        "runtime/run.py",
        "loggers.py",
    }


# ---------------------------------------------------------------------- roll-back pipeline
class Vec(nn.Module):
    def __init__(self, value) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(value, dtype=F64).clone())


class Low(mlopt.Problem):
    """½‖w - φ‖² + bᵀw on batch b (NaN once φ has moved, when ``nan_after_upper`` is set)."""

    def training_step(self, batch):
        w, phi = self.module.weight, self.up.module.weight
        loss = 0.5 * ((w - phi) ** 2).sum() + (batch * w).sum()
        if self.__dict__.get("nan_after_upper") and not torch.equal(phi.detach(), PHI0):
            loss = loss * float("nan")
        return loss


class Up(mlopt.Problem):
    def training_step(self, batch):
        return 0.5 * ((self.low.module.weight - 1.0) ** 2).sum()


PHI0 = torch.tensor([0.5, 0.5], dtype=F64)
BATCHES = [torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([2.0, 0.25], dtype=F64)]


def darts(low_cfg: dict, iters: int, **engine_kw):
    low_mod, up_mod = Vec([1.0, -2.0]), Vec([0.5, 0.5])
    low = Low(
        "low",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=0.1),
        BATCHES,
        mlopt.Config(type=FiniteDifference(), **low_cfg),
    )
    up = Up("up", up_mod, torch.optim.SGD(up_mod.parameters(), lr=0.5))
    engine = mlopt.Engine(
        [up, low],
        {"u2l": {up: [low]}, "l2u": {low: [up]}},
        mlopt.EngineConfig(train_iters=iters, roll_back=True, strategy="cpu", **engine_kw),
    )
    return engine, low, up


def test_roll_back_accumulates_like_the_normal_path():
    engine, low, up = darts({"unroll_steps": 2, "gradient_accumulation": 2}, iters=2)
    w0 = low.module.weight.detach().clone()
    engine.run()
    phi = up.module.weight.detach()  # the new upper; the redo starts again from w0
    grads = [w0 - phi + b for b in BATCHES]  # w does not move between accumulation steps
    want = w0 - 0.1 * (grads[0] + grads[1]) / 2
    torch.testing.assert_close(low.module.weight.detach(), want, rtol=0, atol=1e-15)
    assert engine.update_counts["low"] == 1


def test_roll_back_averages_across_ranks_through_the_reducer():
    engine, _, _ = darts({}, iters=3)
    calls = []
    engine.runtime.services.reduce_grads = lambda params: calls.append(len(params))
    engine.run()
    # low: one update and one redo per iteration; up: one update per iteration
    assert len(calls) == 3 * 3


def test_roll_back_honours_the_fp16_scaler():
    engine, _, _ = darts({"precision": "fp16"}, iters=3)
    engine.run()
    # GradScaler.update() once per optimizer step of the lower: 3 updates + 3 redone updates
    assert engine.state("low").scaler.state_dict()["_growth_tracker"] == 6


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_roll_back_applies_the_nonfinite_policy(policy):
    engine, low, _ = darts({"on_nonfinite": policy}, iters=2)
    low.__dict__["nan_after_upper"] = True  # in iteration 1 only the redo sees the new upper
    if policy == "raise":
        with pytest.raises(mlopt.HypergradientError, match=r"problem 'low'.*non-finite loss"):
            engine.step()
        return
    before = None
    with pytest.warns(RuntimeWarning, match=r"problem 'low'.*non-finite loss; update skipped"):
        engine.step()
        before = low.module.weight.detach().clone()  # restored to the window start, not redone
    assert torch.equal(before, torch.tensor([1.0, -2.0], dtype=F64))


# ---------------------------------------------------------------------- exact resume
class Fit(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.module(x) - y) ** 2).mean() + torch.exp(self.hp.module.weight).sum() * (
            sum((p**2).sum() for p in self.parameters())
        )


class HP(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        return ((self.fit(x) - y) ** 2).mean()


class BDAFit(BDAProblem):
    def lower_loss(self, batch):
        x, y = batch
        return ((self.module(x) - y) ** 2).mean() + torch.exp(self.hp.module.weight).sum() * (
            sum((p**2).sum() for p in self.parameters())
        )


def data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 2, generator=g, dtype=F64)
    return TensorDataset(x, x.sum(1, keepdim=True))


def program(iters, *, own_generator, bda=False, stateful=False, **engine_kw):
    torch.manual_seed(0)
    loader = DataLoader
    if stateful:
        loader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
    gen = torch.Generator().manual_seed(11) if own_generator else None
    low_loader = loader(data(0), batch_size=4, shuffle=True, generator=gen)
    up_gen = torch.Generator().manual_seed(12) if own_generator else None
    up_loader = loader(data(1), batch_size=3, shuffle=True, generator=up_gen)
    net, hp_mod = nn.Linear(2, 1).double(), Vec([-1.0])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    cfg = mlopt.Config(unroll_steps=2)
    if bda:
        fit = BDAFit("fit", net, opt, low_loader, cfg, bda=BDA(upper="hp", alpha=0.5))
    else:
        fit = Fit("fit", net, opt, low_loader, cfg)
    hp = HP("hp", hp_mod, torch.optim.Adam(hp_mod.parameters(), lr=0.05), up_loader)
    engine = mlopt.Engine(
        [hp, fit],
        {"u2l": {hp: [fit]}, "l2u": {fit: [hp]}},
        mlopt.EngineConfig(train_iters=iters, seed=3, strategy="cpu", **engine_kw),
    )
    return engine, net, hp_mod


@pytest.mark.parametrize(
    "own_generator,bda,stateful",
    [
        (True, False, False),
        (False, True, False),
        (True, True, False),
        (False, False, True),
        (True, False, True),
        (True, True, True),
    ],
    ids=["gen", "bda", "both", "torchdata", "torchdata-gen", "torchdata-bda"],
)
def test_resume_is_bitwise_exact_across_epochs(tmp_path, own_generator, bda, stateful):
    kw = {"own_generator": own_generator, "bda": bda, "stateful": stateful}
    full, net, hp_mod = program(14, **kw)
    full.run()
    kw |= {"checkpoint_dir": str(tmp_path), "checkpoint_step": 6}
    first, *_ = program(6, **kw)
    first.run()  # 6 iterations: past the first epoch of both loaders
    # a new process would also draw other random numbers before resuming
    torch.manual_seed(999)
    resumed, net2, hp2 = program(14, **kw, resume=True)
    resumed.run()
    assert torch.equal(net.weight, net2.weight) and torch.equal(net.bias, net2.bias)
    assert torch.equal(hp_mod.weight, hp2.weight)
    assert resumed.step_counts == full.step_counts


# ---------------------------------------------------------------------- plan-time contracts
def test_config_is_read_only_once_the_engine_compiled_it():
    engine, low, _ = darts({}, iters=1)
    with pytest.raises(mlopt.ConfigError, match=r"problem 'low': Config.on_nonfinite cannot"):
        low.config.on_nonfinite = "skip"
    assert engine.plan.problems["low"].on_nonfinite == "raise"


def test_public_read_outs():
    engine, _, _ = darts({"unroll_steps": 2}, iters=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.run()
    assert engine.step_counts == {"up": 2, "low": 4}
    assert set(engine.last_losses) == {"up", "low"}
    # the last window has ended and the next starts at the next update: the last position
    assert engine.state("low").window_count == 0 and engine.window_position("low") == 2
    assert "iteration 2: update low; update up; roll back low (after up)" in str(engine)


def test_methods_outside_hypergrad_resolve_without_importing_them_first():
    code = (
        "import sys, mlopt; assert 'mlopt.meta' not in sys.modules; "
        "print(type(mlopt.Config(type='warpgrad').type).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "WarpGrad"


def test_forward_mode_names_the_torch_func_limitation_of_mse_loss():
    class MSEFit(Fit):
        def training_step(self, batch):
            x, y = batch
            return nn.functional.mse_loss(self.module(x), y) + torch.exp(
                self.hp.module.weight
            ).sum() * sum((p**2).sum() for p in self.parameters())

    torch.manual_seed(0)
    net, hp_mod = nn.Linear(2, 1).double(), Vec([-1.0])
    fit = MSEFit(
        "fit",
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        DataLoader(data(0), batch_size=4),
        mlopt.Config(type="forward", unroll_steps=2),
    )
    hp = HP("hp", hp_mod, torch.optim.SGD(hp_mod.parameters(), lr=0.1), DataLoader(data(1)))
    engine = mlopt.Engine([hp, fit], {"u2l": {hp: [fit]}, "l2u": {fit: [hp]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forward mode's vmap fallback warning
        with pytest.raises(mlopt.ConfigError, match=r"problem 'fit'.*mse_loss.*\(\(pred - y\)"):
            engine.step()


def test_a_problem_of_another_engine_is_refused_before_anything_changes():
    engine, low, up = darts({}, iters=1)
    other_low = Low("other", Vec([0.0, 0.0]), None)
    with pytest.raises(mlopt.ConfigError, match=r"problem 'up' already belongs to another Engine"):
        mlopt.Engine([up, other_low])
    assert up.engine is engine
