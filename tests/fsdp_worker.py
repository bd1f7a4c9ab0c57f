"""Worker for tests/test_fsdp.py: ``torchrun --nproc_per_node 2 fsdp_worker.py OUT``.

Each rank runs data reweighting (an MLP lower, one learned weight per training example) under
``strategy="fsdp"``, under ``"ddp"`` and, as a single process, on all ranks' data at once
(``strategy="cpu"``, batches concatenated), and saves what it saw to ``OUT/rank{r}.pt``.

Example:
    >>> up, low = modules()
    >>> [tuple(p.shape) for p in low.parameters()]
    [(6, 4), (6,), (1, 6), (1,)]
"""

from __future__ import annotations

import os
import sys

import ddp_worker as W
import torch

import mlopt
from mlopt.checkpoint import read_checkpoint
from mlopt.errors import ConfigError
from mlopt.testing import capture_gradients

__all__ = ["METHODS", "REFUSED", "modules", "program"]

#: programs run under fsdp: lower method -> (lower optimizer, upper optimizer, roll_back);
#: SAMA's upper takes SGD: at Adam's first step SAMA's correction nearly cancels the gradient
#: (4e-9 here), and an Adam upper would normalize that cancellation's rounding into its step
METHODS = {
    "first_order": ("adam", "adam", False),
    "finite_difference": ("sgd", "adam", False),
    "darts_roll_back": ("adam", "adam", True),
    "sama": ("adam", "sgd", False),
}
#: programs that fsdp refuses before training, with what the message must name
REFUSED = ("reverse", "cg", "neumann", "forward", "maml")

F64 = torch.float64
_G = torch.Generator().manual_seed(7)
X = torch.randn(8, 4, generator=_G, dtype=F64)
Y = torch.tanh(X @ torch.randn(4, 1, generator=_G, dtype=F64)) + 0.3 * torch.randn(
    8, 1, generator=_G, dtype=F64
)
# 4 batches of 2 (batch k on rank k mod 2) and their union, 2 batches of 4 for one process
TRAIN = [(X[i : i + 2], Y[i : i + 2], torch.arange(i, i + 2)) for i in range(0, 8, 2)]
TRAIN_ALL = [(X[i : i + 4], Y[i : i + 4], torch.arange(i, i + 4)) for i in range(0, 8, 4)]
VALID = [(X[i : i + 4] + 0.1, Y[i : i + 4]) for i in (0, 4)]
VALID_ALL = [(X + 0.1, Y)]


class Weights(torch.nn.Module):
    """The upper's module: example weights; its forward also gives a penalty on its scale (a
    sharded module's parameters are used through its forward, where FSDP gathers them)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(0.1 * torch.randn(8, dtype=F64))
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=F64))

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.sigmoid(self.logits[idx]) * self.scale
        return w, ((self.scale - 0.5) ** 2).sum()


class Reweighted(mlopt.Problem):
    def training_step(self, batch):
        x, y, idx = batch
        w, _ = self.upper(idx)
        return (w * (self.module(x) - y).squeeze(-1) ** 2).mean()


class Validation(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        _, penalty = self.module(torch.arange(1))
        return ((self.lower(x) - y) ** 2).mean() + 0.1 * penalty


def modules() -> tuple[Weights, torch.nn.Module]:
    torch.manual_seed(3)
    low = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    return Weights(), low.double()


def program(strategy: str, method: str = "first_order", iters: int = 4, **engine_kw):
    """(engine, upper module, lower module, gradients seen by the upper's optimizer)."""
    kind, up_kind, roll_back = METHODS[method]
    up, low = modules()
    if kind == "adam":
        low_opt = torch.optim.Adam(low.parameters(), lr=0.05, weight_decay=0.01)
    else:
        low_opt = torch.optim.SGD(low.parameters(), lr=0.1, momentum=0.5)
    if up_kind == "adam":
        up_opt = torch.optim.Adam(up.parameters(), lr=0.1)
    else:
        up_opt = torch.optim.SGD(up.parameters(), lr=0.5, momentum=0.5)
    grads = capture_gradients(up_opt)  # registered before the Engine: the hook must move
    single = strategy == "cpu"
    lower = Reweighted(
        "lower",
        low,
        low_opt,
        train_data_loader=TRAIN_ALL if single else TRAIN,
        config=mlopt.Config(type="finite_difference" if method == "darts_roll_back" else method),
    )
    upper = Validation(
        "upper",
        up,
        up_opt,
        scheduler=torch.optim.lr_scheduler.StepLR(up_opt, step_size=1, gamma=0.5),
        train_data_loader=VALID_ALL if single else VALID,
    )
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, strategy=strategy, roll_back=roll_back, **engine_kw),
    )
    return engine, up, low, grads


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _numel(problem: mlopt.Problem) -> list[int]:
    """Elements this rank stores of the problem's parameters and of its optimizer's state."""

    def local(t: torch.Tensor) -> int:
        return t.to_local().numel() if hasattr(t, "to_local") else t.numel()

    state = problem.optimizer.state.values()
    return [
        sum(local(p) for p in problem.module.parameters()),
        sum(local(v) for s in state for v in s.values() if torch.is_tensor(v) and v.dim()),
    ]


def _final(up: torch.nn.Module, low: torch.nn.Module) -> list[torch.Tensor]:
    return [_full(p) for p in (*up.parameters(), *low.parameters())]


def _refused(case: str) -> str:
    try:
        if case == "maml":
            W.maml_program(accumulation=2, iters=1, strategy="fsdp")
        else:
            W.build_program(case, 2, 1, engine_kw={"strategy": "fsdp"})
    except ConfigError as err:
        return str(err)
    return "no error"


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {}
    for method in METHODS:
        for strategy in ("fsdp", "ddp", "cpu"):
            engine, up, low, grads = program(strategy, method)
            engine.run()
            seen = [_full(g) for gs in grads for g in gs]
            result[f"{method}_{strategy}"] = _final(up, low) + seen
            result[f"{method}_sharding_{strategy}"] = dict(engine.sharding)
            result[f"{method}_numel_{strategy}"] = _numel(engine.lower)
            result[f"{method}_lr_{strategy}"] = engine.upper.optimizer.param_groups[0]["lr"]

    # checkpoint under fsdp at iteration 2; resume under fsdp and under ddp
    folder = os.path.join(out, "ckpt")
    engine, up, low, _ = program("fsdp", checkpoint_dir=folder, checkpoint_step=2)
    engine.run()
    result["ckpt_uninterrupted"] = _final(up, low)
    state = read_checkpoint(os.path.join(folder, "iter_00000002.pt"))
    result["ckpt_lower_module"] = {
        k: tuple(v.shape) for k, v in state["problems"]["lower"]["module"].items()
    }
    for strategy in ("fsdp", "ddp"):
        engine, up, low, _ = program(
            strategy, checkpoint_dir=folder, resume=os.path.join(folder, "iter_00000002.pt")
        )
        assert engine.iteration == 2
        engine.run()
        result[f"ckpt_resumed_{strategy}"] = _final(up, low)

    for case in REFUSED:
        result[f"refused_{case}"] = _refused(case)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
