"""Shared builders for tests: the quadratic bilevel program through the Problem/Engine API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlopt
from mlopt.testing import QuadraticBilevel, capture_gradients

F64 = torch.float64


class Vector(nn.Module):
    """A module holding one parameter vector."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone().to(F64))

    def forward(self) -> torch.Tensor:
        return self.weight


class QuadLower(mlopt.Problem):
    def __init__(self, q: QuadraticBilevel, upper: str, **kw) -> None:
        super().__init__(**kw)
        self.q, self.up_name = q, upper

    def training_step(self, batch):
        phi = getattr(self, self.up_name).module.weight
        return self.q.lower_loss(self.module.weight, phi)


class QuadUpper(mlopt.Problem):
    def __init__(self, q: QuadraticBilevel, lower: str, **kw) -> None:
        super().__init__(**kw)
        self.q, self.low_name = q, lower

    def training_step(self, batch):
        theta = getattr(self, self.low_name)()
        return self.q.upper_loss(theta, self.module())


def quadratic_program(
    q,
    phi0,
    theta0,
    *,
    method="reverse",
    steps=5,
    lr=0.1,
    momentum=0.0,
    upper_lr=1.0,
    init=False,
    inner_opt="sgd",
    engine_kw=None,
    upper_config=None,
):
    """A two-level quadratic program; returns (engine, upper, lower, captured upper gradients)."""
    low_mod = Vector(theta0 if not init else phi0)
    up_mod = Vector(phi0)
    if inner_opt == "sgd":
        low_opt = torch.optim.SGD(low_mod.parameters(), lr=lr, momentum=momentum)
    else:
        low_opt = inner_opt(low_mod.parameters())
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=upper_lr)
    cfg = mlopt.Config(type=method, unroll_steps=steps, initialize_from="upper" if init else None)
    lower = QuadLower(q, "upper", name="lower", module=low_mod, optimizer=low_opt, config=cfg)
    upper = QuadUpper(
        q, "lower", name="upper", module=up_mod, optimizer=up_opt, config=upper_config
    )
    grads = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=steps, strategy="cpu", **(engine_kw or {})),
    )
    return engine, upper, lower, grads


def feature_tasks(n: int = 2, seed: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """``n`` regression tasks ``(support x, support y, query x, query y)`` of 5 features and 2
    outputs (8 support and 7 query points), float64, for meta-feature programs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sx, qx = (
            torch.randn(8, 5, generator=g, dtype=F64),
            torch.randn(7, 5, generator=g, dtype=F64),
        )
        out.append(
            (
                sx,
                torch.randn(8, 2, generator=g, dtype=F64),
                qx,
                torch.randn(7, 2, generator=g, dtype=F64),
            )
        )
    return out


def torchrun_ranks(worker: Path, out: Path, timeout_s: int = 180) -> list[dict]:
    """Run ``worker OUT`` on 2 gloo ranks under torchrun; returns what each rank saved as
    ``OUT/rank{r}.pt`` (skips where torchrun or gloo is missing)."""
    near = Path(sys.executable).with_name("torchrun")
    torchrun = str(near) if near.is_file() else shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter nor on PATH")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {timeout_s} s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
