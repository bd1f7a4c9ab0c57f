"""Many tasks at once: per-task meta-gradients, vectorized with ``torch.func.vmap`` or looped.

A meta-batch holds ``B`` tasks stacked along a leading dimension (``mlopt.data.meta_batch``).
For each task ``b`` the meta-gradient is ``∇_θ L_b(θ)``, where ``L_b`` runs the whole inner loop
(adaptation on the support set) and the query loss (Finn et al. 2017). :func:`meta_gradients`
computes the B gradients either as ONE vectorized computation,
``vmap(grad(L))(θ, tasks)``, or as a loop ``[grad(L)(θ, task_b) for b]``, and averages them.

Which formulation is right. The per-task gradient is taken *inside* the vmap. The other pattern,
``vmap`` of the per-task query loss followed by ``torch.autograd.grad`` of the summed losses
(differentiating *through* a vmap whose body calls ``torch.func.grad``: the layout of PyTorch's
functorch MAML example), gives wrong gradients on networks with batch normalization (measured
with torch 2.13 on a float64 Conv4: relative errors of 4e-2 to 6e-2 per parameter tensor, where
vmap-of-grad agrees with the loop to 4e-15; ``tests/test_meta_vectorize.py`` checks vmap-of-grad
against a loop, the Engine and hand-written autograd). This module only uses vmap-of-grad.

Which is faster depends on the device: on a CPU the kernels are already as wide as the cores,
and vmap mostly adds batching overhead and memory (measured here, torch 2.13, one thread, Conv4
with 64 filters, 5-way 1-shot, 15 queries, 5 inner steps, 16 tasks: the loop took 0.6 to 0.7 of
vmap's time, and vmap about ten times its memory); on a GPU small per-task kernels leave the
device idle and batching the tasks is where the gain is. ``mode="auto"`` therefore loops on the
CPU and vectorizes elsewhere; pass ``mode="vmap"`` or ``"loop"`` to force either.
``benchmarks/maml_benchmark.py`` measures both.

Example:
    >>> import torch
    >>> w = {"w": torch.tensor([1.0, 2.0])}
    >>> tasks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])          # two tasks, one vector each
    >>> loss = lambda p, t: (p["w"] * t).sum() ** 2              # per-task meta-loss
    >>> out = meta_gradients(loss, w, tasks, mode="vmap")
    >>> out.loss, out.gradients["w"]
    (tensor(2.5000), tensor([1., 2.]))
    >>> meta_gradients(loss, w, tasks, mode="loop").gradients["w"]
    tensor([1., 2.])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from mlopt.errors import ConfigError

__all__ = ["MODES", "MetaGradients", "choose_mode", "map_tasks", "meta_gradients", "num_tasks"]

MODES = ("auto", "vmap", "loop")
Params = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


class MetaGradients(NamedTuple):
    """Result of :func:`meta_gradients`, averaged over the tasks.

    Attributes:
        loss: mean meta-loss (a 0-dim tensor, detached).
        gradients: mean meta-gradient, same structure as the ``params`` given (dict or tuple).
        aux: mean of the auxiliary outputs (``has_aux=True``), else None.
    """

    loss: torch.Tensor
    gradients: Any
    aux: Any


def choose_mode(mode: str, device: torch.device | str | None) -> str:
    """Resolve ``"auto"`` to ``"loop"`` on the CPU and ``"vmap"`` on other devices.

    Example:
        >>> choose_mode("auto", "cpu"), choose_mode("auto", "cuda"), choose_mode("vmap", "cpu")
        ('loop', 'vmap', 'vmap')
    """
    if mode not in MODES:
        raise ConfigError(f"meta-batch mode must be one of {list(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    kind = torch.device(device).type if device is not None else "cpu"
    return "loop" if kind == "cpu" else "vmap"


def num_tasks(tasks: Any) -> int:
    """The size of the leading (task) dimension shared by every tensor in ``tasks``."""
    leaves, _ = tree_flatten(tasks)
    sizes = {t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(
            "tasks must be tensors (or a tuple/dict/Task of tensors) stacked along a leading "
            f"task dimension of one common size; got leading sizes {sorted(sizes)}: build the "
            "meta-batch with mlopt.data.meta_batch or TaskLoader"
        )
    return sizes.pop()


def _first_device(params: Any) -> torch.device | None:
    leaves, _ = tree_flatten(params)
    for t in leaves:
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def map_tasks(
    fn: Callable[[Any, Any], Any],
    params: Any,
    tasks: Any,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    randomness: str = "error",
) -> Any:
    """``fn(params, task_b)`` for every task ``b``, stacked along a new leading dimension.

    Args:
        fn: a function of the shared ``params`` and ONE task (tensors without the task
            dimension) returning a tensor or a pytree of tensors.
        params: shared inputs (not mapped over).
        tasks: tensors (or a tuple/dict/NamedTuple of tensors) with a leading task dimension.
        mode: ``"vmap"``, ``"loop"`` or ``"auto"`` (see :func:`choose_mode`).
        chunk_size: with ``"vmap"``, vectorize this many tasks at a time (bounds memory).
        randomness: vmap's randomness policy; ``"different"`` lets each task draw its own random
            numbers (e.g. MT-net's masks) and ``"same"`` shares them.

    Returns:
        ``fn``'s output with a leading task dimension.

    Example:
        >>> xs = torch.arange(6.0).reshape(3, 2)
        >>> map_tasks(lambda p, x: p * x.sum(), torch.tensor(2.0), xs, mode="loop")
        tensor([ 2., 10., 18.])
    """
    mode = choose_mode(mode, _first_device(params))
    n = num_tasks(tasks)
    if mode == "vmap":
        mapped = torch.func.vmap(
            fn, in_dims=(None, 0), chunk_size=chunk_size, randomness=randomness
        )
        return mapped(params, tasks)
    outs = [fn(params, tree_map(lambda t, b=b: t[b], tasks)) for b in range(n)]
    flat = [tree_flatten(o) for o in outs]
    spec = flat[0][1]
    stacked = [torch.stack(parts) for parts in zip(*(f[0] for f in flat))]
    return tree_unflatten(stacked, spec)


def meta_gradients(
    task_loss: Callable[..., Any],
    params: Params,
    tasks: Any,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> MetaGradients:
    """Mean over tasks of ``∇_θ task_loss(θ, task)``: one vectorized computation or a loop.

    The gradient of each task is taken inside the map (``vmap(grad(task_loss))``), which is
    exact also with batch normalization (see the module docstring).

    Args:
        task_loss: ``task_loss(params, task) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
            a scalar meta-loss of ONE task; it runs the inner loop itself, with ``torch.func``
            transforms (e.g. :func:`mlopt.meta.adapt`), not ``torch.autograd.grad``, so that it
            can be vmapped.
        params: the meta-parameters: a dict of name -> tensor (``torch.func.functional_call``
            style, e.g. ``problem.named_parameters()``) or a tuple of tensors. They are detached:
            the result is a plain gradient.
        tasks: the meta-batch, tensors with a leading task dimension (e.g. a stacked ``Task``).
        mode: ``"vmap"``, ``"loop"`` or ``"auto"`` (loop on the CPU, vmap elsewhere).
        has_aux: ``task_loss`` returns ``(loss, aux)``; ``aux`` (a tensor or pytree of tensors,
            e.g. the query accuracy) is averaged over tasks too.
        chunk_size: with vmap, vectorize this many tasks at a time.
        randomness: vmap's randomness policy (``"different"`` for random masks per task).

    Returns:
        :class:`MetaGradients` ``(loss, gradients, aux)``, averaged over the tasks. Use it from an
        upper problem as ``return {"loss": out.loss, "gradient": tuple(out.gradients.values())}``.

    Raises:
        ConfigError: unknown mode, or tasks without a common leading dimension.

    Example:
        >>> p = (torch.tensor(3.0),)
        >>> out = meta_gradients(lambda q, t: (q[0] - t) ** 2, p, torch.tensor([1.0, 2.0]))
        >>> out.gradients
        (tensor(3.),)
    """
    if isinstance(params, Mapping):
        detached: Any = {k: v.detach() for k, v in params.items()}
    elif isinstance(params, (tuple, list)):
        detached = tuple(v.detach() for v in params)
    else:
        raise ConfigError(
            "meta_gradients: params must be a dict of name -> tensor or a tuple of tensors, got "
            f"{type(params).__name__}"
        )
    grad_fn = torch.func.grad_and_value(task_loss, has_aux=has_aux)

    def per_task(p: Any, task: Any) -> Any:
        grads, value = grad_fn(p, task)
        return grads, value

    with torch.enable_grad():
        try:
            grads, value = map_tasks(
                per_task, detached, tasks, mode=mode, chunk_size=chunk_size, randomness=randomness
            )
        except RuntimeError as err:
            if "mutate a captured Tensor" not in str(err) and "in-place" not in str(err):
                raise
            raise ConfigError(
                "meta_gradients: the task loss modifies a tensor in place (e.g. batch norm "
                "updating running statistics), which torch.func transforms cannot differentiate; "
                "use Conv4(batch_norm='transductive') or 'none', or the Engine's bilevel path "
                f"(lower Config(type='reverse', initialize_from=...)). torch said: {err}"
            ) from err
    mean = lambda t: t.mean(0)  # noqa: E731
    grads = tree_map(mean, grads)
    if has_aux:
        loss, aux = value
        return MetaGradients(mean(loss).detach(), grads, tree_map(lambda t: mean(t).detach(), aux))
    return MetaGradients(mean(value).detach(), grads, None)
