"""Small pure pieces of one problem update: loss checking, gradients, clipping, finiteness.

Example:
    >>> import torch
    >>> g = (torch.tensor([3.0, 4.0]),)
    >>> clip_by_total_norm(g, 1.0)[0]
    tensor([0.6000, 0.8000])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mlopt.errors import ConfigError, HypergradientError
from mlopt.linalg.vec import all_finite

__all__ = [
    "split_output",
    "gradient",
    "missing_loss",
    "clip_by_total_norm",
    "all_finite",
    "autocast",
    "scaled_lr",
    "nonfinite_error",
    "skip_or_raise",
    "to_device",
    "optimizer_step",
    "clear_grads",
]

Vec = tuple[torch.Tensor, ...]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def split_output(name: str, out: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Split what ``training_step`` returned into a scalar loss and a metrics dict.

    Raises:
        ConfigError: if the loss is not a scalar tensor (the message names the problem).
    """
    metrics: dict[str, Any] = {}
    if isinstance(out, dict):
        if "loss" not in out:
            raise ConfigError(
                f"problem {name!r}: training_step returned a dict without a 'loss' key "
                f"(keys: {sorted(out)}); return a scalar tensor or {{'loss': ..., **metrics}}"
            )
        metrics = {k: v for k, v in out.items() if k != "loss"}
        out = out["loss"]
    if out is None:
        return None, metrics
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"problem {name!r}: training_step must return a scalar loss tensor, got {shape}; "
            "reduce it, e.g. with .mean() or .sum()"
        )
    return (out if out.dim() == 0 else out.reshape(())), metrics


def gradient(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    create_graph: bool,
    name: str | None = None,
) -> Vec:
    """``∂loss/∂params`` (zeros for unused parameters), keeping the graph if asked.

    Raises:
        ConfigError: with ``name`` (the problem), when the loss depends on none of ``params``
            (the problem would silently never train).
    """
    needs = [p for p in params if p.requires_grad]
    if not needs:
        return tuple(torch.zeros_like(p) for p in params)
    grads: Sequence[torch.Tensor | None] = [None] * len(params)
    if loss.requires_grad:
        grads = torch.autograd.grad(
            loss, params, create_graph=create_graph, allow_unused=True, materialize_grads=False
        )
    if name is not None and all(g is None for g in grads):
        raise ConfigError(
            f"problem {name!r}: the loss returned by training_step does not depend on any of its "
            f"{len(params)} trainable parameter tensor(s), so its gradient would be zero and it "
            "would never train; compute the loss through self.module(...) (or the parameters "
            "the optimizer holds), or freeze the parameters with requires_grad_(False)"
        )
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))


def missing_loss(name: str, count: int) -> ConfigError:
    """The error for a ``training_step`` that returned None although the problem trains."""
    return ConfigError(
        f"problem {name!r}: training_step returned None; return its loss (a scalar tensor, or "
        f"{{'loss': ..., **metrics}}): None would silently leave its {count} trainable tensor(s) "
        "untouched"
    )


def clip_by_total_norm(grads: Vec, max_norm: float) -> Vec:
    """Scale ``grads`` so that their joint 2-norm is at most ``max_norm`` (differentiable)."""
    if max_norm <= 0 or not grads:
        return grads
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return tuple(g * coef for g in grads)


def nonfinite_error(name: str, step: int, what: str) -> HypergradientError:
    """The error for a NaN/Inf ``what`` of problem ``name`` at ``step``."""
    return HypergradientError(
        f"problem {name!r}, step {step}: non-finite {what} (NaN or Inf). Lower the learning "
        "rate, clip gradients (Config(gradient_clipping=...)), check the data, or set "
        "Config(on_nonfinite='skip') to skip such updates with a warning"
    )


def skip_or_raise(policy: str, name: str, step: int, what: str) -> None:
    """Raise for a non-finite ``what`` (``policy="raise"``) or warn that the update is skipped.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     skip_or_raise("skip", "low", 3, "loss")
        >>> str(w[0].message)
        "problem 'low', step 3: non-finite loss; update skipped"
    """
    if policy == "raise":
        raise nonfinite_error(name, step, what)
    warnings.warn(
        f"problem {name!r}, step {step}: non-finite {what}; update skipped",
        RuntimeWarning,
        stacklevel=5,
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``"fp16"``/``"bf16"``; a no-op for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def scaled_lr(
    optimizer: torch.optim.Optimizer | None, factor: float
) -> contextlib.AbstractContextManager:
    """Temporarily multiply every param group's learning rate by ``factor`` (warm-up).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.5)
        >>> with scaled_lr(opt, 0.1):
        ...     round(opt.param_groups[0]["lr"], 6)
        0.05
        >>> opt.param_groups[0]["lr"]
        0.5
    """
    if optimizer is None or factor == 1.0:
        return contextlib.nullcontext()  # (every update goes through here: no generator)
    return _scaled_lr(optimizer, factor)


@contextlib.contextmanager
def _scaled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * factor
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other objects are returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _global_step_hooks() -> tuple[Any, ...]:
    from torch.optim import optimizer as torch_optimizer

    names = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    return tuple(getattr(torch_optimizer, n, None) for n in names)


# torch keeps step hooks in private dicts (per optimizer, and these two global ones, mutated in
# place); a hook, or a dict missing in another torch version, means: take the wrapped step
_GLOBAL_STEP_HOOKS = _global_step_hooks()


def _step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    own = optimizer.__dict__
    pre, post = _GLOBAL_STEP_HOOKS
    return bool(
        pre is None
        or post is None
        or pre
        or post
        or own.get("_optimizer_step_pre_hooks", True)
        or own.get("_optimizer_step_post_hooks", True)
    )


def optimizer_step(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()``, without torch's profiling wrapper when that would do nothing.

    ``torch.optim.Optimizer`` wraps every ``step`` in a ``record_function`` region and its hook
    loops (about 50 µs per call on a CPU, against 10 µs for SGD's own step on a 784-vector).
    With no step hook registered (on the optimizer or globally) and no profiler running, the
    wrapped function itself is called: the same update, bit for bit. Returns True when that fast
    path was taken (an lr scheduler then sees no ``optimizer.step()`` call: step it with
    :func:`mlopt.runtime.pipeline.scheduler_step_quietly`).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([p], lr=0.5)
        >>> p.grad = torch.ones(2)
        >>> optimizer_step(opt), p.detach()
        (True, tensor([0.5000, 0.5000]))
    """
    raw = getattr(type(optimizer).step, "__wrapped__", None)
    profiling = torch.autograd.profiler._is_profiler_enabled  # (no public query in torch 2.13)
    if raw is None or profiling or _step_hooks(optimizer):
        optimizer.step()
        return False
    if type(optimizer) is torch.optim.SGD and all(map(_plain_sgd_group, optimizer.param_groups)):
        with torch.no_grad():  # what SGD.step does here: param.add_(grad, alpha=-lr)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        return True
    raw(optimizer)
    return True


def _plain_sgd_group(group: dict) -> bool:
    """An SGD group whose update is ``param - lr * grad`` (no momentum, decay, maximize,
    fused or differentiable step, a number as the learning rate)."""
    lr = group["lr"]
    return (
        group.get("momentum") == 0
        and group.get("weight_decay") == 0
        and group.get("maximize") is False
        and not group.get("fused")
        and group.get("differentiable") is False
        and isinstance(lr, (int, float))
        and not isinstance(lr, bool)
    )


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiling region.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> p.grad = torch.ones(1)
        >>> clear_grads(torch.optim.SGD([p], lr=0.1)); p.grad is None
        True
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
