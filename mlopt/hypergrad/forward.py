"""Forward-mode hypergradients: carry ``d state / d φ`` along the unroll with ``torch.func.jvp``.

Franceschi, Donini, Frasconi and Pontil (2017), "Forward and Reverse Gradient-Based
Hyperparameter Optimization", section 3 (forward mode, real-time recurrent learning). For the
inner dynamics ``s_{t+1} = Φ(s_t, φ)`` over the full inner state ``s`` (parameters and optimizer
buffers, e.g. SGD momentum), the tangents ``Z_t = d s_t / d φ`` obey::

    Z_{t+1} = (∂Φ/∂s) Z_t + ∂Φ/∂φ,        Z_0 = d s_0 / d φ (zero unless s_0 depends on φ)

and the hypergradient contribution is ``Z_T^T ∂F/∂s_T``. Each step pushes one tangent per upper
coordinate through ``Φ`` with ``torch.func.jvp`` (vectorized with ``torch.func.vmap``), so memory
is ``(number of upper coordinates) x (state size)`` whatever the number of steps; time grows with
the number of upper coordinates, which suits a few hyperparameters (learning rates, weight decays)
and not a meta-initialization of millions of weights (use reverse mode there).

``step_fn(state, uppers) -> state`` must be a pure function composable with ``torch.func``
(compute inner gradients with ``torch.func.grad``, not ``torch.autograd.grad``; no in-place
updates of its inputs).

Example:
    >>> import torch
    >>> lr = torch.tensor([0.1], dtype=torch.float64)
    >>> step = lambda s, u: (s[0] - u[0] * s[0],)  # gradient descent on ½θ²: θ ← (1-lr) θ
    >>> theta0 = (torch.tensor([1.0], dtype=torch.float64),)
    >>> state, Z = forward_unroll(step, theta0, (lr,), 2)
    >>> forward_vjp(Z, (torch.ones(1, dtype=torch.float64),))  # d/dlr (1-lr)² = -2 (1-lr)
    (tensor([-1.8000], dtype=torch.float64),)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import jvp, vmap

from mlopt.errors import HypergradientError
from mlopt.linalg.vec import Vec, all_finite, as_vec

__all__ = [
    "Tangents",
    "upper_basis",
    "initial_tangents",
    "forward_step",
    "forward_unroll",
    "forward_vjp",
]

StepFn = Callable[[Vec, Vec], Vec]


@dataclass(frozen=True)
class Tangents:
    """``d state / d φ`` as one tangent per upper coordinate.

    Attributes:
        state: one tensor per state tensor, of shape ``(m, *state_i.shape)``: row ``j`` is the
            derivative of the state with respect to the ``j``-th coordinate of the uppers
            (coordinates numbered through the flattened uppers, in order).
        upper_shapes: the shapes of the upper tensors (``m`` is the sum of their sizes).
        upper_dtypes: their dtypes.
    """

    state: Vec
    upper_shapes: tuple[torch.Size, ...]
    upper_dtypes: tuple[torch.dtype, ...]

    @property
    def num_directions(self) -> int:
        """``m``, the number of upper coordinates."""
        return sum(_numel(s) for s in self.upper_shapes)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _offsets(uppers: Vec) -> list[int]:
    out, start = [], 0
    for u in uppers:
        out.append(start)
        start += u.numel()
    return out


def upper_basis(uppers: Vec, start: int = 0, stop: int | None = None) -> Vec:
    """Identity tangents of the uppers for coordinates ``start..stop-1``.

    Returns one tensor per upper, of shape ``(stop - start, *u.shape)``: row ``r`` is the unit
    vector of coordinate ``start + r`` (zero in every other upper tensor).

    Example:
        >>> upper_basis((torch.zeros(2), torch.zeros(())))
        (tensor([[1., 0.],
                [0., 1.],
                [0., 0.]]), tensor([0., 0., 1.]))
    """
    uppers = as_vec(uppers, "uppers")
    m = sum(u.numel() for u in uppers)
    stop = m if stop is None else stop
    rows = stop - start
    out = []
    for u, off in zip(uppers, _offsets(uppers), strict=False):
        block = torch.zeros(rows, u.numel(), dtype=u.dtype, device=u.device)
        lo, hi = max(start, off), min(stop, off + u.numel())
        if lo < hi:
            r = torch.arange(lo - start, hi - start, device=u.device)
            block[r, r + start - off] = 1
        out.append(block.reshape(rows, *u.shape))
    return tuple(out)


def initial_tangents(
    state0: Vec,
    uppers: Vec,
    tangent0: Tangents | Vec | None = None,
    init: slice | None = None,
) -> Tangents:
    """``Z_0 = d s_0 / d φ``: ``tangent0`` (zeros by default) plus, with ``init``, the identity.

    ``init`` is a slice of ``uppers`` whose tensors ARE the first state tensors (a
    meta-initialization: ``s_0[i] = uppers[init][i]``), so their tangents get the identity.

    Example:
        >>> Z = initial_tangents((torch.zeros(2),), (torch.zeros(2),), init=slice(0, 1))
        >>> Z.state[0]
        tensor([[1., 0.],
                [0., 1.]])
    """
    state0, uppers = as_vec(state0, "state0"), as_vec(uppers, "uppers")
    m = sum(u.numel() for u in uppers)
    if tangent0 is None:
        tangents = [torch.zeros((m, *s.shape), dtype=s.dtype, device=s.device) for s in state0]
    else:
        given = tangent0.state if isinstance(tangent0, Tangents) else as_vec(tangent0, "tangent0")
        if len(given) != len(state0) or any(
            t.shape != (m, *s.shape) for t, s in zip(given, state0, strict=False)
        ):
            raise HypergradientError(
                "forward: tangent0 must hold one tensor of shape (m, *state_i.shape) per state "
                f"tensor with m={m} upper coordinates; got shapes "
                f"{[tuple(t.shape) for t in given]} for state shapes "
                f"{[tuple(s.shape) for s in state0]}"
            )
        tangents = list(given)
    if init is not None:
        indices = range(len(uppers))[init] if isinstance(init, slice) else tuple(init)
        offsets = _offsets(uppers)
        for i, k in enumerate(indices):
            u = uppers[k]
            if i >= len(state0) or state0[i].shape != u.shape:
                raise HypergradientError(
                    f"forward: meta-initialization upper {k} (shape {tuple(u.shape)}) does not "
                    f"match state tensor {i}; the lower's parameters must have the shapes of "
                    "the initializing problem's parameters"
                )
            ident = upper_basis((u,))[0]
            rows = torch.zeros((m, *u.shape), dtype=tangents[i].dtype, device=u.device)
            rows[offsets[k] : offsets[k] + u.numel()] = ident.to(rows.dtype)
            tangents[i] = tangents[i] + rows
    return Tangents(
        tuple(tangents),
        tuple(u.shape for u in uppers),
        tuple(u.dtype for u in uppers),
    )


def _check_state(new_state: object, state: Vec) -> Vec:
    if isinstance(new_state, torch.Tensor) or not isinstance(new_state, (tuple, list)):
        raise HypergradientError(
            "forward: step_fn(state, uppers) must return a tuple of tensors (the new state), got "
            f"{type(new_state).__name__}"
        )
    new_state = tuple(new_state)
    shapes_differ = any(a.shape != b.shape for a, b in zip(new_state, state, strict=False))
    if len(new_state) != len(state) or shapes_differ:
        raise HypergradientError(
            "forward: step_fn must return a state with the same tensors and shapes as its input; "
            f"got {[tuple(t.shape) for t in new_state]} for {[tuple(t.shape) for t in state]}"
        )
    return new_state


def _push_chunk(
    step_fn: StepFn, state: Vec, uppers: Vec, z: Vec, basis: Vec, vectorize: bool
) -> tuple[Vec, Vec]:
    """(new state, tangents) for the directions of one chunk."""

    def push(z_row: Vec, e_row: Vec) -> tuple[Vec, Vec]:
        out, tangent = jvp(step_fn, (state, uppers), (z_row, e_row))
        # a tangent has its primal's dtype: torch 2.13's forward-over-reverse can promote it to
        # float64 (Python-number factors such as ``0.5 * lam * s`` with a 0-d ``lam``)
        return tuple(out), tuple(t.to(o.dtype) for t, o in zip(tangent, out, strict=True))

    if vectorize:
        return vmap(push, out_dims=(None, 0))(z, basis)
    rows = [push(tuple(t[j] for t in z), tuple(e[j] for e in basis)) for j in range(len(basis[0]))]
    new_state = rows[0][0]
    return new_state, tuple(torch.stack([r[1][i] for r in rows]) for i in range(len(state)))


_warned_fallback = False


def forward_step(
    step_fn: StepFn,
    state: Vec,
    uppers: Vec,
    tangents: Tangents,
    *,
    chunk_size: int | None = None,
    vectorize: bool = True,
) -> tuple[Vec, Tangents]:
    """One step of forward mode: ``s' = Φ(s, φ)`` and ``Z' = (∂Φ/∂s) Z + ∂Φ/∂φ``.

    Args:
        step_fn: ``step_fn(state, uppers) -> state``, pure and ``torch.func``-composable.
        state: the state before the step.
        uppers: ``φ``.
        tangents: ``Z`` before the step (see :func:`initial_tangents`).
        chunk_size: push at most this many upper coordinates at once (memory bound); ``None``
            pushes all of them in one vectorized call.
        vectorize: use ``torch.func.vmap`` over the coordinates; if ``step_fn`` cannot be
            vmapped (a warning says so) or ``vectorize=False``, a loop of single ``jvp`` calls
            computes the same numbers.

    Returns:
        ``(new_state, new_tangents)``, both outside autograd (detached).

    Example:
        >>> step = lambda s, u: (s[0] * u[0],)
        >>> Z = initial_tangents((torch.ones(1),), (torch.tensor([2.0]),))
        >>> forward_step(step, (torch.ones(1),), (torch.tensor([2.0]),), Z)[1].state[0]
        tensor([[1.]])
    """
    global _warned_fallback
    state = tuple(s.detach() for s in as_vec(state, "state"))
    uppers = tuple(u.detach() for u in as_vec(uppers, "uppers"))
    m = tangents.num_directions
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise HypergradientError(f"forward: chunk_size must be None or >= 1, got {chunk_size!r}")
    size = m if chunk_size is None else min(chunk_size, max(m, 1))
    new_state, parts = None, []
    with torch.no_grad():
        if m == 0:
            new_state = _check_state(step_fn(state, uppers), state)
        for start in range(0, m, max(size, 1)):
            stop = min(m, start + size)
            z = tuple(t[start:stop] for t in tangents.state)
            basis = upper_basis(uppers, start, stop)
            try:
                out, chunk = _push_chunk(step_fn, state, uppers, z, basis, vectorize)
            except (RuntimeError, NotImplementedError) as err:
                if not vectorize:
                    raise
                if not _warned_fallback:
                    warnings.warn(
                        f"forward mode: step_fn could not be vectorized with torch.func.vmap "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); falling back "
                        "to one jvp per upper coordinate (slower, same result)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    _warned_fallback = True
                vectorize = False
                out, chunk = _push_chunk(step_fn, state, uppers, z, basis, False)
            if new_state is None:
                new_state = _check_state(out, state)
            parts.append(chunk)
    if m == 0:
        new_tangents = tuple(
            torch.zeros((0, *s.shape), dtype=s.dtype, device=s.device) for s in state
        )
    elif len(parts) == 1:
        new_tangents = tuple(parts[0])
    else:
        new_tangents = tuple(torch.cat([p[i] for p in parts]) for i in range(len(state)))
    if not (all_finite(new_state) and all_finite(new_tangents)):
        raise HypergradientError(
            "forward: the inner state or its tangents became non-finite (NaN/Inf); the inner "
            "learning rate may be too large"
        )
    return new_state, Tangents(new_tangents, tangents.upper_shapes, tangents.upper_dtypes)


def forward_unroll(
    step_fn: StepFn,
    state0: Vec,
    uppers: Vec,
    steps: int,
    *,
    tangent0: Tangents | Vec | None = None,
    init: slice | None = None,
    chunk_size: int | None = None,
    vectorize: bool = True,
) -> tuple[Vec, Tangents]:
    """Run ``steps`` updates ``s ← Φ(s, φ)`` carrying ``Z = d s / d φ`` in forward mode.

    Args:
        step_fn: ``step_fn(state, uppers) -> state`` over the full inner state.
        state0: the initial state (parameters, then optimizer buffers).
        uppers: ``φ``, the upper tensors the dynamics depend on.
        steps: number of updates (>= 0).
        tangent0: ``d s_0 / d φ`` (a :class:`Tangents` from a previous call, or tensors of shape
            ``(m, *s_i.shape)``); zeros by default.
        init: slice of ``uppers`` that are the initial parameters (meta-initialization): their
            identity is added to ``tangent0``.
        chunk_size: see :func:`forward_step`.
        vectorize: see :func:`forward_step`.

    Returns:
        ``(state_T, Z_T)``: the final state (detached) and its tangents.

    Example:
        >>> step = lambda s, u: (s[0] - u[0] * s[0],)
        >>> _, Z = forward_unroll(step, (torch.ones(1),), (torch.tensor([0.5]),), 3)
        >>> Z.state[0]  # d/dlr (1 - lr)^3 = -3 (1 - lr)^2
        tensor([[-0.7500]])
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise HypergradientError(f"forward_unroll: steps must be an int >= 0, got {steps!r}")
    state = tuple(s.detach() for s in as_vec(state0, "state0"))
    uppers = as_vec(uppers, "uppers")
    tangents = initial_tangents(state, uppers, tangent0, init)
    for _ in range(steps):
        state, tangents = forward_step(
            step_fn, state, uppers, tangents, chunk_size=chunk_size, vectorize=vectorize
        )
    return state, tangents


