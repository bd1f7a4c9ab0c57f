"""Worker for tests/test_sharding.py: ``torchrun --nproc_per_node 2 zero_worker.py OUT``.

Each rank runs the same programs under ``strategy="ddp"`` and ``strategy="zero"`` (gloo on the
CPU) and saves what it saw to ``OUT/rank{r}.pt``: ZeRO must change where the optimizer state
lives, never the arithmetic.

Example:
    >>> up, low = reweight_modules()
    >>> [tuple(p.shape) for p in up.parameters()], [tuple(p.shape) for p in low.parameters()]
    ([(8,), (1,)], [(1, 4), (1,)])
"""

from __future__ import annotations

import os
import sys

import ddp_worker as W
import torch

import mlopt
from mlopt.testing import capture_gradients

__all__ = ["ZERO_METHODS", "reweight_modules", "reweight_program", "state_numel"]

#: lower methods run under ddp and zero with SGD (momentum) optimizers on both levels
ZERO_METHODS = ("first_order", "cg", "neumann", "sama")

F64 = torch.float64
_G = torch.Generator().manual_seed(99)
# 8 examples with ids (the upper learns one weight per example), 4 batches of 2, plus a clean
# validation set; batch k goes to rank k mod 2
X = torch.randn(8, 4, generator=_G, dtype=F64)
NOISE = 0.5 * torch.randn(8, 1, generator=_G, dtype=F64)
Y = X @ torch.randn(4, 1, generator=_G, dtype=F64) + NOISE
TRAIN = [(X[i : i + 2], Y[i : i + 2], torch.arange(i, i + 2)) for i in range(0, 8, 2)]
VALID = [(X[i : i + 4] + 0.1, Y[i : i + 4]) for i in (0, 4)]


class Weights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(8, dtype=F64))
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=F64))


class Reweighted(mlopt.Problem):
    """The lower: weighted squared error, one learned weight per training example."""

    def training_step(self, batch):
        x, y, idx = batch
        w = torch.sigmoid(self.upper.module.logits[idx]) * self.upper.module.scale
        return (w * (self.module(x) - y).squeeze(-1) ** 2).mean()


class Validation(mlopt.Problem):
    """The upper: the lower's error on clean data."""

    def training_step(self, batch):
        x, y = batch
        return ((self.lower.module(x) - y) ** 2).mean()


def reweight_modules() -> tuple[Weights, torch.nn.Linear]:
    """(upper, lower) modules, two parameter tensors each (ZeRO gives one to each rank)."""
    torch.manual_seed(5)
    return Weights(), torch.nn.Linear(4, 1).double()


def reweight_program(strategy: str, method: str = "darts", iters: int = 4, **engine_kw):
    """Data reweighting with Adam on both levels and a scheduler on the upper; returns (engine,
    upper module, lower module, gradients seen by the upper's optimizer, its optimizer)."""
    up, low = reweight_modules()
    up_opt = torch.optim.Adam(up.parameters(), lr=0.1)
    grads = capture_gradients(up_opt)  # a hook registered before the Engine: it must move
    lower = Reweighted(
        "lower",
        low,
        torch.optim.Adam(low.parameters(), lr=0.05, weight_decay=0.01),
        train_data_loader=TRAIN,
        config=mlopt.Config(type=method),
    )
    upper = Validation(
        "upper",
        up,
        up_opt,
        scheduler=torch.optim.lr_scheduler.StepLR(up_opt, step_size=1, gamma=0.5),
        train_data_loader=VALID,
    )
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, strategy=strategy, **engine_kw),
    )
    return engine, up, low, grads


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of tensor state this rank's optimizer holds (ZeRO: its local shard's)."""
    local = getattr(optimizer, "optim", optimizer)
    return sum(
        v.numel()
        for s in local.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim()
    )


def _final(up: torch.nn.Module, low: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in (*up.parameters(), *low.parameters())]


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {}
    for strategy in ("ddp", "zero"):
        engine, up, low, grads = reweight_program(strategy)
        engine.run()
        result[f"reweight_{strategy}"] = _final(up, low) + [g for gs in grads for g in gs]
        result[f"numel_{strategy}"] = [
            state_numel(engine.upper.optimizer),
            state_numel(engine.lower.optimizer),
        ]
        result[f"lr_{strategy}"] = engine.upper.optimizer.param_groups[0]["lr"]
        result[f"sharding_{strategy}"] = dict(engine.sharding)
        result[f"type_{strategy}"] = type(engine.upper.optimizer).__name__

    # checkpoint under zero at iteration 2, resume under zero and under ddp
    folder = os.path.join(out, "ckpt")
    engine, up, low, _ = reweight_program("zero", checkpoint_dir=folder, checkpoint_step=2)
    engine.run()
    result["ckpt_uninterrupted"] = _final(up, low)
    for strategy in ("zero", "ddp"):
        engine, up, low, _ = reweight_program(
            strategy, checkpoint_dir=folder, resume=os.path.join(folder, "iter_00000002.pt")
        )
        assert engine.iteration == 2
        engine.run()
        result[f"ckpt_resumed_{strategy}"] = _final(up, low)

    # a differentiable unroll keeps its optimizer whole; the upper is sharded
    for strategy in ("ddp", "zero"):
        engine, up, low, _, _ = W.build_program("reverse", 2, 4, engine_kw={"strategy": strategy})
        engine.run()
        result[f"reverse_{strategy}"] = _final(up, low)
        result[f"reverse_sharding_{strategy}"] = dict(engine.sharding)

    # DARTS roll-back under zero: the window-start snapshot is the consolidated state
    for strategy in ("ddp", "zero"):
        engine, up, low, _ = reweight_program(strategy, method="finite_difference", roll_back=True)
        engine.run()
        result[f"rollback_{strategy}"] = _final(up, low)

    # the other optimizer-stepped lowers, and MAML (its meta-optimizer sharded)
    for method in ZERO_METHODS:
        for strategy in ("ddp", "zero"):
            engine, up, low, up_grads, _ = W.build_program(
                method, 1, 4, engine_kw={"strategy": strategy}
            )
            engine.run()
            result[f"{method}_{strategy}"] = _final(up, low) + [g[0] for g in up_grads]
            result[f"{method}_sharding_{strategy}"] = dict(engine.sharding)
    for strategy in ("ddp", "zero"):
        result[f"maml_{strategy}"] = W.maml_program(accumulation=2, iters=4, strategy=strategy)

    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
