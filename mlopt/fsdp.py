"""Parameter sharding for ``EngineConfig(strategy="fsdp")``: torch's ``fully_shard`` (FSDP2).

``strategy="fsdp"`` is ``strategy="ddp"`` (every rank runs the program on its share of the
data, under torchrun) with the module of each shardable problem wrapped by
:func:`torch.distributed.fsdp.fully_shard`: each rank stores ``1/W`` of its parameters, of their
gradients and of its optimizer's state, and the forward and backward passes all-gather the
parameters they need. It is for programs whose lowers are stepped by their optimizers and whose
hypergradient needs no second-order autograd through a sharded module: ``first_order``,
``finite_difference`` (DARTS) and ``sama``, e.g. the outer step of data reweighting with a
large model.

What ``fully_shard`` allows, measured on torch 2.13 (CPU, 2 gloo ranks, float64):

- forward, ``loss.backward()`` and ``optimizer.step()``: yes; the sharded gradient is the
  rank average (equal to the gradient on all ranks' data to 1e-16);
- gradients with respect to the inputs or other (unsharded) tensors, by ``backward`` or
  ``torch.autograd.grad``: yes, bit for bit;
- in-place writes into the sharded parameters (``param.copy_(θ + εv)``, ``to_local().add_``)
  followed by forward and backward: yes, bit for bit;
- ``torch.autograd.grad`` with respect to the sharded parameters: no ("appears to not have
  been used in the graph": the forward uses all-gathered copies);
- ``torch.func.functional_call`` with substituted parameters: no (full tensors:
  ``'Tensor' object has no attribute '_local_tensor'``; sharded ones: "got mixed torch.Tensor
  and DTensor"), except after ``unshard()``, which gathers the whole module;
- double backward (``create_graph=True``), even with respect to the inputs only: no
  (``setStorage: ... out of bounds for storage of size 0``: the gathered parameters are freed).

So mlopt takes gradients by ``backward`` and evaluates DARTS's and SAMA's ``θ ± εv`` by writing
them into the sharded parameters and restoring them exactly (:mod:`mlopt.runtime.sharded`), and
refuses, before training, what needs functional substitution or double backward (reverse mode,
MAML and the other meta-initializations, forward mode, ``cg``/``neumann``/``fixed_point``).

Example (two CPU processes)::

    torchrun --standalone --nproc_per_node 2 train.py   # with EngineConfig(strategy="fsdp")
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from mlopt.errors import ConfigError
from mlopt.hypergrad.first_order import FirstOrder
from mlopt.hypergrad.methods import FiniteDifference
from mlopt.hypergrad.sama import SAMA
from mlopt.sharding import check_state_hooks, swap_optimizer, undo_all

__all__ = ["SUPPORTED", "refusal", "keep_whole_reason", "shard_modules"]

#: the lower methods that run under ``fsdp``
SUPPORTED = (FirstOrder, FiniteDifference, SAMA)

_FIX = "use EngineConfig(strategy='zero') (optimizer state sharded) or strategy='ddp'"


def refusal(name: str, pp: Any) -> str | None:
    """Why the problem planned as ``pp`` cannot run under ``fsdp``, or None."""
    method = pp.method
    if pp.init is not None:
        why = (
            f"initialize_from={pp.init[0]!r} starts each window from the upper's parameters, "
            "substituted functionally (torch.func.functional_call), which a fully_shard module "
            "does not run"
        )
    elif pp.dopt is not None:
        what = "forward mode pushes tangents" if pp.tracks else "a differentiable unroll"
        why = (
            f"{what} through the lower's updates with substituted fast weights and double "
            "backward (create_graph=True), which fully_shard does not support"
        )
    elif pp.uppers and not isinstance(method, SUPPORTED):
        why = (
            "its hypergradient takes Hessian-vector products with create_graph=True through "
            "the lower's module, which fully_shard does not support (double backward fails in "
            "its storage resizing; autograd.grad does not see the sharded parameters)"
        )
    else:
        return None
    return (
        f"problem {name!r}: Config(type={method!r}) cannot run under EngineConfig("
        f"strategy='fsdp'): {why} (torch {torch.__version__}). strategy='fsdp' supports "
        f"lowers with type 'first_order', 'finite_difference' (DARTS) or 'sama'; {_FIX}"
    )


def keep_whole_reason(name: str, plans: Mapping[str, Any]) -> str | None:
    """Why ``name``'s module stays whole (replicated, as under ``ddp``), or None."""
    for low, pp in plans.items():
        if name in pp.uppers and not isinstance(pp.method, FirstOrder):
            return (
                f"its parameters are differentiated at {low!r}'s perturbed parameters "
                f"({pp.method!r}: θ ± εv) with torch.autograd.grad, which cannot differentiate "
                "with respect to fully_shard's sharded parameters"
            )
    return None


