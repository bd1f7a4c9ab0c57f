"""Matching a program's pieces: meta-initialization positions and explicit gradients.

Example:
    >>> import torch
    >>> explicit_gradient(None, (torch.zeros(2),), [torch.ones(2)])
    (tensor([1., 1.]),)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mlopt.errors import ConfigError

if TYPE_CHECKING:
    from mlopt.problem import Problem

__all__ = ["init_positions", "explicit_gradient"]

Vec = tuple[torch.Tensor, ...]


def init_positions(p: Problem, problems: dict[str, Problem], spec: str) -> tuple[str, list[int]]:
    """Parse ``initialize_from`` (``"upper"`` or ``"upper.submodule"``) into the upper's name and
    the position, among the upper's parameters, of each of ``p``'s parameters.

    Raises:
        ConfigError: unknown upper, or parameters of ``p`` with no same-shaped counterpart.
    """
    from mlopt.problem import problem_state

    upper, _, path = spec.partition(".")
    if upper not in problems:
        raise ConfigError(
            f"problem {p.name!r}: initialize_from={spec!r} is not a problem of the engine"
        )
    src, own = problem_state(problems[upper]), problem_state(p)
    prefix = f"{path}." if path else ""
    pos = {n: i for i, n in enumerate(src.names)}
    shapes = {n: tuple(t.shape) for n, t in zip(src.names, src.leaves())}
    out, bad = [], []
    for n, t in zip(own.names, own.leaves()):
        key = prefix + n
        if key not in pos or shapes[key] != tuple(t.shape):
            bad.append(f"{n} {tuple(t.shape)}")
        else:
            out.append(pos[key])
    if bad or not own.names:
        where = f" under {path!r}" if path else ""
        raise ConfigError(
            f"problem {p.name!r}: initialize_from={spec!r} needs the same trainable parameter "
            f"names and shapes in {upper!r}{where}; no match for {bad[:4]}; {upper!r} has "
            f"{sorted(shapes.items())[:6]}"
        )
    return upper, out


def explicit_gradient(p: Problem, params: Vec, given: Any) -> Vec:
    """Validate a gradient returned by ``training_step`` as ``{"loss": ..., "gradient": ...}``."""
    given = tuple(given)
    if len(given) != len(params) or any(
        not isinstance(g, torch.Tensor) or g.shape != t.shape for g, t in zip(given, params)
    ):
        raise ConfigError(
            f"problem {p.name!r}: training_step's 'gradient' must hold one tensor per parameter "
            f"of self.parameters() with the same shapes {[tuple(t.shape) for t in params]}"
        )
    return given
