"""Worker for tests/test_distributed.py: ``torchrun --nproc_per_node 2 ddp_worker.py OUT``.

Each rank runs small programs with ``EngineConfig(strategy="ddp")`` (gloo on the CPU) and saves
what it saw to ``OUT/rank{r}.pt``; the test compares the ranks with single-process references
built by the same functions below (they do not need ``torch.distributed``).

Example:
    >>> up, low = hpo_modules(rank=0)
    >>> tuple(up.weight.shape), tuple(low.weight.shape)
    ((3,), (3,))
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import mlopt
from mlopt.hypergrad import Reverse
from mlopt.testing import capture_gradients

__all__ = [
    "F64",
    "IMPLICIT",
    "LOWER_DATA",
    "UPPER_DATA",
    "QLower",
    "QUpper",
    "Recorder",
    "hpo_modules",
    "build_program",
]

F64 = torch.float64
#: (method, lower optimizer is Adam) of the implicit-hypergradient cases
IMPLICIT = (("cg", False), ("neumann", False), ("fixed_point", False), ("sama", True))
N = 3
_G = torch.Generator().manual_seed(1234)
A = torch.eye(N, dtype=F64) * 2.0 + 0.3 * torch.ones(N, N, dtype=F64)
B = torch.randn(N, N, generator=_G, dtype=F64)
C = torch.randn(N, N, generator=_G, dtype=F64)
LOWER_DATA = [torch.randn(N, generator=_G, dtype=F64) for _ in range(4)]  # batch k: a vector
UPPER_DATA = [torch.randn(N, generator=_G, dtype=F64) for _ in range(4)]


class Vec(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(value.clone())

    def forward(self) -> torch.Tensor:
        return self.weight


class QLower(mlopt.Problem):
    """f(θ, φ; x) = ½θᵀAθ - θᵀ(Bφ + x): each batch x is a data vector."""

    def training_step(self, batch):
        theta, phi = self.module.weight, self.upper.module.weight
        return 0.5 * theta @ A @ theta - theta @ (B @ phi + batch)


class QUpper(mlopt.Problem):
    """F(θ, φ; y) = ½‖Cθ - y‖² + 0.05‖φ‖²."""

    def training_step(self, batch):
        r = C @ self.lower() - batch
        return 0.5 * r @ r + 0.05 * self.module.weight @ self.module.weight


def hpo_modules(rank: int) -> tuple[Vec, Vec]:
    """(upper, lower) modules whose initial values differ between ranks (the engine must
    broadcast rank 0's)."""
    g = torch.Generator().manual_seed(100 + rank)
    return Vec(torch.randn(N, generator=g, dtype=F64)), Vec(torch.randn(N, generator=g, dtype=F64))


def build_program(
    method: str,
    unroll: int,
    iters: int,
    *,
    rank_for_init: int = 0,
    lower_data: list | None = None,
    upper_data: list | None = None,
    engine_kw: dict | None = None,
    lower_adam: bool = False,
):
    """The two-level program; returns (engine, upper module, lower module, upper grads, lower
    grads) where the grads are those seen by each optimizer.step()."""
    up_mod, low_mod = hpo_modules(rank_for_init)
    if lower_adam:
        low_opt = torch.optim.Adam(low_mod.parameters(), lr=0.05)
    else:
        low_opt = torch.optim.SGD(low_mod.parameters(), lr=0.1, momentum=0.5)
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.2)
    lower = QLower(
        "lower",
        low_mod,
        low_opt,
        train_data_loader=LOWER_DATA if lower_data is None else lower_data,
        config=mlopt.Config(type=method, unroll_steps=unroll),
    )
    upper = QUpper(
        "upper",
        up_mod,
        up_opt,
        train_data_loader=UPPER_DATA if upper_data is None else upper_data,
    )
    up_grads, low_grads = capture_gradients(up_opt), capture_gradients(low_opt)
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, **(engine_kw or {})),
    )
    return engine, up_mod, low_mod, up_grads, low_grads


class TaskLower(mlopt.Problem):
    """A task's inner loss ½θᵀAθ - θᵀx, started from the meta-parameters."""

    def training_step(self, batch):
        theta = self.module.weight
        return 0.5 * theta @ A @ theta - theta @ batch


class MetaUpper(mlopt.Problem):
    """The meta-loss ½‖Cθ_T - y‖² of the adapted task parameters."""

    def training_step(self, batch):
        r = C @ self.task.module.weight - batch
        return 0.5 * r @ r


def maml_program(
    lower_data=None, upper_data=None, accumulation=1, iters=4, **engine_kw
) -> list[torch.Tensor]:
    """MAML (two inner steps, reverse mode, second order) with a meta-batch of
    ``accumulation`` tasks per rank; returns the meta-gradients."""
    g = torch.Generator().manual_seed(7)
    meta, task = Vec(torch.randn(N, generator=g, dtype=F64)), Vec(torch.zeros(N, dtype=F64))
    meta_opt = torch.optim.SGD(meta.parameters(), lr=0.1)
    upper = MetaUpper(
        "meta",
        meta,
        meta_opt,
        train_data_loader=upper_data or UPPER_DATA,
        config=mlopt.Config(gradient_accumulation=accumulation),
    )
    lower = TaskLower(
        "task",
        task,
        torch.optim.SGD(task.parameters(), lr=0.1),
        train_data_loader=lower_data or LOWER_DATA,
        config=mlopt.Config(initialize_from="meta", unroll_steps=2),
    )
    grads = capture_gradients(meta_opt)
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, **engine_kw),
    ).run()
    return [gr[0] for gr in grads]