def forward_vjp(
    tangents: Tangents,
    cotangent: Sequence[torch.Tensor | None],
    *,
    n_params: int | None = None,
) -> Vec:
    """Hypergradient contribution ``Z^T c``: ``sum_i <Z_i[j], c_i>`` for each upper coordinate j.

    Args:
        tangents: ``Z = d s_T / d φ`` from :func:`forward_unroll`.
        cotangent: ``c = ∂F/∂s_T`` for the leading state tensors (usually the parameters only);
            missing trailing entries and ``None`` entries count as zeros.
        n_params: if given, the number of leading state tensors ``cotangent`` covers (checked).

    Returns:
        One tensor per upper, shaped like it.

    Example:
        >>> Z = Tangents((torch.tensor([[1.0, 2.0]]),), (torch.Size([]),), (torch.float32,))
        >>> forward_vjp(Z, (torch.tensor([3.0, 4.0]),))
        (tensor(11.),)
    """
    cotangent = tuple(cotangent)
    if n_params is not None and len(cotangent) != n_params:
        raise HypergradientError(
            f"forward_vjp: got {len(cotangent)} cotangent tensors for n_params={n_params}"
        )
    if len(cotangent) > len(tangents.state):
        raise HypergradientError(
            f"forward_vjp: got {len(cotangent)} cotangent tensors for a state of "
            f"{len(tangents.state)} tensors"
        )
    m = tangents.num_directions
    flat = None
    for z, c in zip(tangents.state, cotangent, strict=False):
        if c is None:
            continue
        if tuple(c.shape) != tuple(z.shape[1:]):
            raise HypergradientError(
                f"forward_vjp: cotangent of shape {tuple(c.shape)} for a state tensor of shape "
                f"{tuple(z.shape[1:])}"
            )
        term = z.reshape(m, -1) @ c.detach().reshape(-1).to(z.dtype)
        flat = term if flat is None else flat + term
    device = tangents.state[0].device if tangents.state else None
    out, start = [], 0
    for shape, dtype in zip(tangents.upper_shapes, tangents.upper_dtypes, strict=False):
        n = _numel(shape)
        if flat is None:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
        else:
            out.append(flat[start : start + n].reshape(shape).to(dtype))
        start += n
    return tuple(out)
