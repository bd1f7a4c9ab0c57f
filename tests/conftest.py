"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_OMNIGLOT = Path(__file__).resolve().parent / ".." / ".." / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """Folder with the Omniglot minimal-split zips and all_runs.zip (never copied into the repo).

    Taken from ``$MLOPT_OMNIGLOT_DIR``, else ``<repo>/../shared/data/omniglot``.
    """
    root = Path(os.environ.get("MLOPT_OMNIGLOT_DIR", _DEFAULT_OMNIGLOT)).resolve()
    needed = ["images_background_small1.zip", "images_background_small2.zip", "all_runs.zip"]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        pytest.skip(
            f"Omniglot data not found: {missing} missing in {root}; set MLOPT_OMNIGLOT_DIR to the "
            "folder holding the minimal-split zips and all_runs.zip"
        )
    return root
