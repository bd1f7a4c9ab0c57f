"""BDA wiring: a lower :class:`~mlopt.Problem` whose updates descend ``(1-α_k)·t·f + α_k·s·F``.

Subclass :class:`BDAProblem`, write ``lower_loss(batch)`` (the lower loss ``f``) instead of
``training_step``, and pass ``bda=BDA(upper="<name of the upper problem>", ...)``. Its
``training_step`` returns the scalar ``(1-α_k)·t·f + α_k·s·F`` (:func:`bda_objective`), so the
lower's optimizer descends the BDA direction, and every hypergradient method sees the BDA
dynamics: ``reverse`` and ``Reverse(truncate=K)`` differentiate through them exactly,
``finite_difference`` applies DARTS's one-step approximation to the BDA update.

How ``F`` is evaluated inside a lower step (see :func:`bda_training_step`):

- ``F`` is the upper problem's own ``training_step`` (its ``"loss"``), run with the lower's
  CURRENT parameters (the differentiable fast weights of the unroll) and the upper's current
  parameters. Override :meth:`BDAProblem.upper_loss` to use something else.
- Its batch is, by default (``upper_batch="upper"``), drawn from the upper's
  ``train_data_loader`` through an iterator private to the lower (the upper's own data stream
  and checkpointed position are not touched): one new batch per lower update, reused when the
  same update is evaluated again (a hypergradient method re-evaluating the last step, forward
  mode's transition). ``upper_batch="lower"`` passes the lower's batch instead; a callable
  ``upper_batch(problem) -> batch`` gives any other.
- ``k`` is the update's 1-based position in the current unroll window (:func:`window_step`). A
  re-evaluation after the window closed (``finite_difference``'s vjp) uses ``k = unroll_steps``,
  the window's last update; a roll-back replay uses the replayed update's own position.

Example:
    >>> import torch, mlopt
    >>> class Low(BDAProblem):
    ...     def lower_loss(self, batch):
    ...         return ((self.module.weight - self.up.module.weight) ** 2).sum()
    >>> class Up(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return ((self.low.module.weight - 1.0) ** 2).sum()
    >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    >>> low = Low("low", a, torch.optim.SGD(a.parameters(), lr=0.1),
    ...           config=mlopt.Config(unroll_steps=2), bda=BDA(upper="up", alpha=0.5))
    >>> up = Up("up", b, torch.optim.SGD(b.parameters(), lr=0.1))
    >>> engine = mlopt.Engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}},
    ...                       mlopt.EngineConfig(train_iters=4))
    >>> engine.run()["steps"]
    {'up': 2, 'low': 4}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlopt.config import Config
from mlopt.dynamics.bda import SCHEDULES, Scalar, alpha_at, bda_objective, schedule_factor
from mlopt.errors import ConfigError, MLOptError
from mlopt.problem import Problem
from mlopt.runtime.data import DataStream
from mlopt.step import split_output, to_device

__all__ = [
    "BDA",
    "BDAProblem",
    "bda_training_step",
    "bda_coefficients",
    "upper_batch",
    "window_step",
]

Coefficient = float | torch.Tensor | Callable[[Problem], Any]


def window_step(problem: Problem) -> int:
    """The 1-based position of ``problem``'s current update in its unroll window.

    During an update it is ``1 .. unroll_steps``; once the window has closed (an upper
    re-evaluating the lower's last step) it is ``unroll_steps``.

    Example:
        >>> import torch, mlopt
        >>> seen = []
        >>> class P(mlopt.Problem):
        ...     def training_step(self, batch):
        ...         seen.append(window_step(self))
        ...         return self.module.weight.sum()
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> p = P("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
        ...       config=mlopt.Config(unroll_steps=2))
        >>> _ = mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=3)).run()
        >>> seen
        [1, 2, 1]
    """
    engine = problem.engine
    if engine is None:
        raise MLOptError(
            f"problem {problem.name!r}: window_step needs the problem to belong to an Engine"
        )
    return engine.window_position(problem.name)


@dataclass
class BDA:
    """Settings of Bi-level Descent Aggregation for a :class:`BDAProblem` (Liu et al. 2020).

    Attributes:
        upper: name of the upper problem whose loss is ``F`` (it must list this problem in
            ``u2l``).
        alpha: ``α``: a number, a 0-d tensor, a 1-d tensor with one value per window step, or a
            callable ``alpha(problem) -> one of those`` (to read an upper's current parameters).
        schedule: ``"harmonic"`` (``α_k = α/k``, BOML), ``"geometric"`` (``α·γ^(k-1)``, the BDA
            code) or ``"constant"``.
        gamma: decay of the geometric schedule.
        s: scale of ``∇F`` (number, tensor or callable, as ``alpha``).
        t: scale of ``∇f`` (number, tensor or callable, as ``alpha``).
        params: ``"<upper>.<submodule>"``: a :class:`~mlopt.dynamics.BDAParameters` module inside
            an upper's module that supplies learned ``α``, ``s``, ``t`` (then ``alpha``, ``s``
            and ``t`` above are ignored; the schedule factor still multiplies ``α``).
        upper_batch: ``"upper"`` (draw from the upper's loader), ``"lower"`` (the lower's batch)
            or a callable ``upper_batch(problem) -> batch``.

    Example:
        >>> BDA(upper="outer", alpha=0.9, schedule="geometric", gamma=0.99).schedule
        'geometric'
    """

    upper: str
    alpha: Coefficient = 0.5
    schedule: str = "harmonic"
    gamma: float = 0.9
    s: Coefficient = 1.0
    t: Coefficient = 1.0
    params: str | None = None
    upper_batch: str | Callable[[Problem], Any] = "upper"

    def __post_init__(self) -> None:
        if not isinstance(self.upper, str) or not self.upper:
            raise ConfigError(f"BDA: upper must be the upper problem's name, got {self.upper!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"BDA: schedule must be one of {list(SCHEDULES)}, not {self.schedule!r}"
            )
        schedule_factor(1, self.schedule, self.gamma)  # validates gamma
        if not callable(self.upper_batch) and self.upper_batch not in ("upper", "lower"):
            raise ConfigError(
                f"BDA: upper_batch must be 'upper', 'lower' or a callable, not {self.upper_batch!r}"
            )
        if self.params is not None and (not isinstance(self.params, str) or "." not in self.params):
            raise ConfigError(
                f"BDA: params must be '<upper>.<submodule>' naming a BDAParameters module, "
                f"got {self.params!r}"
            )
        for key in ("alpha", "s", "t"):
            value = getattr(self, key)
            if not (callable(value) or isinstance(value, (int, float, torch.Tensor))) or (
                isinstance(value, bool)
            ):
                raise ConfigError(f"BDA: {key} must be a number, a tensor or a callable")


def _value(spec: Coefficient, problem: Problem) -> Scalar:
    return spec(problem) if callable(spec) and not isinstance(spec, torch.Tensor) else spec


def bda_coefficients(problem: Problem, settings: BDA, k: int) -> tuple[Scalar, Scalar, Scalar]:
    """``(α_k, s, t)`` for update ``k`` of ``problem``, with the upper's current parameters."""
    if settings.params is not None:
        owner, _, path = settings.params.partition(".")
        view = getattr(problem, owner).module
        for part in path.split("."):
            view = getattr(view, part)
        raw_alpha, s, t = view(k)
        return raw_alpha * schedule_factor(k, settings.schedule, settings.gamma), s, t
    alpha = alpha_at(_value(settings.alpha, problem), k, settings.schedule, settings.gamma)
    return alpha, _value(settings.s, problem), _value(settings.t, problem)


