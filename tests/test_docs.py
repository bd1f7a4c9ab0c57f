"""Every code block of README.md and docs/**/*.md runs, or says why it is not Python.

Conventions for fenced code blocks in the documentation:

- ```` ```python ````: a program. The ``python`` blocks of one file run in order in one namespace
  (a later block uses what an earlier one defined), in a subprocess of their own with
  ``OMP_NUM_THREADS=1``, from the repository root, under a time limit. Keep them small: a few
  iterations, small models (a comment can give the values of a real run).
- ```` ```bash ```` (commands) and ```` ```text ```` (output, diagrams, formulas): not run.
- ``<!-- no-run: why -->`` on the line before a ```` ```python ```` fence: a fragment that is not
  meant to run on its own; the reason is required. Use it sparingly.
- A block that reads the Omniglot data (it names ``MLOPT_OMNIGLOT_DIR`` or ``shared/data``) is
  skipped, with the blocks after it in its file, when ``$MLOPT_OMNIGLOT_DIR`` (default
  ``../shared/data/omniglot``) does not exist.

Every fence needs one of these languages, so that nothing is silently left out.
Run one file by hand with ``python tests/test_docs.py docs/guide.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = {"python", "bash", "text"}
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(?P<why>\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
DATA_MARKERS = ("MLOPT_OMNIGLOT_DIR", "shared/data")
FILE_TIMEOUT_S = 90  # per file; the whole module takes well under a minute
RESULT = "DOCS-TEST-RESULT "
# Files whose python blocks are known not to run yet, and what they lack. Strict: once the file is
# fixed its test passes unexpectedly and fails, as a reminder to remove the entry here.
KNOWN_BROKEN: dict[str, str] = {}  # file -> why its blocks are expected to fail (strict)


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    no_run: str | None  # the reason, for a fragment marked <!-- no-run: ... -->

    @property
    def name(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence, indent = i, m["fence"], len(m["indent"])
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        i += 1
        prev = next((t.strip() for t in reversed(lines[:start]) if t.strip()), "")
        marker = NO_RUN.match(prev)
        found.append(
            Block(
                path, start + 1, m["info"].strip(), "\n".join(body) + "\n", marker and marker["why"]
            )
        )
    return found


def indented_code(path: Path) -> list[int]:
    """Lines that start an indented (unfenced) code block: 4 spaces after a blank line, outside
    fences and list items."""
    starts, fence, paragraph = [], None, ""
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if m and (fence is None or line.strip().startswith(fence)):
            fence = m["fence"] if fence is None else None
            continue
        if fence is not None:
            continue
        previous = lines[n - 2] if n > 1 else ""
        in_list = paragraph.startswith((" ", "-", "*", "+")) or paragraph[:1].isdigit()
        if line.startswith("    ") and line.strip() and not previous.strip() and not in_list:
            starts.append(n)
        if line.strip() and not line.startswith("    "):
            paragraph = line
    return starts


def omniglot_dir() -> Path:
    return Path(os.environ.get("MLOPT_OMNIGLOT_DIR", ROOT.parent / "shared" / "data" / "omniglot"))


# -- the runner: executes one file's python blocks in this process (run as a subprocess) ----------


def run_file(path: Path) -> None:
    """Execute ``path``'s python blocks in one namespace; print one result line per block."""
    namespace: dict = {"__name__": "__main__"}
    skip_rest = None
    for block in blocks(path):
        if block.language != "python" or block.no_run:
            continue
        result = {"line": block.line}
        needs_data = any(marker in block.code for marker in DATA_MARKERS)
        if skip_rest is None and needs_data and not omniglot_dir().is_dir():
            skip_rest = (
                f"Omniglot data not found at {omniglot_dir()} (set MLOPT_OMNIGLOT_DIR): "
                f"the block at line {block.line} and the ones after it need it"
            )
        if skip_rest is not None:
            result.update(status="skipped", message=skip_rest)
        else:
            out = io.StringIO()
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(block.code, block.name, "exec"), namespace)  # noqa: S102
                result.update(status="passed")
            except BaseException:  # noqa: BLE001 - reported to the test, which fails
                result.update(status="failed", message=traceback.format_exc(limit=-8))
                skip_rest = f"the block at line {block.line} failed"
            result.update(seconds=round(time.perf_counter() - t0, 2), stdout=out.getvalue()[-2000:])
        print(RESULT + json.dumps(result), flush=True)


# -- the tests ----------------------------------------------------------------------------------

_RESULTS: dict[Path, dict[int, dict]] = {}


def _results(path: Path) -> dict[int, dict]:
    """Run ``path``'s blocks once (a subprocess per file) and return each block's result."""
    if path not in _RESULTS:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(Path(__file__).resolve()), str(path)]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=FILE_TIMEOUT_S
            )
            stdout, stderr, error = proc.stdout, proc.stderr, f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
            stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
            error = f"timed out after {FILE_TIMEOUT_S} s"
        found = {}
        for line in stdout.splitlines():
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT) :])
                found[result["line"]] = result
        for block in blocks(path):  # blocks the runner never reported: it died or hung in them
            if block.language == "python" and not block.no_run and block.line not in found:
                found[block.line] = {"status": "failed", "message": f"{error}\n{stderr[-3000:]}"}
                error = "not reached (an earlier block did not finish)"
        _RESULTS[path] = found
    return _RESULTS[path]


def _python_blocks() -> list[Block]:
    return [b for f in doc_files() for b in blocks(f) if b.language == "python" and not b.no_run]


def test_every_fence_says_what_it_is():
    problems = []
    for path in doc_files():
        for block in blocks(path):
            if block.language not in LANGUAGES:
                problems.append(f"{block.name}: fence language {block.language!r}")
            if block.no_run and block.language != "python":
                problems.append(f"{block.name}: <!-- no-run --> before a {block.language} block")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "no-run" in line and line.strip().startswith("<!--") and not NO_RUN.match(line):
                problems.append(f"{path.relative_to(ROOT)}:{n}: write <!-- no-run: the reason -->")
        for n in indented_code(path):
            problems.append(f"{path.relative_to(ROOT)}:{n}: an indented code block (fence it)")
    assert not problems, "fences must be python, bash or text:\n" + "\n".join(problems)


def pytest_generate_tests(metafunc):
    if "doc_block" in metafunc.fixturenames:
        found = _python_blocks()
        metafunc.parametrize("doc_block", found, ids=[b.name for b in found])


def test_python_block_runs(doc_block: Block, request):
    broken = KNOWN_BROKEN.get(str(doc_block.path.relative_to(ROOT)))
    if broken:
        request.applymarker(pytest.mark.xfail(reason=broken, strict=True))
    result = _results(doc_block.path)[doc_block.line]
    if result["status"] == "skipped":
        pytest.skip(result["message"])
    if result["status"] == "failed":
        pytest.fail(f"{doc_block.name}:\n{result['message']}", pytrace=False)


if __name__ == "__main__":
    run_file(Path(sys.argv[1]).resolve())
