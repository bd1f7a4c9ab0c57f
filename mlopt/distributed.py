"""Data parallelism with ``torch.distributed`` (launch with ``torchrun``).

Every rank runs the whole program on its share of each data stream (batch ``k`` of a loader goes
to rank ``k mod world_size``). Gradients are averaged exactly once, when a problem applies its
optimizer: the total gradient there (direct plus hypergradient) is all-reduced. Inside a
differentiable unroll, a persistent lower (one without ``initialize_from``) is one model trained
on every rank's data: its update takes the gradient averaged over ranks through a differentiable
all-reduce, so it stays identical on all ranks and the hypergradient equals the single-process
one; a meta-initialized lower (MAML) adapts to its own rank's task and stays local. Modules start
identical (broadcast from rank 0). Backend: nccl on CUDA, gloo on the CPU.

Example (two CPU processes)::

    torchrun --standalone --nproc_per_node 2 train.py   # with EngineConfig(strategy="ddp")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from mlopt.errors import ConfigError

__all__ = ["DataParallel", "average_"]


def average_(tensors: Sequence[torch.Tensor], world: int) -> None:
    """All-reduce ``tensors`` in place to their mean over ``world`` ranks."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i : i + n].view_as(t))
        i += n


def _sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class DataParallel:
    """Process-group set-up and gradient averaging for ``EngineConfig(strategy="ddp")``."""

    def __init__(self, device: torch.device, strategy: str = "ddp") -> None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                f"EngineConfig(strategy={strategy!r}) needs torch.distributed environment "
                "variables; launch with `torchrun --nproc_per_node N script.py`"
            )
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def start(self, modules: Sequence[torch.nn.Module]) -> None:
        """Start every rank from rank 0's generator state and modules."""
        # every rank walks the same data stream (shuffling uses torch's global generator):
        # start all ranks from rank 0's generator state
        state = torch.get_rng_state().to(self.device)
        dist.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())
        for module in modules:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t, src=0)

    def reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over ranks (a ``DTensor`` gradient of a
        ``fully_shard`` parameter is already the average: FSDP reduce-scattered it)."""
        grads = [p.grad for p in params if p.grad is not None and not _sharded(p.grad)]
        average_(grads, self.world)

    def average_differentiable(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The mean of ``tensors`` over ranks, differentiably (the backward pass all-reduces the
        cotangents, so a hypergradient through it, averaged once more by the upper's optimizer,
        equals the single-process one on all ranks' data)."""
        from torch.distributed.nn.functional import all_reduce

        if not tensors:
            return tuple(tensors)
        flat = all_reduce(torch.cat([t.reshape(-1) for t in tensors])) / self.world
        return tuple(
            part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)
        )

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each validation metric over ranks (so every rank decides alike)."""
        if not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()