class Recorder(mlopt.Problem):
    """A single problem that records the indices of the samples it is given."""

    def training_step(self, batch):
        (x,) = batch
        self.seen.extend(int(v) for v in x)
        return (self.module.weight * x.to(F64)).sum()


class RankEngine(mlopt.Engine):
    """Validation metric that differs per rank (the engine averages it over ranks)."""

    def validation(self) -> dict:
        return {"rank": float(torch.distributed.get_rank()), "one": 1.0}


def _shuffled_recorder(seed: int | None) -> list[int]:
    data = TensorDataset(torch.arange(8))
    mod = Vec(torch.zeros(1, dtype=F64))
    p = Recorder(
        "rec",
        mod,
        torch.optim.SGD(mod.parameters(), lr=0.1),
        train_data_loader=DataLoader(data, batch_size=1, shuffle=True),
    )
    p.__dict__["seen"] = []
    # 4 iterations x 2 ranks = one epoch of the 8 samples over the shared stream
    mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=4, strategy="ddp", seed=seed)).run()
    return p.seen


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {}

    # 1. reverse-mode HPO, persistent lower: its unrolled updates average the gradient over ranks
    # (differentiably), the upper's gradient is averaged once, checkpoint on rank 0
    engine, up, low, up_grads, _ = build_program(
        "reverse",
        2,
        6,
        rank_for_init=rank,
        engine_kw={
            "strategy": "ddp",
            "checkpoint_dir": os.path.join(out, "ckpt"),
            "checkpoint_step": 2,
        },
    )
    result["reverse_init"] = [up.weight.detach().clone(), low.weight.detach().clone()]
    engine.run()
    result["reverse_upper_grads"] = [g[0] for g in up_grads]
    result["reverse_final_upper"] = up.weight.detach().clone()
    result["reverse_final_lower"] = low.weight.detach().clone()

    # 1b. the same with Reverse(checkpoint=1): the backward pass replays the averaged updates
    engine, up, low, up_grads, _ = build_program(
        Reverse(checkpoint=1), 2, 4, rank_for_init=rank, engine_kw={"strategy": "ddp"}
    )
    engine.run()
    result["ckpt_reverse_upper_grads"] = [g[0] for g in up_grads]
    result["ckpt_reverse_final"] = [up.weight.detach().clone(), low.weight.detach().clone()]

    # 1c. MAML: a meta-initialized lower adapts to its own rank's task (local inner loop)
    result["maml_meta_grads"] = maml_program(strategy="ddp")
    # 1d. task-parallel meta-batch: 4 tasks, 2 per rank, one all-reduce per meta-update
    result["maml_meta_batch"] = maml_program(accumulation=2, iters=4, strategy="ddp")

    # 2. a non-differentiable lower (first-order): lower and upper optimizer steps both averaged
    engine, up, low, up_grads, low_grads = build_program(
        "first_order", 1, 4, rank_for_init=rank, engine_kw={"strategy": "ddp"}
    )
    result["fo_init"] = [up.weight.detach().clone(), low.weight.detach().clone()]
    engine.run()
    result["fo_lower_grads"] = [g[0] for g in low_grads]
    result["fo_upper_grads"] = [g[0] for g in up_grads]
    result["fo_final"] = [up.weight.detach().clone(), low.weight.detach().clone()]

    # 3. validation metrics averaged over ranks
    up_mod, low_mod = hpo_modules(0)
    lower = QLower(
        "lower",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=0.1),
        train_data_loader=LOWER_DATA,
        config=mlopt.Config(type="first_order"),
    )
    upper = QUpper(
        "upper", up_mod, torch.optim.SGD(up_mod.parameters(), lr=0.1), train_data_loader=UPPER_DATA
    )
    engine = RankEngine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=2, valid_step=1, strategy="ddp"),
    )
    result["history"] = engine.run()["history"]

    # 4. data sharding of a shuffled DataLoader: the ranks must walk the same stream
    result["seen_shuffled"] = _shuffled_recorder(0)

    # 5. DARTS roll-back: the redone updates are averaged across ranks too (same pipeline)
    engine, up, low, up_grads, low_grads = build_program(
        "finite_difference", 1, 4, engine_kw={"strategy": "ddp", "roll_back": True}
    )
    engine.run()
    result["darts_lower_grads"] = [g[0] for g in low_grads]  # update, redo, update, redo, ...
    result["darts_final"] = [up.weight.detach().clone(), low.weight.detach().clone()]

    # 6. implicit and SAMA hypergradients: each rank's on its own batches, averaged by the
    # upper's optimizer; SAMA's Adam correction from the rank-averaged gradient
    for method, adam in IMPLICIT:
        engine, up, low, up_grads, _ = build_program(
            method, 1, 4, engine_kw={"strategy": "ddp"}, lower_adam=adam
        )
        engine.run()
        result[f"implicit_{method}"] = [g[0] for g in up_grads] + [low.weight.detach().clone()]

    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
