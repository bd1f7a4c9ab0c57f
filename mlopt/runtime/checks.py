"""Checks of a program's problems before anything is compiled or changed.

Each check raises a :class:`~mlopt.errors.ConfigError` that names the problem, the option and
the fix. :func:`check_problems` runs them all; the Engine calls it before it binds any problem.

Example:
    >>> import torch, mlopt
    >>> class P(mlopt.Problem):
    ...     def training_step(self, batch):
    ...         return (self.module.weight ** 2).sum()
    >>> net = torch.nn.Linear(2, 1)
    >>> a = P("a", net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> b = P("b", net, torch.optim.SGD(net.parameters(), lr=0.1))
    >>> try:
    ...     mlopt.Engine([a, b])
    ... except mlopt.ConfigError as err:
    ...     print(str(err)[:58])
    problems 'a' and 'b' share 2 trainable parameter tensor(s)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mlopt.errors import ConfigError

if TYPE_CHECKING:
    from mlopt.problem import Problem
    from mlopt.runtime.state import ProblemState

__all__ = ["check_problems", "check_overridden", "check_optimizer", "check_config", "check_shared"]


def check_overridden(p: Problem) -> None:
    """``training_step`` must be defined by the subclass."""
    from mlopt.problem import Problem as Base

    if type(p).training_step is Base.training_step:
        raise ConfigError(
            f"problem {p.name!r} ({type(p).__name__}) does not override training_step(batch); "
            "subclass mlopt.Problem and define it"
        )


def _needs_closure(optimizer: object) -> bool:
    """Whether ``optimizer.step`` has a required argument (LBFGS's ``closure``)."""
    try:
        sig = inspect.signature(optimizer.step)
    except (TypeError, ValueError):
        return False
    return any(
        q.default is inspect.Parameter.empty
        and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)
        and q.name != "self"  # a scheduler's wrapper of the unbound step shows it
        for q in sig.parameters.values()
    )


def check_optimizer(p: Problem, st: ProblemState) -> None:
    """Trainable parameters need an optimizer over exactly the module's parameters, one whose
    ``step()`` needs no closure."""
    if st.module is not None:
        trainable = [n for n, q in st.module.named_parameters() if q.requires_grad]
        if trainable and st.optimizer is None:
            raise ConfigError(
                f"problem {p.name!r} has trainable parameters {trainable[:3]}... but no optimizer; "
                "pass optimizer=torch.optim.SGD(module.parameters(), lr=...) or freeze them"
            )
    if st.optimizer is None:
        return
    if _needs_closure(st.optimizer):
        raise ConfigError(
            f"problem {p.name!r}: optimizer {type(st.optimizer).__name__} needs a closure in "
            "step(closure) (it re-evaluates the loss itself), which no mlopt method provides; "
            "use SGD, Adam or AdamW (or another optimizer whose step() takes no argument)"
        )
    in_module = {id(q) for q in (st.module.parameters() if st.module is not None else [])}
    stray = [q for g in st.optimizer.param_groups for q in g["params"] if id(q) not in in_module]
    if stray:
        raise ConfigError(
            f"problem {p.name!r}: its optimizer holds {len(stray)} tensor(s) that are not "
            "parameters of its module; build the optimizer from module.parameters()"
        )


def check_config(p: Problem) -> None:
    """Validate the problem's Config again (fields may have been set since it was built)."""
    try:
        p.config.validate()
    except ConfigError as err:
        raise ConfigError(f"problem {p.name!r}: {err}") from None


def check_shared(problems: Sequence[Problem], states: Mapping[str, ProblemState]) -> None:
    """No trainable tensor may belong to two problems (each would update it, and a hypergradient
    through one would see the other's steps)."""
    owner: dict[int, str] = {}
    for p in problems:
        shared: dict[str, int] = {}
        for q in states[p.name].leaves():
            other = owner.setdefault(id(q), p.name)
            if other != p.name:
                shared[other] = shared.get(other, 0) + 1
        if shared:
            other, count = next(iter(shared.items()))
            raise ConfigError(
                f"problems {other!r} and {p.name!r} share {count} trainable parameter tensor(s) "
                "(one module or parameter object given to both); give each problem its own copy, "
                f"e.g. module=copy.deepcopy(net) for {p.name!r}, or use "
                "Config(initialize_from=...) for a meta-initialization"
            )


def check_problems(problems: Sequence[Problem], states: Mapping[str, ProblemState]) -> None:
    """Every check of this module, problem by problem, then across problems."""
    for p in problems:
        check_overridden(p)
        check_config(p)
        check_optimizer(p, states[p.name])
    check_shared(problems, states)
