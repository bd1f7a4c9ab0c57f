"""The contract every hypergradient method follows, the method registry, and the autograd node.

A lower problem's parameters ``θ`` depend on its uppers' parameters ``φ``. When an upper
differentiates its loss, the cotangent ``v = ∂L_upper/∂θ`` reaches the lower and the lower's
method maps it to ``v^T dθ/dφ``. Methods implement :meth:`Method.vjp` as a pure function of a
:class:`LowerContext` (tensors and closures) and the cotangent; :func:`attach` turns that into an
autograd node, so nested programs of any depth are ordinary autograd, and the result is
differentiable again when the caller asks for ``create_graph`` (needed to differentiate through a
middle level).

Example:
    >>> import torch
    >>> phi = torch.tensor([2.0], requires_grad=True)
    >>> theta = torch.tensor([1.0])
    >>> (out,) = attach((theta,), (phi,), lambda v: (3.0 * v[0],))
    >>> torch.autograd.grad(out.sum(), phi)
    (tensor([3.]),)
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mlopt.errors import ConfigError

__all__ = [
    "Vec",
    "LowerContext",
    "Transition",
    "Method",
    "attach",
    "register_method",
    "resolve_method",
    "available_methods",
    "create_graph_requested",
]

_CREATE_GRAPH: contextvars.ContextVar[bool] = contextvars.ContextVar("create_graph", default=False)


def create_graph_requested() -> bool:
    """Whether the backward pass running a method's vjp was asked for ``create_graph=True``
    (differentiating through a middle level): then the vjp's result must stay differentiable."""
    return _CREATE_GRAPH.get()


Vec = tuple[torch.Tensor, ...]


@dataclass
class LowerContext:
    """Everything a method may use about a lower problem at the moment of differentiation.

    Attributes:
        name: the lower problem's name (for error messages).
        params: the lower's parameters ``θ`` where the hypergradient is taken (detached).
        params_before: the lower's parameters before its last update (DARTS), or None.
        uppers: the tensors the hypergradient is taken with respect to (current parameters of
            every problem whose parameters appear in the lower's loss, then of the
            ``initialize_from`` problem).
        loss_fn: ``loss_fn(params) -> scalar``: the lower loss at ``params`` on its last batch,
            with ``uppers`` captured (differentiable with respect to both).
        lr: the lower's learning rate per parameter tensor (current value).
        init: indices into ``uppers`` of the meta-initialization tensors, aligned with
            ``params`` (``uppers[init[i]]`` started ``params[i]``), or None.
        memory: what the method accumulated during the window (see :meth:`Method.after_step`).
        step: the lower's step counter (for messages).
    """

    name: str
    params: Vec
    params_before: Vec | None
    uppers: Vec
    loss_fn: Callable[[Vec], torch.Tensor]
    lr: tuple[float, ...]
    init: tuple[int, ...] | None = None
    memory: Any = None
    step: int = 0
    extra: dict = field(default_factory=dict)

    def grad_fn(self, params: Vec) -> Vec:
        """``∇_θ f(θ, φ)`` at ``params``, differentiable (create_graph) in ``params`` and uppers."""
        loss = self.loss_fn(params)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def step_fn(self, params: Vec) -> Vec:
        """The gradient-descent update map ``Φ(θ, φ) = θ - lr ∇_θ f(θ, φ)``."""
        grads = self.grad_fn(params)
        return tuple(p - lr * g for p, g, lr in zip(params, grads, self.lr))


@dataclass
class Transition:
    """One lower update, for methods that track the dynamics (forward mode).

    Attributes:
        step_fn: ``step_fn(state, uppers) -> state``: the pure update map over the lower's full
            state (parameters followed by optimizer buffers).
        state: the state before the update (detached).
        uppers: the upper tensors the update depends on.
        n_params: how many leading entries of ``state`` are parameters.
        init: indices into ``uppers`` that initialized this window (at its first step), or None.
    """

    step_fn: Callable[[Vec, Vec], Vec]
    state: Vec
    uppers: Vec
    n_params: int
    init: tuple[int, ...] | None = None


class Method:
    """Base class of hypergradient methods. Subclass and override :meth:`vjp`.

    Attributes:
        name: registry name (``Config(type=name)``).
        differentiable_unroll: the lower's updates must be differentiable (reverse mode): its
            optimizer runs through ``mlopt.optim`` and the graph is kept through the window.
        exposes_graph: the upper differentiates straight through the lower's unroll graph
            (reverse mode) instead of calling :meth:`vjp`.
        tracks_dynamics: :meth:`after_step` must be called after each lower update.
        needs_params_before: the lower's parameters before its last update are kept (DARTS).
        needs_last_gradient: the gradient of the lower's last update is kept, in
            ``ctx.extra["grad"]`` with its optimizer and parameters (SAMA).
    """

    name: ClassVar[str] = ""
    differentiable_unroll: ClassVar[bool] = False
    exposes_graph: ClassVar[bool] = False
    tracks_dynamics: ClassVar[bool] = False
    needs_params_before: ClassVar[bool] = False
    needs_last_gradient: ClassVar[bool] = False

    def vjp(self, ctx: LowerContext, cotangent: Vec) -> Vec:
        """Map ``v = ∂L_upper/∂θ`` to ``v^T dθ/dφ`` for each tensor of ``ctx.uppers``."""
        return tuple(torch.zeros_like(u) for u in ctx.uppers)

    def direct_gradient(self, ctx: LowerContext) -> Vec | None:
        """A gradient for the uppers that does not depend on the upper loss (Reptile)."""
        return None

    def begin_window(self) -> Any:
        """Fresh per-window memory for :meth:`after_step`."""
        return None

    def after_step(self, memory: Any, transition: Transition) -> Any:
        """Update the per-window memory after one lower update (forward mode)."""
        return memory

    def truncate_at(self, unroll_steps: int) -> int | None:
        """Window step index at which a differentiable unroll is cut (None: never)."""
        return None

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in fields)
        return f"{type(self).__name__}({args})"


