"""Run a user's ``torch.optim`` optimizer differentiably, without rebuilding it.

:class:`DifferentiableOptimizer` reads the optimizer's ``param_groups`` at every call (so learning
rate schedulers and user edits take effect), starts from a detached copy of its ``state`` (or from
an empty state, as for a new task in MAML), applies the pure rules of :mod:`mlopt.optim.rules`
to a list of (fast) weight tensors, and can write the final state back into the optimizer, after
which ``optimizer.step()`` continues exactly as if torch itself had made the unrolled steps.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> dopt = DifferentiableOptimizer(opt, list(net.parameters()))
    >>> weights, state = list(net.parameters()), dopt.init_state()
    >>> loss = net.weight.sum() + net.bias.sum()
    >>> grads = torch.autograd.grad(loss, weights, create_graph=True)
    >>> weights, state = dopt.step(weights, grads, state)
    >>> dopt.commit(state)
    >>> sorted(opt.state[net.weight])
    ['momentum_buffer']
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mlopt.errors import ConfigError
from mlopt.optim import rules

__all__ = ["DifferentiableOptimizer", "supported_optimizers", "is_supported"]

Scalar = float | Tensor
_SUPPORTED: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
}


def supported_optimizers() -> tuple[str, ...]:
    """Names of the ``torch.optim`` classes that can be unrolled differentiably.

    Example:
        >>> supported_optimizers()
        ('SGD', 'Adam', 'AdamW')
    """
    return tuple(_SUPPORTED)


def _kind(optimizer: object) -> str | None:
    """``"sgd"`` or ``"adam"`` if the optimizer's update is one the rules reproduce, else None.

    A subclass counts only if it keeps the base class's ``step`` (a custom ``step`` could do
    anything, so it is not supported).
    """
    for name, cls in _SUPPORTED.items():
        if type(optimizer) is cls or (
            isinstance(optimizer, cls)
            and inspect.unwrap(type(optimizer).step) is inspect.unwrap(cls.step)
        ):
            return "sgd" if name == "SGD" else "adam"
    return None


def is_supported(optimizer: object) -> bool:
    """Whether :class:`DifferentiableOptimizer` can wrap ``optimizer``.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> is_supported(torch.optim.Adam(p)), is_supported(torch.optim.RMSprop(p))
        (True, False)
    """
    return _kind(optimizer) is not None


def _unsupported_message(optimizer: object) -> str:
    return (
        f"optimizer {type(optimizer).__name__} cannot be unrolled differentiably (needed by the "
        f"'reverse' and 'forward' hypergradient methods); supported optimizers: "
        f"{', '.join(supported_optimizers())}. Use a non-differentiable method such as 'cg' or "
        f"'first_order' for this problem, or switch its optimizer to a supported one."
    )


def _as_scalar(value: Any) -> Any:
    """A 1-element tensor hyperparameter as a 0-dim tensor (as torch's ``_to_scalar``)."""
    if isinstance(value, Tensor) and value.dim() > 0:
        return value.reshape(())
    return value


class DifferentiableOptimizer:
    """Differentiable, functional view of a user's SGD, Adam or AdamW optimizer.

    Args:
        optimizer: the user's optimizer; never rebuilt. Its hyperparameters are read from
            ``param_groups`` at every :meth:`step`.
        params: the parameters to update, in the order used by :meth:`step` (each must belong to
            one of the optimizer's param groups).

    Raises:
        ConfigError: unsupported optimizer type, a parameter not in the optimizer (or given twice),
            or a complex parameter with Adam/AdamW.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> dopt = DifferentiableOptimizer(torch.optim.Adam([w], lr=0.1), [w])
        >>> new, state = dopt.step([w], [torch.tensor([2.0])], dopt.init_state(fresh=True))
        >>> new[0].detach()
        tensor([0.9000])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}; pass the "
                f"problem's optimizer object"
            )
        kind = _kind(optimizer)
        if kind is None:
            raise ConfigError(_unsupported_message(optimizer))
        self.optimizer = optimizer
        self.kind = kind
        self.params = list(params)
        group_of = {
            id(p): index
            for index, group in enumerate(optimizer.param_groups)
            for p in group["params"]
        }
        seen: set[int] = set()
        self._groups: list[int] = []
        for position, p in enumerate(self.params):
            if id(p) in seen:
                raise ConfigError(
                    f"parameter {position} (shape {tuple(p.shape)}) is given twice; pass each "
                    f"parameter once"
                )
            seen.add(id(p))
            if id(p) not in group_of:
                raise ConfigError(
                    f"parameter {position} (shape {tuple(p.shape)}) is not in the "
                    f"{type(optimizer).__name__} optimizer's param_groups; build the optimizer "
                    f"over all of the module's trainable parameters"
                )
            if kind == "adam" and p.is_complex():
                raise ConfigError(
                    f"parameter {position} is complex; differentiable Adam/AdamW supports real "
                    f"parameters only: use SGD, or a non-differentiable method such as 'cg'"
                )
            self._groups.append(group_of[id(p)])

    def __repr__(self) -> str:
        return (
            f"DifferentiableOptimizer({type(self.optimizer).__name__}, {len(self.params)} params)"
        )

    def hyperparameters(self, index: int) -> dict[str, Any]:
        """Keyword arguments of the rule for parameter ``index``, read from its group now.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(1))
            >>> DifferentiableOptimizer(torch.optim.SGD([w], lr=0.5), [w]).hyperparameters(0)["lr"]
            0.5
        """
        group = self.optimizer.param_groups[self._groups[index]]
        common = {
            "lr": _as_scalar(group["lr"]),
            "weight_decay": _as_scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }
        if self.kind == "sgd":
            return {
                **common,
                "momentum": _as_scalar(group.get("momentum", 0.0)),
                "dampening": _as_scalar(group.get("dampening", 0.0)),
                "nesterov": bool(group.get("nesterov", False)),
            }
        beta1, beta2 = group["betas"]
        return {
            **common,
            "betas": (_as_scalar(beta1), _as_scalar(beta2)),
            "eps": group["eps"],
            "amsgrad": bool(group.get("amsgrad", False)),
        }

    def _rule(self, index: int):
        if self.kind == "sgd":
            return rules.sgd
        group = self.optimizer.param_groups[self._groups[index]]
        decoupled = group.get(
            "decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)
        )
        return rules.adamw if decoupled else rules.adam

    def init_state(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Starting state for an unroll: one dict per parameter, in ``params`` order.

        Args:
            fresh: if True, empty states (a new task, as in MAML); otherwise a detached copy of
                ``optimizer.state`` (empty for a parameter torch has not stepped yet).

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(1))
            >>> DifferentiableOptimizer(torch.optim.SGD([w], lr=0.1), [w]).init_state()
            [{}]
        """
        if fresh:
            return [{} for _ in self.params]
        states = []
        for p in self.params:
            stored = self.optimizer.state.get(p, {})
            states.append(
                {
                    key: value.detach().clone() if isinstance(value, Tensor) else value
                    for key, value in stored.items()
                    if value is not None
                }
            )
        return states

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: Sequence[dict[str, Any]],
        *,
        lr: Sequence[Scalar | None] | None = None,
    ) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """One differentiable optimizer step on ``params`` (pure: nothing is modified).

        Args:
            params: current weights, aligned with the constructor's ``params``.
            grads: their gradients (built with ``create_graph=True`` to differentiate through the
                step); ``None`` leaves that parameter and its state unchanged, as torch does.
            state: per-parameter states from :meth:`init_state` or a previous :meth:`step`.
            lr: optional per-parameter learning rates overriding the group's (numbers or tensors,
                e.g. learned per-element rates as in Meta-SGD); a ``None`` entry keeps the group's.

        Returns:
            ``(new_params, new_state)``.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0]))
            >>> dopt = DifferentiableOptimizer(torch.optim.SGD([w], lr=0.1), [w])
            >>> dopt.step([w], [torch.tensor([1.0])], [{}], lr=[torch.tensor([0.5])])[0]
            [tensor([0.5000], grad_fn=<SubBackward0>)]
        """
        n = len(self.params)
        lengths = {"params": len(params), "grads": len(grads), "state": len(state)}
        if lr is not None:
            lengths["lr"] = len(lr)
        wrong = {name: size for name, size in lengths.items() if size != n}
        if wrong:
            raise ConfigError(
                f"DifferentiableOptimizer.step expects one entry per parameter ({n}); got "
                f"{wrong}: pass params, grads, state (and lr) in the constructor's order"
            )
        new_params: list[Tensor] = []
        new_state: list[dict[str, Any]] = []
        for i in range(n):
            param, grad = params[i], grads[i]
            if grad is None:
                new_params.append(param)
                new_state.append(dict(state[i]))
                continue
            if grad.is_sparse:
                raise ConfigError(
                    f"parameter {i} has a sparse gradient; differentiable optimizers need dense "
                    f"gradients (e.g. nn.Embedding(sparse=False))"
                )
            kwargs = self.hyperparameters(i)
            if lr is not None and lr[i] is not None:
                kwargs["lr"] = lr[i]
            updated, updated_state = self._rule(i)(param, grad, state[i], **kwargs)
            new_params.append(updated)
            new_state.append(updated_state)
        return new_params, new_state

    def commit(self, state: Sequence[dict[str, Any]]) -> None:
        """Write ``state`` (detached copies) into ``optimizer.state``, in torch's storage format.

        Afterwards ``optimizer.step()`` continues as if torch had made the unrolled steps (the
        caller copies the final weights into the parameters). An empty dict clears that
        parameter's state.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0]))
            >>> opt = torch.optim.Adam([w], lr=0.1)
            >>> dopt = DifferentiableOptimizer(opt, [w])
            >>> _, state = dopt.step([w], [torch.tensor([1.0])], dopt.init_state())
            >>> dopt.commit(state)
            >>> opt.state[w]["step"]
            tensor(1.)
        """
        if len(state) != len(self.params):
            raise ConfigError(
                f"commit expects one state dict per parameter ({len(self.params)}), got "
                f"{len(state)}"
            )
        for index, (p, entries) in enumerate(zip(self.params, state, strict=True)):
            previous = self.optimizer.state.get(p, {})
            stored: dict[str, Any] = {}
            for key, value in entries.items():
                if value is None:
                    continue
                if key == "step" and self.kind == "adam":
                    stored[key] = self._step_tensor(index, value, previous.get("step"))
                elif isinstance(value, Tensor):
                    stored[key] = value.detach().clone()
                else:
                    stored[key] = value
            if stored:
                self.optimizer.state[p] = stored
            else:
                self.optimizer.state.pop(p, None)

    def _step_tensor(self, index: int, value: Any, previous: Any) -> Tensor:
        """Adam's ``step`` as torch stores it (dtype and device as before, else torch's rule)."""
        if isinstance(previous, Tensor):
            dtype, device = previous.dtype, previous.device
        else:
            group = self.optimizer.param_groups[self._groups[index]]
            on_device = group.get("capturable", False) or group.get("fused", False)
            dtype = rules.scalar_dtype(fused=group.get("fused", False))
            device = self.params[index].device if on_device else torch.device("cpu")
        value = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
        return value.to(dtype=dtype, device=device).reshape(()).clone()