def _check_wiring(problem: Problem, settings: BDA) -> None:
    engine = problem.engine
    if engine is None:
        raise MLOptError(f"problem {problem.name!r}: a BDA lower must run inside an Engine")
    if settings.upper not in engine.problems_by_name:
        raise ConfigError(
            f"problem {problem.name!r}: BDA(upper={settings.upper!r}) is not a problem of the "
            f"engine; problems are {sorted(engine.problems_by_name)}"
        )
    if settings.upper not in engine.graph.hyper_uppers(problem.name):
        raise ConfigError(
            f"problem {problem.name!r}: BDA(upper={settings.upper!r}) must be an upper of it; add "
            f"{{{settings.upper!r}: [{problem.name!r}]}} to the u2l dependencies"
        )


class UpperStream:
    """BDA's own stream over the upper's data (the upper's stream is not touched); checkpointed
    with the lower's state (its ``state_dict``)."""

    def __init__(self, loader: Iterable | None, owner: str) -> None:
        self.key: int | None = None
        self.batch: Any = None
        self.stream = DataStream(loader, owner)

    def state_dict(self) -> dict:
        """The stream's position."""
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the stream's position (the next update draws a fresh batch)."""
        self.stream.load_state_dict(state["stream"])
        self.key, self.batch = None, None


