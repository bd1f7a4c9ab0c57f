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

Which is faster depends on the device and the model: on a CPU the kernels are already as wide
as the cores, and vmap mostly adds batching overhead (measured here, torch 2.13, one thread,
Conv4 with 64 filters, 5-way 1-shot, 15 queries, 5 inner steps, 16 tasks: the loop took 0.6 to
0.7 of vmap's time); on a GPU small per-task kernels leave the device idle and batching the tasks
is where the gain is. ``mode="auto"`` therefore measures: on the first call for a function, a
shape and a device, it runs the first chunk of tasks both ways, keeps the faster, and remembers
the choice (:func:`forget_measurements` clears it). The choice only changes the speed: both ways
compute the same values (to rounding). ``benchmarks/maml_benchmark.py`` measures both.

Memory. Every way holds the graph of the tasks it computes at once, and the per-task outputs:
vmapping all ``B`` tasks of a second-order meta-batch holds ``B`` inner-loop graphs (27 times the
loop's memory on that Conv4). The tasks are therefore taken ``chunk_size`` at a time (each chunk
one vmap, or a loop over it), and :func:`meta_gradients` sums each chunk's gradients as it goes,
so that memory is that of one chunk. Without a ``chunk_size``, on a CUDA device the chunk is as
many tasks as fit in ``memory_budget`` bytes (default: half the free device memory) by a one-task
measurement of the peak memory (:func:`auto_chunk_size`); elsewhere it is one task, the loop's
memory. A chunk of one task is computed without vmap (batching one task only adds overhead:
vmapping single tasks took 1.13 times the loop's memory on that Conv4), so on the CPU the
default ``mode="vmap"`` runs as the loop; pass a ``chunk_size`` to vectorize (at about
``chunk_size`` times the memory).

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

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from mlopt.errors import ConfigError

__all__ = [
    "MODES",
    "MetaGradients",
    "auto_chunk_size",
    "choose_mode",
    "forget_measurements",
    "map_tasks",
    "meta_gradients",
    "num_tasks",
]

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


_MEASURED: dict[tuple, str] = {}  # (function, closure, shapes, device, chunk) -> "vmap"/"loop"


def choose_mode(mode: str, device: torch.device | str | None) -> str:
    """Check ``mode``; resolve ``"auto"`` by the device alone (``"loop"`` on the CPU, ``"vmap"``
    elsewhere). :func:`map_tasks` and :func:`meta_gradients` resolve ``"auto"`` by measuring
    instead; this is the guess for callers that cannot run the function twice.

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


def auto_chunk_size(n: int, task_bytes: float, budget: float) -> int:
    """Tasks per chunk: as many as fit in ``budget`` bytes at ``task_bytes`` each (1 to ``n``).

    Example:
        >>> auto_chunk_size(16, 400e6, 2e9), auto_chunk_size(16, 400e6, 1e6)
        (5, 1)
    """
    if task_bytes <= 0:
        return n
    return max(1, min(n, int(budget // task_bytes)))


def forget_measurements() -> None:
    """Forget the choices ``mode="auto"`` has measured (the next call measures again)."""
    _MEASURED.clear()


def _take(tasks: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop], tasks)


def _vmap(fn: Callable, params: Any, tasks: Any, randomness: str) -> Any:
    if _unbatched(tasks, randomness):  # batching one task only adds overhead (and memory)
        return tree_map(lambda t: t.unsqueeze(0), fn(params, tree_map(lambda t: t[0], tasks)))
    return torch.func.vmap(fn, in_dims=(None, 0), randomness=randomness)(params, tasks)


def _unbatched(tasks: Any, randomness: str) -> bool:
    """A chunk of one task is computed as it is: vmap would draw the same random numbers (none,
    or shared ones) and compute the same values, with batching overhead (13% more memory
    measured on a second-order Conv4)."""
    return randomness != "different" and num_tasks(tasks) == 1


def _loop(fn: Callable, params: Any, tasks: Any, randomness: str) -> Any:
    outs = [fn(params, tree_map(lambda t, b=b: t[b], tasks)) for b in range(num_tasks(tasks))]
    flat = [tree_flatten(o) for o in outs]
    stacked = [torch.stack(parts) for parts in zip(*(f[0] for f in flat))]
    return tree_unflatten(stacked, flat[0][1])


WAYS = {"vmap": _vmap, "loop": _loop}


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _signature(fn: Callable, params: Any, tasks: Any, device: Any, chunk: int) -> tuple:
    """What a measured choice is remembered by: the function (code and closure), the shapes and
    dtypes of its inputs, the device and the chunk size."""
    fn = getattr(fn, "func", fn)  # a functools.partial: its function
    cells = getattr(fn, "__closure__", None) or ()
    body = (getattr(fn, "__code__", type(fn)), tuple(id(c.cell_contents) for c in cells))
    leaves, spec = tree_flatten((params, tasks))
    shapes = tuple((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))
    return body, str(spec), shapes, str(device), chunk


def _one_task_bytes(fn: Callable, params: Any, tasks: Any, device: torch.device) -> int:
    """Peak CUDA memory of ``fn`` on the first task, above what was allocated before."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _loop(fn, params, _take(tasks, 0, 1), "error")
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _chunk_size(
    fn: Callable, params: Any, tasks: Any, n: int, chunk_size: int | None, budget: float | None
) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
        return min(chunk_size, n)
    device = _first_device(params)
    if device is None or device.type != "cuda":
        return 1  # one task at a time: the loop's memory
    if budget is None:
        budget = torch.cuda.mem_get_info(device)[0] / 2
    return auto_chunk_size(n, _one_task_bytes(fn, params, tasks, device), budget)


def _chunks(
    fn: Callable,
    params: Any,
    tasks: Any,
    *,
    mode: str,
    chunk_size: int | None,
    randomness: str,
    memory_budget: float | None,
    key: Callable | None = None,
) -> Iterator[Any]:
    """``fn``'s stacked outputs, chunk by chunk (the shared engine of the public functions)."""
    choose_mode(mode, None)  # (checks the name)
    n = num_tasks(tasks)
    size = _chunk_size(fn, params, tasks, n, chunk_size, memory_budget)
    bounds = [(a, min(n, a + size)) for a in range(0, n, size)]
    if mode == "auto":
        device = _first_device(params)
        sig = _signature(key or fn, params, _take(tasks, 0, 1), device, size)
        mode = _MEASURED.get(sig, "")
        if not mode and _unbatched(_take(tasks, *bounds[0]), randomness):
            mode = "loop"  # chunks of one task: both ways are the same computation
        if not mode:  # time the first chunk both ways; keep the faster
            first, seconds, outs = _take(tasks, *bounds[0]), {}, {}
            for way in ("vmap", "loop"):
                _sync(device)
                t0 = time.perf_counter()
                outs[way] = WAYS[way](fn, params, first, randomness)
                _sync(device)
                seconds[way] = time.perf_counter() - t0
            mode = _MEASURED[sig] = min(seconds, key=seconds.__getitem__)
            yield outs.pop(mode)
            del outs
            bounds = bounds[1:]
    for a, b in bounds:
        yield WAYS[mode](fn, params, _take(tasks, a, b), randomness)


def map_tasks(
    fn: Callable[[Any, Any], Any],
    params: Any,
    tasks: Any,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    randomness: str = "error",
    memory_budget: float | None = None,
) -> Any:
    """``fn(params, task_b)`` for every task ``b``, stacked along a new leading dimension.

    Args:
        fn: a function of the shared ``params`` and ONE task (tensors without the task
            dimension) returning a tensor or a pytree of tensors.
        params: shared inputs (not mapped over).
        tasks: tensors (or a tuple/dict/NamedTuple of tensors) with a leading task dimension.
        mode: ``"vmap"``, ``"loop"`` or ``"auto"`` (measured on the first call, see the module
            docstring).
        chunk_size: tasks computed at once (one vmap each, or a loop over them); memory is that
            of one chunk. None: chosen (see the module docstring).
        randomness: vmap's randomness policy; ``"different"`` lets each task draw its own random
            numbers (e.g. MT-net's masks) and ``"same"`` shares them (within a chunk).
        memory_budget: bytes a chunk may take when ``chunk_size`` is None (CUDA only).

    Returns:
        ``fn``'s output with a leading task dimension.

    Example:
        >>> xs = torch.arange(6.0).reshape(3, 2)
        >>> map_tasks(lambda p, x: p * x.sum(), torch.tensor(2.0), xs, mode="loop")
        tensor([ 2., 10., 18.])
    """
    parts = list(
        _chunks(
            fn,
            params,
            tasks,
            mode=mode,
            chunk_size=chunk_size,
            randomness=randomness,
            memory_budget=memory_budget,
        )
    )
    if len(parts) == 1:
        return parts[0]
    flat = [tree_flatten(o) for o in parts]
    return tree_unflatten([torch.cat(c) for c in zip(*(f[0] for f in flat))], flat[0][1])


def meta_gradients(
    task_loss: Callable[..., Any],
    params: Params,
    tasks: Any,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: str = "error",
    memory_budget: float | None = None,
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
        mode: ``"vmap"``, ``"loop"`` or ``"auto"`` (the faster, measured on the first call).
        has_aux: ``task_loss`` returns ``(loss, aux)``; ``aux`` (a tensor or pytree of tensors,
            e.g. the query accuracy) is averaged over tasks too.
        chunk_size: tasks computed at once; their gradients are summed before the next chunk,
            so memory is one chunk's. None: chosen (see the module docstring).
        randomness: vmap's randomness policy (``"different"`` for random masks per task).
        memory_budget: bytes a chunk may take when ``chunk_size`` is None (CUDA only).

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

    total: Any = None
    with torch.enable_grad():
        try:
            for part in _chunks(
                per_task,
                detached,
                tasks,
                mode=mode,
                chunk_size=chunk_size,
                randomness=randomness,
                memory_budget=memory_budget,
                key=task_loss,
            ):
                part = tree_map(lambda t: t.sum(0), part)
                total = part if total is None else tree_map(torch.add, total, part)
        except RuntimeError as err:
            if "mutate a captured Tensor" not in str(err) and "in-place" not in str(err):
                raise
            raise ConfigError(
                "meta_gradients: the task loss modifies a tensor in place (e.g. batch norm "
                "updating running statistics), which torch.func transforms cannot differentiate; "
                "use Conv4(batch_norm='transductive') or 'none', or the Engine's bilevel path "
                f"(lower Config(type='reverse', initialize_from=...)). torch said: {err}"
            ) from err
    n = num_tasks(tasks)
    grads, value = tree_map(lambda t: t / n, total)
    if has_aux:
        loss, aux = value
        return MetaGradients(loss.detach(), grads, tree_map(lambda t: t.detach(), aux))
    return MetaGradients(value.detach(), grads, None)
