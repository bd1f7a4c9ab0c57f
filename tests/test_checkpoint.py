"""Checkpoints: exact (bitwise) resume, atomic writes, safe loading, no non-finite checkpoints.

A run of N iterations must equal a run of k iterations, a checkpoint, and a NEW engine built from
scratch with ``EngineConfig(resume=path)`` running to N: same parameters, optimizer and scheduler
states, data positions and random streams, compared with ``torch.equal``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlopt
from mlopt.errors import ConfigError, HypergradientError

F64 = torch.float64
N = 3
_G = torch.Generator().manual_seed(7)
A = torch.eye(N, dtype=F64) * 2.0 + 0.2 * torch.ones(N, N, dtype=F64)
B = torch.randn(N, N, generator=_G, dtype=F64)
C = torch.randn(N, N, generator=_G, dtype=F64)
LOWER_X = torch.randn(10, N, generator=_G, dtype=F64)
UPPER_Y = [torch.randn(N, generator=_G, dtype=F64) for _ in range(3)]
PHI0 = torch.randn(N, generator=_G, dtype=F64)
THETA0 = torch.randn(N, generator=_G, dtype=F64)


class Vec(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone())

    def forward(self) -> torch.Tensor:
        return self.weight


def _vector(batch) -> torch.Tensor:
    """A batch is a vector, or a DataLoader batch ``[x]`` of vectors (averaged)."""
    if isinstance(batch, (list, tuple)):
        return batch[0].mean(0)
    return batch


class Lower(mlopt.Problem):
    """f(θ, φ; x) = ½θᵀAθ - θᵀ(Bφ + x + 0.01ε), ε ~ N(0, I) from the global torch generator."""

    def training_step(self, batch):
        theta = self.module.weight
        noise = 0.01 * torch.randn(N, dtype=F64)  # consumes the global RNG: must resume too
        return 0.5 * theta @ A @ theta - theta @ (
            B @ self.upper.module.weight + _vector(batch) + noise
        )


class Upper(mlopt.Problem):
    """F(θ, φ; y) = ½‖Cθ - y‖² + 0.05‖φ‖²."""

    def training_step(self, batch):
        r = C @ self.lower() - batch
        return 0.5 * r @ r + 0.05 * self.module.weight @ self.module.weight


def build(
    iters: int,
    *,
    shuffle: bool = False,
    lower_cfg: dict | None = None,
    upper_cfg: dict | None = None,
    **engine_kw,
):
    """Reverse-mode lower (SGD momentum, unroll 3) and Adam+StepLR upper; all from scratch."""
    low_mod, up_mod = Vec(THETA0), Vec(PHI0)
    low_opt = torch.optim.SGD(low_mod.parameters(), lr=0.1, momentum=0.9)
    up_opt = torch.optim.Adam(up_mod.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(up_opt, step_size=2, gamma=0.5)
    if shuffle:
        data = DataLoader(TensorDataset(LOWER_X), batch_size=2, shuffle=True)
    else:
        data = list(LOWER_X[:5])
    lower = Lower(
        "lower",
        low_mod,
        low_opt,
        train_data_loader=data,
        config=mlopt.Config(**{"type": "reverse", "unroll_steps": 3, **(lower_cfg or {})}),
    )
    upper = Upper(
        "upper",
        up_mod,
        up_opt,
        train_data_loader=UPPER_Y,
        scheduler=sched,
        config=mlopt.Config(**(upper_cfg or {})),
    )
    cfg = mlopt.EngineConfig(train_iters=iters, strategy="cpu", seed=0, **engine_kw)
    engine = mlopt.Engine([upper, lower], {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}, cfg)
    return engine


def final_state(engine) -> dict:
    """Everything that must match bitwise after a resumed run."""
    up, low = engine.problems_by_name["upper"], engine.problems_by_name["lower"]
    return {
        "upper": up._module.weight.detach().clone(),
        "lower": low._module.weight.detach().clone(),
        "momentum": low.optimizer.state[low._module.weight]["momentum_buffer"].clone(),
        "exp_avg": up.optimizer.state[up._module.weight]["exp_avg"].clone(),
        "exp_avg_sq": up.optimizer.state[up._module.weight]["exp_avg_sq"].clone(),
        "lr": up.optimizer.param_groups[0]["lr"],
        "sched": up.scheduler.last_epoch,
        "rng": torch.get_rng_state(),
        "steps": engine.step_counts,
        "iteration": engine.iteration,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def resumed_from(path: str, iters: int, **kw) -> dict:
    engine = build(iters, resume=path, **kw)
    engine.run()
    return final_state(engine)


def reference(iters: int, **kw) -> dict:
    engine = build(iters, **kw)
    engine.run()
    return final_state(engine)


# ---------------------------------------------------------------- exact resume
def test_resume_is_bitwise_exact_and_saves_wait_for_window_boundaries(tmp_path):
    ref = reference(12)
    engine = build(9, checkpoint_dir=str(tmp_path), checkpoint_step=4)
    engine.run()
    # checkpoint_step=4 is not a multiple of unroll_steps=3: the saves at 4 and 8 wait for the
    # window boundaries 6 and 9
    assert sorted(os.listdir(tmp_path)) == ["iter_00000006.pt", "iter_00000009.pt", "last.pt"]
    state = mlopt.checkpoint.safe_load(str(tmp_path / "iter_00000006.pt"))
    assert state["run"]["iteration"] == 6
    # the lower's optimizer state was committed from the differentiable unroll
    low_opt = state["problems"]["lower"]["optimizer"]["state"]
    assert set(low_opt[0]) == {"momentum_buffer"}
    assert torch.count_nonzero(low_opt[0]["momentum_buffer"]) == N
    assert state["problems"]["upper"]["scheduler"]["last_epoch"] == 2
    assert_same(resumed_from(str(tmp_path / "iter_00000006.pt"), 12), ref)
    assert_same(resumed_from(str(tmp_path / "last.pt"), 12), ref)


def test_resume_restores_counters_and_history(tmp_path):
    engine = build(6, checkpoint_dir=str(tmp_path))
    engine.run()
    resumed = build(6, resume=str(tmp_path / "last.pt"))
    assert resumed.iteration == 6
    assert resumed.step_counts == {"upper": 2, "lower": 6}
    assert resumed.update_counts == engine.update_counts
    out = resumed.run()  # already at train_iters: nothing more runs
    assert out["iterations"] == 6 and out["steps"] == {"upper": 2, "lower": 6}


def test_resume_true_picks_last(tmp_path):
    ref = reference(12)  # first: the global RNG is part of the state
    build(6, checkpoint_dir=str(tmp_path), checkpoint_step=3).run()
    assert sorted(os.listdir(tmp_path)) == ["iter_00000003.pt", "iter_00000006.pt", "last.pt"]
    engine = build(12, checkpoint_dir=str(tmp_path), resume=True)
    assert engine.iteration == 6
    engine.run()
    assert_same(final_state(engine), ref)


def test_resume_missing_file_is_a_config_error(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="nope.pt"):
        build(3, resume=missing)


def test_state_dict_mid_window_is_refused():
    engine = build(3)
    engine.step()  # 1 of the lower's 3 differentiable updates
    with pytest.raises(ConfigError, match="lower"):
        engine.state_dict()


def test_unknown_format_is_refused():
    engine = build(3)
    engine.run()
    state = engine.state_dict()
    state["format"] = 999
    with pytest.raises(ConfigError, match="format"):
        build(3).load_state_dict(state)


def test_resume_is_bitwise_exact_with_a_shuffled_dataloader(tmp_path):
    ref = reference(12, shuffle=True)
    build(9, shuffle=True, checkpoint_dir=str(tmp_path), checkpoint_step=4).run()
    assert_same(resumed_from(str(tmp_path / "iter_00000006.pt"), 12, shuffle=True), ref)


def _first_checkpoint(folder) -> str:
    return str(folder / sorted(f for f in os.listdir(folder) if f.startswith("iter_"))[0])


def test_resume_is_exact_with_gradient_accumulation(tmp_path):
    kw = {"lower_cfg": {"unroll_steps": 1}, "upper_cfg": {"gradient_accumulation": 2}}
    ref = reference(6, **kw)
    build(6, checkpoint_dir=str(tmp_path), checkpoint_step=3, **kw).run()
    assert_same(resumed_from(_first_checkpoint(tmp_path), 6, **kw), ref)


class InitLower(mlopt.Problem):
    """Meta-initialized lower: f(θ; x) = ½θᵀAθ - θᵀx."""

    def training_step(self, batch):
        theta = self.module.weight
        return 0.5 * theta @ A @ theta - theta @ batch


class InitUpper(mlopt.Problem):
    def training_step(self, batch):
        r = C @ self.lower() - batch
        return 0.5 * r @ r


def _meta_init_program(iters: int, **engine_kw):
    low_mod, up_mod = Vec(THETA0), Vec(PHI0)
    lower = InitLower(
        "lower",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=0.1, momentum=0.5),
        train_data_loader=list(LOWER_X[:4]),
        config=mlopt.Config(type="first_order", unroll_steps=3, initialize_from="upper"),
    )
    upper = InitUpper(
        "upper",
        up_mod,
        torch.optim.SGD(up_mod.parameters(), lr=0.1),
        train_data_loader=UPPER_Y,
    )
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, strategy="cpu", **engine_kw),
    )
    return engine, up_mod, low_mod


def test_resume_is_exact_inside_a_first_order_meta_init_window(tmp_path):
    engine, up, low = _meta_init_program(9)
    engine.run()
    ref = (up.weight.detach().clone(), low.weight.detach().clone())
    _meta_init_program(9, checkpoint_dir=str(tmp_path), checkpoint_step=4)[0].run()
    engine, up, low = _meta_init_program(9, resume=_first_checkpoint(tmp_path))
    engine.run()
    assert torch.equal(up.weight, ref[0]) and torch.equal(low.weight, ref[1])


def test_run_ending_inside_a_window_does_not_crash(tmp_path):
    out = build(4, checkpoint_dir=str(tmp_path)).run()  # unroll_steps=3: 4 is mid-window
    assert out["iterations"] == 4


# ---------------------------------------------------------------- writing and loading safely
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    engine = build(6, checkpoint_dir=str(tmp_path))
    engine.run()
    before = sorted(os.listdir(tmp_path))
    last = (tmp_path / "last.pt").read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    for _ in range(3):
        engine.step()
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # no iter_00000009.pt, no temporary file
    assert (tmp_path / "last.pt").read_bytes() == last
    assert mlopt.checkpoint.safe_load(str(tmp_path / "last.pt"))["run"]["iteration"] == 6


_EXECUTED: list[str] = []


def _mark(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class Payload:
    """An arbitrary Python object: unpickling it would call _mark (code from the file)."""

    def __reduce__(self):
        return (_mark, ("code ran",))


def test_loading_refuses_arbitrary_python_objects(tmp_path):
    engine = build(3)
    engine.run()
    state = engine.state_dict()
    state["run"]["history"] = [Payload()]
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="refusing to load.*[Ww]eights only load failed"):
        build(3, resume=str(path))
    assert _EXECUTED == []


def test_refuses_to_write_non_finite_parameters(tmp_path):
    engine = build(6, checkpoint_dir=str(tmp_path))
    engine.run()
    before = sorted(os.listdir(tmp_path))
    last = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        engine.problems_by_name["upper"]._module.weight[0] = float("nan")
    with pytest.raises(HypergradientError, match="non-finite"):
        engine.save_checkpoint()
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "last.pt").read_bytes() == last


def test_cuda_generator_states_restore_on_the_devices_this_machine_has(monkeypatch):
    # a checkpoint written with 3 GPUs resumed on 1: device 0's state is restored, the others
    # are not asked for (torch.cuda.set_rng_state_all would index a device that is not there)
    from mlopt import checkpoint as ckpt

    state = ckpt.rng_state()
    state["cuda"] = [torch.full((4,), k, dtype=torch.uint8) for k in range(3)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append((int(s[0]), i)))
    ckpt.set_rng_state(state)
    assert calls == [(0, 0)]
