"""What a checkpoint must fit: the program's description and the checks against it.

A checkpoint holds, besides the state objects, a description of the program it was taken from
(:func:`describe_program`: the dependency edges and, for each problem, its module entry shapes,
optimizer class and param groups, scheduler class and fp16 scaler). Before anything is restored,
:func:`missing_entries` lists the entries a saved program state lacks and :func:`misfits` how
its description differs from the live program's; both return plain messages, [] when all is
well, and touch nothing.

Example:
    >>> missing_entries({"format": 3, "run": {}, "problems": {}, "rng": {}})[:2]
    ['run/iteration', 'run/best_metric']
    >>> saved = {"graph": {"u2l": [], "l2u": []}, "problems": {"net": {}}}
    >>> misfits(saved, {"graph": {"u2l": [], "l2u": []}, "problems": {}})
    ["problems ['net'] are in the checkpoint but not in the program (removed)"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlopt.runtime.state import REQUIRED_KEYS

if TYPE_CHECKING:
    from mlopt.graph import Graph
    from mlopt.runtime.plan import Plan
    from mlopt.runtime.state import ProblemState

__all__ = ["describe_program", "missing_entries", "misfits"]

_RUN = ("iteration", "best_metric", "bad_validations", "stopped", "history")
_RNG = ("python", "numpy", "torch", "cuda")
_DESC = ("module", "optimizer", "param_groups", "scheduler", "scaler")


def _edges(graph: Graph) -> dict[str, list[list[str]]]:
    return {
        kind: sorted([a, b] for a, bs in getattr(graph, kind).items() for b in bs)
        for kind in ("u2l", "l2u")
    }


def _describe(st: ProblemState) -> dict[str, Any]:
    """What a checkpoint must match to fit one problem, as plain values: module entry shapes,
    optimizer class, param groups (parameter shapes), scheduler class, scaler or not."""
    opt, mod, sched = st.optimizer, st.module, st.scheduler
    return {
        "module": None if mod is None else {k: list(v.shape) for k, v in mod.state_dict().items()},
        "optimizer": None if opt is None else getattr(opt, "kind", type(opt).__name__),
        "param_groups": []
        if opt is None
        else [[list(q.shape) for q in g["params"]] for g in opt.param_groups],
        "scheduler": type(sched).__name__ if hasattr(sched, "state_dict") else None,
        "scaler": st.scaler is not None,
    }


def describe_program(plan: Plan, states: Mapping[str, ProblemState]) -> dict[str, Any]:
    """What a checkpoint must match to fit the program: the dependency edges and, for each
    problem, its module entry shapes, optimizer class and param groups (parameter shapes),
    scheduler class and whether it has an fp16 scaler (plain values)."""
    return {"graph": _edges(plan.graph), "problems": {n: _describe(st) for n, st in states.items()}}


def _lacking(value: Any, need: Any, path: str) -> list[str]:
    """The paths that ``value`` lacks of ``need`` (a tuple of keys or a dict of sub-needs)."""
    if need is None:
        return []
    if not isinstance(value, Mapping):
        return [f"{path} (a {type(value).__name__}, not a dict)"]
    if isinstance(need, tuple):
        return [f"{path}{k}" for k in need if k not in value]
    return [
        m
        for k, sub in need.items()
        for m in (_lacking(value[k], sub, f"{path}{k}/") if k in value else [f"{path}{k}"])
    ]


def _promised(desc: Any) -> tuple[str, ...]:
    """The entries of a saved problem state that its description promises."""
    if not isinstance(desc, Mapping):
        return REQUIRED_KEYS
    has = [k for k in ("module", "optimizer", "scheduler") if desc.get(k) is not None]
    return (*REQUIRED_KEYS, *has, *(("scaler",) if desc.get("scaler") else ()))


def missing_entries(state: Mapping[str, Any]) -> list[str]:
    """The entries (``a/b/c`` paths) that a program state lacks; [] for a complete one."""
    program, problems = state.get("program"), state.get("problems")
    desc = program.get("problems") if isinstance(program, Mapping) else None
    desc = desc if isinstance(desc, Mapping) else {}
    saved = problems if isinstance(problems, Mapping) else {}
    names = [*desc, *(n for n in saved if n not in desc)]
    need = {
        **dict.fromkeys(("format", "run", "problems", "rng", "program")),
        "run": _RUN,
        "rng": _RNG,
        "program": {"graph": ("u2l", "l2u"), "problems": dict.fromkeys(names, _DESC)},
        "problems": {n: _promised(desc.get(n)) for n in names},
    }
    return _lacking(state, need, "")


def _but(what: str, saved: Any, live: Any) -> str:
    return f"{what} {saved} in the checkpoint but {live} in the program"


def _problem_misfits(saved: Mapping, live: Mapping) -> list[str]:
    """How one problem's saved description differs from its live one."""
    out, sm, lm = [], saved["module"], live["module"]
    if (sm is None) != (lm is None):
        out.append(f"a module only in the {'program' if sm is None else 'checkpoint'}")
    elif sm is not None:
        for a, b, side in ((lm, sm, "program"), (sm, lm, "checkpoint")):
            if only := sorted(set(a) - set(b)):
                out.append(f"module entries {only} only in the {side}")
        out += [
            _but(f"parameter/buffer {k!r} has shape", tuple(sm[k]), tuple(lm[k]))
            for k in lm
            if k in sm and tuple(sm[k]) != tuple(lm[k])
        ]
    sizes, shapes = (
        [[f(g) for g in d["param_groups"]] for d in (saved, live)]
        for f in (len, lambda g: [tuple(s) for s in g])
    )
    if saved["optimizer"] != live["optimizer"]:
        out.append(_but("optimizer", saved["optimizer"], live["optimizer"]))
    elif sizes[0] != sizes[1]:
        out.append(_but("optimizer param groups of sizes", *sizes))
    elif shapes[0] != shapes[1] and not out:  # (a module reshape is reported already)
        out.append(_but("optimizer param groups of parameter shapes", *shapes))
    for key, what in (("scheduler", "scheduler"), ("scaler", "fp16 GradScaler")):
        if saved[key] != live[key]:
            out.append(_but(what, saved[key], live[key]))
    return out


def misfits(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """How a saved program description (:func:`describe_program`) differs from the live one:
    problems added or removed, changed edges, then each problem's mismatches; [] if it fits."""
    out, sp, lp = [], saved["problems"], live["problems"]
    if only := sorted(set(lp) - set(sp)):
        out.append(f"problems {only} are in the program but not in the checkpoint (added)")
    if only := sorted(set(sp) - set(lp)):
        out.append(f"problems {only} are in the checkpoint but not in the program (removed)")
    for kind in ("u2l", "l2u"):
        a, b = ({f"{u} -> {v}" for u, v in d["graph"][kind]} for d in (saved, live))
        if a != b:
            out.append(
                f"the dependency graph changed: {kind} edges {sorted(a - b)} only in the "
                f"checkpoint, {sorted(b - a)} only in the program"
            )
    for name in (n for n in lp if n in sp):
        out += [f"problem {name!r}: {m}" for m in _problem_misfits(sp[name], lp[name])]
    return out
