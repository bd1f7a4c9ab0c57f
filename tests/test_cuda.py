"""CUDA: the core programs of the library on a GPU, against the same programs on the CPU.

Marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is false. On a machine with an
NVIDIA GPU, ``pytest -m cuda tests/test_cuda.py`` (or ``bash benchmarks/gpu_check.sh``, which
also runs the GPU benchmarks) checks, in float64 and to tight tolerances, that

- every program of ``tests/ab_programs.py`` (reverse with momentum, truncated reverse with Adam,
  forward mode, CG, Neumann, DARTS with roll-back, first-order, Reptile, MAML, BDA, three and four
  levels, an fp16-scaled upper, checkpoint and resume) and SAMA, MINRES, fixed point and exact-K
  CG give the CPU's parameters, upper gradients and losses on the GPU;
- the programs' tensors (parameters, buffers, gradients, optimizer states, losses) stay there;
- ``Reverse(checkpoint=k)`` replays the GPU's dropout masks (its RNG) exactly;
- MAML through :mod:`mlopt.meta` (vmap, loop, auto; second and first order) matches the CPU;
- ``Config(precision="bf16")`` (and ``"fp16"`` with grad scaling) runs every hypergradient
  method and stays close to the float64 hypergradient.

``MLOPT_CUDA_TEST_DEVICE=cpu`` runs the same tests on the CPU against the CPU: it only checks
the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import ab_programs
import pytest
import torch
from ab_programs import hpo
from torch import nn

import mlopt
from mlopt.data import Task
from mlopt.hypergrad import (
    CG,
    MINRES,
    SAMA,
    FiniteDifference,
    FixedPoint,
    Forward,
    Neumann,
    Reverse,
)
from mlopt.meta import choose_mode, maml_task_loss, meta_gradients
from mlopt.models import Conv4
from mlopt.testing import capture_gradients

__all__ = ["DEVICE", "METHODS", "first_hypergradient", "hpo_program", "relative_error"]

DEVICE = torch.device(os.environ.get("MLOPT_CUDA_TEST_DEVICE", "cuda"))
CPU, F64 = torch.device("cpu"), torch.float64
_REASON = (
    "CUDA is not available (torch.cuda.is_available() is False): these tests run the library's "
    "programs on an NVIDIA GPU; run them there with `bash benchmarks/gpu_check.sh`"
)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason=_REASON),
]


# ---------------------------------------------------------------------- a sized program
class _Fit(mlopt.Problem):
    """Lower: MSE plus a per-input-feature decay ``exp(hp_j)`` on the first layer's columns."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        w = self.module[0].weight
        decay = 0.5 * (torch.exp(self.hp.module.weight) * w**2).sum()
        return ((self(x) - y) ** 2).mean() + decay  # (F.mse_loss breaks Forward's jvp)


class _HP(mlopt.Problem):
    """Upper: validation MSE of the lower's current model."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((self.fit(x) - y) ** 2).mean()


def _batches(seed: int, n: int, d: int, batch: int, dtype: torch.dtype) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, 1, generator=g)) + 0.1 * torch.randn(n, 1, generator=g)
    x, y = x.to(dtype), y.to(dtype)  # float32 draws: the float64 run sees the same numbers
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


_INNER: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "plain": lambda p: torch.optim.SGD(p, lr=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}

#: name -> (method factory, program options): the hypergradient methods on one HPO program
#: (``first_order`` is left out: it drops the only term through which this upper depends on
#: its hyperparameters; MAML's first-order variant is checked below).
METHODS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "reverse": (Reverse, {}),
    "reverse_checkpoint": (lambda: Reverse(checkpoint=2), {}),
    "reverse_truncated": (lambda: Reverse(truncate=2), {}),
    "forward": (Forward, {}),
    # the small MLP's lower Hessian is nearly singular: damped solves are well posed
    "cg": (lambda: CG(10, tol=None, damping=1.0), {}),
    "minres": (lambda: MINRES(10, tol=None, damping=1.0), {}),
    "neumann": (lambda: Neumann(10, alpha=0.1), {}),
    "fixed_point": (lambda: FixedPoint(20, tol=0.0), {"inner": "plain"}),
    "finite_difference": (FiniteDifference, {"unroll": 1, "inner": "plain"}),
    # (Adam's first step is sign-like: its update Jacobian, hence SAMA's hypergradient, is ~0)
    "sama": (SAMA, {"inner": "adam"}),
}


def hpo_program(
    method: Any,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
    unroll: int = 4,
    inner: str = "momentum",
    d: int = 8,
    hidden: int = 16,
    n: int = 64,
    batch: int = 32,
    strategy: str | None = None,
) -> tuple[mlopt.Engine, list[list[torch.Tensor]]]:
    """Per-feature weight-decay HPO of a ``d-hidden-1`` tanh MLP, built through the public API.

    Args:
        method: the lower's ``Config(type=...)``.
        device: ``EngineConfig(device=...)`` (unless ``strategy`` is given).
        dtype: of the modules and data (drawn in float32 whatever ``dtype``).
        precision: both problems' ``Config(precision=...)``.
        unroll: the lower's ``unroll_steps``; the Engine runs one window (one upper step).
        inner: ``"momentum"``, ``"plain"`` (SGD) or ``"adam"``: the lower's optimizer.
        d: input features (= hyperparameters); hidden: hidden units; n: examples; batch: size.
        strategy: ``EngineConfig(strategy=...)`` instead of an explicit device.

    Returns:
        The Engine (not yet run) and the list the upper optimizer's gradients are captured in.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)
    hyper = nn.Module()
    hyper.weight = nn.Parameter(torch.full((d,), -3.0, dtype=dtype))
    fit = _Fit(
        "fit",
        net,
        _INNER[inner](net.parameters()),
        _batches(1, n, d, batch, dtype),
        mlopt.Config(type=method, unroll_steps=unroll, precision=precision),
    )
    hp_opt = torch.optim.SGD(hyper.parameters(), lr=0.1)
    hp = _HP(
        "hp", hyper, hp_opt, _batches(2, n, d, batch, dtype), mlopt.Config(precision=precision)
    )
    grads = capture_gradients(hp_opt)
    where = {"strategy": strategy} if strategy else {"device": str(device)}
    engine = mlopt.Engine(
        [hp, fit],
        {"u2l": {hp: [fit]}, "l2u": {fit: [hp]}},
        mlopt.EngineConfig(train_iters=unroll, seed=0, progress=False, **where),
    )
    return engine, grads


