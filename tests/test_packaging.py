"""Packaging: licence, metadata, extras, the README's set-up commands and the sdist's contents."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _extra(name: str) -> list[str]:
    raw = _setup_cfg()["options.extras_require"][name]
    return [line.strip() for line in raw.strip().splitlines() if line.strip()]


def test_license_is_mit_like_the_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert re.search(r"^Copyright \(c\) \d{4} the mlopt authors$", text, re.M)
    assert "WITHOUT WARRANTY OF ANY KIND" in text
    assert _setup_cfg()["metadata"]["license"] == "MIT"


def test_python_requires_has_a_lower_bound_only():
    spec = _setup_cfg()["options"]["python_requires"]
    assert spec.replace(" ", "") == ">=3.10"


def test_examples_extra_covers_the_examples_imports():
    names = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in _extra("examples")}
    uses_sklearn = [
        p.name
        for p in sorted((ROOT / "examples").glob("*.py"))
        if re.search(r"^\s*(from|import) sklearn|load_digits_cleaning", p.read_text(), re.M)
    ]
    assert uses_sklearn, "no example imports scikit-learn any more: update the examples extra"
    assert "scikit-learn" in names, f"{uses_sklearn} import sklearn"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    return [line for line in block[1].splitlines() if line.strip()]


def test_readme_top_commands_demo_and_ci():
    demo, tests = _readme_commands()  # exactly two commands at the top
    assert '-e ".[examples]"' in demo and demo.endswith(".venv/bin/python examples/quickstart.py")
    assert tests.endswith(".venv/bin/python -m pytest -q")
    # .ci/run runs the README's test command (pip quiet there)
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.replace("pip install ", "pip install -q ") in ci
    assert shlex.split(tests)[:3] == ["python3", "-m", "venv"]


def test_sdist_holds_license_docs_examples_benchmarks_tests(tmp_path):
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not installed in this environment")
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)]
    cmd += ["sdist", "--dist-dir", str(tmp_path)]
    try:  # egg_info into tmp_path: the work tree is left as it was
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("setup.py sdist took over 60 s")
    assert done.returncode == 0, done.stderr[-3000:]
    (tarball,) = tmp_path.glob("mlopt-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        top = tar.getnames()[0].split("/", 1)[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
        license_text = tar.extractfile(f"{top}/LICENSE").read().decode()
    expected = {
        "LICENSE",
        "README.md",
        "MANIFEST.in",
        "pyproject.toml",
        "setup.cfg",
        "mlopt/__init__.py",
        "mlopt/data/omniglot.py",
        "examples/quickstart.py",
        "examples/omniglot_common.py",
        "docs/meta_learning.md",
        "docs/guide.md",
        "benchmarks/hypergrad_accuracy.py",
        "benchmarks/README.md",
        "tests/conftest.py",
        "tests/test_packaging.py",
        "tests/golden/runtime_ab.pt",
    }
    assert expected <= names, sorted(expected - names)
    try:  # every tracked file of these folders (outside a git checkout: nothing to compare)
        tracked = subprocess.run(
            ["git", "ls-files", "-z", "examples", "docs", "benchmarks", "tests"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split("\0")
    except OSError:
        tracked = []
    missing = [f for f in tracked if f and (ROOT / f).is_file() and f not in names]
    assert not missing, f"sdist lacks {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith((".venv/", "site/", ".git/"))]
    assert license_text == (ROOT / "LICENSE").read_text()
    assert re.search(r"^Requires-Python: >=3\.10$", pkg_info, re.M)
    assert re.search(r"^Provides-Extra: examples$", pkg_info, re.M)