class _HypergradientNode(torch.autograd.Function):
    """Identity on the lower's parameters whose backward to the uppers is a method's vjp."""

    @staticmethod
    def forward(ctx, n_params, vjp_fn, *tensors):  # noqa: D401
        ctx.n_params = n_params
        ctx.vjp_fn = vjp_fn
        ctx.n_uppers = len(tensors) - n_params
        return tuple(t.clone() for t in tensors[:n_params])

    @staticmethod
    def backward(ctx, *cotangent):
        # grad mode is on here exactly when the caller asked for create_graph=True
        token = _CREATE_GRAPH.set(torch.is_grad_enabled())
        try:
            with torch.enable_grad():
                grads = ctx.vjp_fn(tuple(cotangent))
        finally:
            _CREATE_GRAPH.reset(token)
        if len(grads) != ctx.n_uppers:
            raise RuntimeError(
                f"hypergradient vjp returned {len(grads)} tensors for {ctx.n_uppers} uppers"
            )
        return (None, None, *([None] * ctx.n_params), *grads)


def attach(params: Vec, uppers: Vec, vjp_fn: Callable[[Vec], Vec]) -> Vec:
    """Return copies of ``params`` whose gradient flows to ``uppers`` through ``vjp_fn``.

    ``vjp_fn(cotangent) -> Vec`` receives the gradient w.r.t. ``params`` and returns one tensor
    (or None) per upper. When the caller differentiates with ``create_graph=True``, the vjp runs
    with grad mode on and its result stays differentiable.
    """
    params = tuple(p.detach() for p in params)
    if not any(u.requires_grad for u in uppers):
        return params
    return _HypergradientNode.apply(len(params), vjp_fn, *params, *uppers)


_REGISTRY: dict[str, Callable[[], Method]] = {}
# methods defined outside mlopt.hypergrad, imported on first use (no import side effects needed)
_LAZY: dict[str, str] = {"warpgrad": "mlopt.meta.methods"}


def _load_lazy(name: str) -> None:
    if name not in _REGISTRY and name in _LAZY:
        import importlib

        importlib.import_module(_LAZY[name])


def register_method(name: str, factory: Callable[[], Method], *, overwrite: bool = False) -> None:
    """Register a method under ``name`` so that ``Config(type=name)`` finds it.

    Example:
        >>> class Zero(Method):
        ...     name = "zero"
        >>> register_method("zero", Zero, overwrite=True)
        >>> resolve_method("zero").name
        'zero'
    """
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"hypergradient method {name!r} is already registered")
    _REGISTRY[name] = factory


def available_methods() -> list[str]:
    """Names accepted by ``Config(type=...)``."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def resolve_method(spec: Any) -> Method:
    """A method object from a registered name or an object with a ``vjp`` method.

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones).
    """
    if isinstance(spec, str):
        _load_lazy(spec)
        if spec not in _REGISTRY:
            raise ConfigError(
                f"unknown hypergradient method {spec!r}; valid names: {available_methods()}, "
                "or pass a mlopt.hypergrad.Method object"
            )
        return _REGISTRY[spec]()
    if isinstance(spec, type) and issubclass(spec, Method):
        return spec()
    if isinstance(spec, Method):
        return spec
    if callable(getattr(spec, "vjp", None)):
        return _duck_method(spec)
    raise ConfigError(
        f"Config.type must be a method name ({available_methods()}) or a Method object, "
        f"got {spec!r}"
    )


def _duck_method(spec: Any) -> Any:
    """Check a duck-typed method object (one with ``vjp`` that is not a :class:`Method`): the
    flags and hooks the runtime reads must be there with the right types."""
    missing = [
        a
        for a in (
            "differentiable_unroll",
            "exposes_graph",
            "tracks_dynamics",
            "needs_params_before",
            "needs_last_gradient",
        )
        if not isinstance(getattr(spec, a, False), bool)
    ]
    if missing:
        raise ConfigError(
            f"Config.type={spec!r}: {missing} must be True or False; subclass "
            "mlopt.hypergrad.Method to get the defaults"
        )
    hooks = ("direct_gradient", "begin_window", "after_step", "truncate_at")
    absent = [h for h in hooks if not callable(getattr(spec, h, None))]
    if absent:
        raise ConfigError(
            f"Config.type={spec!r} has vjp() but lacks {absent}; subclass "
            "mlopt.hypergrad.Method (it provides them) and override vjp()"
        )
    return spec


def zeros_for(uppers: Sequence[torch.Tensor]) -> Vec:
    """Zero gradients shaped like ``uppers``."""
    return tuple(torch.zeros_like(u) for u in uppers)
