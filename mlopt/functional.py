"""Run a module with given parameter tensors (``torch.func.functional_call``), without patching it.

:class:`ModuleView` is what ``problem.module`` returns: calling it, or a submodule or a custom
method reached through it, runs the real module with the problem's current parameters (the
differentiable fast weights during an unroll). Buffers (batch-norm statistics) stay the
module's own.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> w = {"weight": torch.ones(1, 2)}
    >>> view = ModuleView(net, lambda: w)
    >>> view(torch.tensor([[1.0, 2.0]]))
    tensor([[3.]])
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModuleView", "call_with", "trainable_parameters", "versions"]

ParamsFn = Callable[[], "Mapping[str, torch.Tensor] | None"]


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of the module's parameters that require gradients."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def versions(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Torch's in-place modification counters of ``tensors`` (``Tensor._version``, which every
    in-place operation bumps): equal before and after a call means nothing was written."""
    return tuple(t._version for t in tensors)


def _subdict(params: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(params)
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def call_with(module: nn.Module, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any):
    """``module(*args, **kwargs)`` with ``params`` in place of its parameters of the same names."""
    return functional_call(module, dict(params), args, kwargs, strict=False)


class _MethodCaller(nn.Module):
    """Forward = a named method of the wrapped module, so functional_call can run any method."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args: Any, **kwargs: Any):
        return getattr(self.inner, self.method)(*args, **kwargs)


_CALLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _caller(module: nn.Module, method: str) -> _MethodCaller:
    table = _CALLERS.setdefault(module, {})
    if method not in table:
        table[method] = _MethodCaller(module, method)
    return table[method]


class ModuleView:
    """A module seen through a parameter source.

    Args:
        module: the real module.
        params_fn: returns a dict of full parameter names (relative to the root module) to
            tensors, or None to use the module's own parameters.
        prefix: dotted path of ``module`` inside the root module.
    """

    __slots__ = ("_module", "_params_fn", "_prefix")

    def __init__(self, module: nn.Module, params_fn: ParamsFn, prefix: str = "") -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_params_fn", params_fn)
        object.__setattr__(self, "_prefix", prefix)

    @property
    def wrapped(self) -> nn.Module:
        """The real module (its parameters are the stored ones, not the current ones)."""
        return self._module

    def current_parameters(self) -> dict[str, torch.Tensor]:
        """This (sub)module's current parameters by name."""
        params = self._params_fn()
        if params is None:
            return dict(self._module.named_parameters())
        own = dict(self._module.named_parameters())
        own.update(_subdict(params, self._prefix))
        return own

    def __call__(self, *args: Any, **kwargs: Any):
        params = self._params_fn()
        if params is None:
            return self._module(*args, **kwargs)
        return call_with(self._module, _subdict(params, self._prefix), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        module = self._module
        attr = getattr(module, name)
        if isinstance(attr, nn.Module):
            return ModuleView(attr, self._params_fn, f"{self._prefix}{name}.")
        if name in module._parameters:
            params = self._params_fn()
            key = self._prefix + name
            return attr if params is None or key not in params else params[key]
        if (
            callable(attr)
            and not hasattr(nn.Module, name)
            and getattr(attr, "__self__", None) is module
        ):
            return lambda *a, **k: self._call_method(name, a, k)
        return attr

    def __getitem__(self, key: int | str) -> Any:
        """Items of container modules (Sequential, ModuleList, ParameterList, ...)."""
        item = self._module[key]
        if isinstance(key, int) and key < 0:
            key += len(self._module)
        if isinstance(item, nn.Module):
            return ModuleView(item, self._params_fn, f"{self._prefix}{key}.")
        params = self._params_fn()
        name = f"{self._prefix}{key}"
        return item if params is None or name not in params else params[name]

    def __len__(self) -> int:
        return len(self._module)

    def __iter__(self) -> Any:
        keys = self._module.keys() if hasattr(self._module, "keys") else range(len(self._module))
        return (self[k] for k in keys)

    def _call_method(self, method: str, args: tuple, kwargs: dict):
        params = self._params_fn()
        if params is None:
            return getattr(self._module, method)(*args, **kwargs)
        sub = {f"inner.{k}": v for k, v in _subdict(params, self._prefix).items()}
        return call_with(_caller(self._module, method), sub, *args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value)

    def __repr__(self) -> str:
        return f"ModuleView({self._module!r})"