def upper_batch(problem: Problem, settings: BDA, lower_batch: Any) -> Any:
    """The batch on which ``F`` is evaluated for the current update (see the module notes)."""
    source = settings.upper_batch
    if callable(source):
        return source(problem)
    if source == "lower":
        return lower_batch
    engine = problem.engine
    st = engine.state(problem.name)
    upper = engine.problems_by_name[settings.upper]
    own = st.extra("bda", lambda: UpperStream(upper.train_data_loader, settings.upper))
    key = st.steps
    if (st.opened and own.key != key) or own.key is None:
        own.batch = to_device(own.stream.next(), engine.device)
        own.key = key
    return own.batch


def bda_training_step(problem: Problem, batch: Any, settings: BDA) -> dict:
    """The BDA objective of one lower update, as a ``training_step`` result.

    Computes ``f`` with ``problem.lower_loss(batch)``, ``(α_k, s, t)`` with
    :func:`bda_coefficients`, and ``F`` with ``problem.upper_loss(upper_batch)`` (skipped when
    ``α_k`` is the number 0). Returns ``{"loss": (1-α_k)·t·f + α_k·s·F, "lower_loss": f,
    "upper_loss": F, "alpha": α_k, ...metrics of lower_loss}``.
    """
    _check_wiring(problem, settings)
    lower, metrics = split_output(problem.name, problem.lower_loss(batch))
    if lower is None or "gradient" in metrics:
        raise ConfigError(
            f"problem {problem.name!r}: lower_loss must return a scalar loss (or a dict with "
            "'loss'); explicit gradients are not supported with BDA"
        )
    k = window_step(problem)
    alpha, s, t = bda_coefficients(problem, settings, k)
    if isinstance(alpha, (int, float)) and alpha == 0:
        upper = torch.zeros_like(lower)
    else:
        out = problem.upper_loss(upper_batch(problem, settings, batch))
        upper, _ = split_output(settings.upper, out)
        if upper is None:
            raise ConfigError(f"BDA: the upper problem {settings.upper!r} returned no loss")
    objective = bda_objective(lower, upper, alpha, s, t)
    alpha_value = alpha.detach() if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    return {
        "loss": objective,
        **metrics,
        "lower_loss": lower.detach(),
        "upper_loss": upper.detach(),
        "alpha": alpha_value,
    }


class BDAProblem(Problem):
    """A lower problem updated by Bi-level Descent Aggregation (Liu et al. 2020).

    Override :meth:`lower_loss` (not ``training_step``). All :class:`~mlopt.Problem` arguments,
    plus ``bda``: a :class:`BDA` naming the upper problem and the coefficients.

    Example:
        >>> import torch
        >>> class Low(BDAProblem):
        ...     def lower_loss(self, batch):
        ...         return (self.module.weight ** 2).sum()
        >>> net = torch.nn.Linear(2, 1)
        >>> Low("low", net, torch.optim.SGD(net.parameters(), lr=0.1), bda=BDA("up")).bda.upper
        'up'
    """

    def __init__(
        self,
        name: str,
        module: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        train_data_loader: Iterable | None = None,
        config: Config | None = None,
        scheduler: Any = None,
        *,
        bda: BDA,
    ) -> None:
        super().__init__(name, module, optimizer, train_data_loader, config, scheduler)
        if not isinstance(bda, BDA):
            raise ConfigError(
                f"problem {name!r}: bda must be a mlopt.dynamics.BDA(upper=...), got {bda!r}"
            )
        self.__dict__["bda"] = bda

    def lower_loss(self, batch: Any) -> torch.Tensor | dict:
        """The lower loss ``f`` on ``batch`` (override; same return forms as training_step)."""
        raise MLOptError(
            f"problem {self.name!r}: a BDAProblem overrides lower_loss(batch), not training_step"
        )

    def upper_loss(self, batch: Any) -> torch.Tensor | dict:
        """``F``: by default the upper problem's ``training_step(batch)`` (override to change)."""
        return getattr(self, self.bda.upper).training_step(batch)

    def training_step(self, batch: Any) -> dict:
        """The BDA objective (see :func:`bda_training_step`)."""
        return bda_training_step(self, batch, self.bda)