def first_hypergradient(
    name: str, device: torch.device | str, dtype: torch.dtype, precision: str = "fp32", **size
) -> torch.Tensor:
    """The upper gradient (direct + hypergradient) of ``METHODS[name]`` after one window."""
    factory, options = METHODS[name]
    engine, grads = hpo_program(
        factory(), device=device, dtype=dtype, precision=precision, **{**options, **size}
    )
    engine.run()
    assert len(grads) == 1, f"{name}: expected one upper step, got {len(grads)}"
    return grads[0][0]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` computed in float64 on the CPU."""
    got, ref = got.detach().to(CPU, F64), ref.detach().to(CPU, F64)
    return float((got - ref).norm() / ref.norm())


# ---------------------------------------------------------------------- programs on a device
@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Engines built inside run on ``device`` (the shared test programs say strategy="cpu")."""
    with mock.patch("mlopt.engine.choose_device", lambda run: device):
        yield


EXTRA: dict[str, Callable[[], tuple]] = {
    "sama_adam": lambda: hpo(SAMA(), unroll=1, iters=6, inner="adam"),
    "sama_momentum": lambda: hpo(SAMA(), unroll=1, iters=6),
    "minres": lambda: hpo(MINRES(6, tol=None, damping=0.1), iters=9),
    "fixed_point": lambda: hpo(FixedPoint(30, tol=1e-12), inner="plain", iters=6),
    "cg_exact_k": lambda: hpo(CG(5, tol=None), iters=9),
}
# the dropout program draws its masks from the device's generator: checked on its own below
NAMES = sorted(set(ab_programs.PROGRAMS) - {"reverse_checkpointed_dropout"}) + sorted(EXTRA)


def run_on(name: str, device: torch.device) -> tuple[mlopt.Engine, dict[str, torch.Tensor]]:
    """Run program ``name`` on ``device``: its final state, upper gradients and losses."""
    torch.manual_seed(0)
    with on_device(device):
        engine, grads = {**ab_programs.PROGRAMS, **EXTRA}[name]()
        for p in engine.problems_by_name.values():  # constants a problem holds go along
            for key, value in list(vars(p).items()):
                if isinstance(value, torch.Tensor):
                    p.__dict__[key] = value.to(device)
        if engine.iteration == 0:  # (the resumed program has already run)
            engine.run()
    out = {f"{p}.{k}": v for p, m in engine.problems_by_name.items() for k, v in _state(m)}
    for p, seen in grads.items():
        out.update({f"grad.{p}.{k}.{j}": g for k, s in enumerate(seen) for j, g in enumerate(s)})
    out.update({f"loss.{p}": v.detach() for p, v in engine.last_losses.items()})
    return engine, out


def _state(problem: mlopt.Problem) -> Iterator[tuple[str, torch.Tensor]]:
    """Module parameters and buffers, their ``.grad`` and the optimizer's state tensors."""
    module = problem._module
    yield from module.state_dict(keep_vars=False).items()
    for k, p in module.named_parameters():
        if p.grad is not None:
            yield f"{k}.grad", p.grad
    opt = problem.optimizer
    if opt is not None:
        for i, st in enumerate(opt.state.values()):
            # torch keeps Adam's "step" counter on the CPU unless capturable=True (by design)
            yield from (
                (f"opt.{i}.{k}", v) for k, v in st.items() if torch.is_tensor(v) and k != "step"
            )


def assert_on(device: torch.device, tensors: dict[str, torch.Tensor]) -> None:
    wrong = {k: str(v.device) for k, v in tensors.items() if v.device.type != device.type}
    assert not wrong, f"tensors left {device}: {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_program_on_device_matches_cpu(name):
    engine, got = run_on(name, DEVICE)
    assert engine.device.type == DEVICE.type
    _, want = run_on(name, CPU)
    assert sorted(got) == sorted(want)
    assert_on(DEVICE, got)
    for key, ref in want.items():
        torch.testing.assert_close(
            got[key].cpu(), ref, rtol=1e-9, atol=1e-11, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_checkpointed_replay_reproduces_the_device_dropout():
    """The replayed segments draw the same dropout masks from the device's generator."""
    got, want = {}, {}
    for method, out in ((Reverse(checkpoint=2), got), (Reverse(), want)):
        torch.manual_seed(0)
        with on_device(DEVICE):
            engine, grads = hpo(method, unroll=5, iters=10, dropout=0.2)
            engine.run()
        out.update({f"{k}.{j}": g for k, s in enumerate(grads["hp"]) for j, g in enumerate(s)})
    assert len(got) == 2 and sorted(got) == sorted(want)
    assert_on(DEVICE, got)
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-10, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_strategy_cuda_builds_the_program_on_the_gpu():
    if DEVICE.type != "cuda":
        pytest.skip("strategy='cuda' needs a GPU")
    engine, grads = hpo_program("reverse", device=DEVICE, strategy="cuda")
    engine.run()
    assert engine.device.type == "cuda" and grads[0][0].is_cuda


# ---------------------------------------------------------------------- MAML through mlopt.meta
def _tasks(count: int, device: torch.device) -> Task:
    g = torch.Generator().manual_seed(5)
    sx, qx = (
        torch.randn(count, 5, 1, 28, 28, generator=g),
        torch.randn(count, 10, 1, 28, 28, generator=g),
    )
    labels = torch.arange(5).repeat(count, 1)
    return Task(
        sx.to(device, F64), labels.to(device), qx.to(device, F64), labels.repeat(1, 2).to(device)
    )


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
@pytest.mark.parametrize("mode", ["vmap", "loop", "auto"])
def test_meta_gradients_on_device_match_cpu(mode, first_order):
    torch.manual_seed(0)
    net = Conv4(1, 5, hidden=8).double()
    ref = meta_gradients(
        maml_task_loss(net, 2, 0.4, first_order=first_order),
        dict(net.named_parameters()),
        _tasks(3, CPU),
        mode="loop",
        has_aux=True,
    )
    net.to(DEVICE)
    out = meta_gradients(
        maml_task_loss(net, 2, 0.4, first_order=first_order),
        dict(net.named_parameters()),
        _tasks(3, DEVICE),
        mode=mode,
        has_aux=True,
    )
    assert_on(DEVICE, {**out.gradients, "loss": out.loss})
    torch.testing.assert_close(out.loss.cpu(), ref.loss, rtol=1e-12, atol=1e-12)
    for k, g in ref.gradients.items():
        torch.testing.assert_close(
            out.gradients[k].cpu(), g, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_auto_mode_vectorizes_on_the_gpu():
    assert choose_mode("auto", DEVICE) == ("loop" if DEVICE.type == "cpu" else "vmap")


# ---------------------------------------------------------------------- mixed precision
# bf16 keeps 8 significant bits: with CPU autocast these hypergradients are 1e-3 to 1e-2 off
# the float64 ones (benchmarks/gpu_check.py reports each method's figure on the GPU)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_autocast_runs_every_method(name):
    ref = first_hypergradient(name, DEVICE, F64)
    fp32 = first_hypergradient(name, DEVICE, torch.float32)
    bf16 = first_hypergradient(name, DEVICE, torch.float32, precision="bf16")
    assert_on(DEVICE, {"fp32": fp32, "bf16": bf16})
    assert fp32.dtype == bf16.dtype == torch.float32 and bool(torch.isfinite(bf16).all())
    assert relative_error(fp32, ref) < 1e-4
    assert relative_error(bf16, ref) < 0.1


def test_fp16_autocast_with_grad_scaling_backs_off_and_steps():
    """fp16 on both problems: the upper (not unrolled) steps through a GradScaler, which skips
    the first overflowing steps, lowers its scale and then steps with finite gradients."""
    engine, grads = hpo_program(Reverse(), device=DEVICE, precision="fp16")
    for _ in range(40):
        engine.step()
    scaler = engine.states["hp"].scaler  # 10 windows: each skipped upper step halves the scale
    assert scaler is not None and scaler.get_scale() == 2.0 ** (16 - (10 - len(grads)))
    assert len(grads) > 0 and all(bool(torch.isfinite(g[0]).all()) for g in grads)
    assert_on(DEVICE, {str(k): g[0] for k, g in enumerate(grads)})
