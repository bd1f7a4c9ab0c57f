"""Shared glue of the application examples: mean and std over seeds, and the results file.

Example:
    >>> summarize([{"loss": 1.0}, {"loss": 3.0}], ["loss"])
    {'loss': 2.0, 'loss_std': 1.4142135623730951}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["summarize", "save_json"]


def summarize(rows: Sequence[dict], keys: Iterable[str]) -> dict[str, float]:
    """Mean and sample std (0 for one seed) of ``row[key]`` over ``rows``, for each key."""
    summary = {}
    for key in keys:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
    return summary


def save_json(result: dict, path: str | None) -> None:
    """Write ``result`` as JSON to ``path`` (creating its folder); nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