def _full_module_state(module: Any, state: dict, prefix: str, local_metadata: Any) -> None:
    for k, v in state.items():
        if _is_dtensor(v):
            state[k] = v.full_tensor()


def _shard_module_state(module: torch.nn.Module, state: dict, prefix: str, *args: Any) -> None:
    own = dict(module.named_parameters(prefix=prefix.rstrip(".")))
    for k, p in own.items():
        if k in state and _is_dtensor(p) and not _is_dtensor(state[k]):
            state[k] = _distribute(state[k], p)


def _full_optimizer_state(optimizer: Any, state_dict: dict) -> dict:
    # (new dicts: torch's state_dict() shares each parameter's live state dict)
    state_dict["state"] = {
        i: {k: v.full_tensor() if _is_dtensor(v) else v for k, v in st.items()}
        for i, st in state_dict["state"].items()
    }
    return state_dict


def _shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = dict(state_dict)
    out["state"] = {}
    for i, st in state_dict["state"].items():
        p = params[int(i)]
        out["state"][i] = {
            k: _distribute(v, p) if _same_shape_plain(v, p) else v for k, v in st.items()
        }
    return out


def _same_shape_plain(v: Any, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and not _is_dtensor(v) and _is_dtensor(p) and v.shape == p.shape


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _distribute(value: torch.Tensor, like: Any) -> Any:
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements)


def _shard_one(st: Any, problem: Any, mesh: Any) -> Callable[[], None]:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    module, old = st.module, st.optimizer
    check_state_hooks(old, st.name, "fsdp")
    names_of = {id(p): n for n, p in module.named_parameters()}
    if any(id(p) not in names_of for g in old.param_groups for p in g["params"]):
        raise ConfigError(
            f"problem {st.name!r}: its optimizer holds tensors that are not parameters of its "
            f"module, which strategy='fsdp' cannot shard with it; {_FIX}"
        )
    names = [[names_of[id(p)] for p in g["params"]] for g in old.param_groups]
    saved = copy.deepcopy(old.state_dict()) if old.state else None
    if not isinstance(module, FSDPModule):
        fully_shard(module, mesh=mesh)
    module.set_reshard_after_forward(True)  # (the root would keep its parameters gathered)
    module.register_state_dict_post_hook(_full_module_state)
    module.register_load_state_dict_pre_hook(_shard_module_state)
    params = dict(module.named_parameters())
    groups = [{**g, "params": [params[n] for n in ns]} for g, ns in zip(old.param_groups, names)]
    new = type(old)(groups, **old.defaults)
    new.register_state_dict_post_hook(_full_optimizer_state)
    new.register_load_state_dict_pre_hook(_shard_optimizer_state)
    if saved is not None:
        new.load_state_dict(saved)
    return swap_optimizer(st, problem, new)


def shard_modules(
    plans: Mapping[str, Any],
    states: Mapping[str, Any],
    problems: Mapping[str, Any],
    device: torch.device,
) -> tuple[dict[str, str], Callable[[], None]]:
    """Wrap each shardable problem's module by ``fully_shard`` and rebuild its optimizer over
    the sharded parameters (same class, groups, hyperparameters, state and step hooks; its lr
    scheduler rebound). The module's and the optimizer's ``state_dict()`` become collectives
    that give full tensors (the ``ddp`` format), and load full tensors, so checkpoints
    interchange with ``ddp``.

    Returns, per problem with an optimizer, ``"fsdp"`` or ``"whole: <reason>"``, and a function
    that puts the original optimizers back (the modules stay wrapped).

    Raises:
        ConfigError: a lower whose method cannot run under ``fsdp`` (see :func:`refusal`), no
            problem that can be sharded, or an optimizer that cannot be rebuilt.
    """
    from torch.distributed.device_mesh import init_device_mesh

    for name, pp in plans.items():
        why = refusal(name, pp)
        if why is not None:
            raise ConfigError(why)
    decisions: dict[str, str] = {}
    for name, st in states.items():
        if st.optimizer is None or st.module is None or not st.names:
            continue
        reason = keep_whole_reason(name, plans)
        decisions[name] = "fsdp" if reason is None else f"whole: {reason}"
    if "fsdp" not in decisions.values():
        raise ConfigError(
            "EngineConfig(strategy='fsdp'): no problem's module can be sharded ("
            + "; ".join(f"{n}: {d}" for n, d in decisions.items())
            + f"); {_FIX}"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    undo = [_shard_one(states[n], problems[n], mesh) for n, d in decisions.items() if d == "fsdp"]
    return decisions, functools.partial(undo_all, undo)
