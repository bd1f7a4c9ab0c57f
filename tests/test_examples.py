"""The examples run end to end in their fast ``--smoke`` mode."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_smoke_improves_validation_loss(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _load("quickstart").main(["--smoke"])
    finally:
        torch.set_num_threads(threads)
    assert set(out) == {"val_before", "val_after", "test_before", "test_after"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["val_after"] < out["val_before"]
    printed = capsys.readouterr().out
    assert "mlopt program" in printed  # the engine's schedule is shown
