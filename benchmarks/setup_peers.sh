#!/usr/bin/env bash
# Create (or update) a separate virtual environment holding mlopt's peer libraries for the
# side-by-side benchmarks: higher 0.2.1, torchopt 0.7.3, betty-ml 0.2.1 and learn2learn 0.2.0,
# next to torch 2.13.0 (CPU build) and mlopt itself (editable, from this repository).
#
# Usage:
#   benchmarks/setup_peers.sh [VENV_PATH]
# The environment goes to VENV_PATH, else to $MLOPT_PEERS_VENV, else to /work/peers-venv.
# The Python that creates it is $PYTHON (default: python3; 3.10 or newer).
# Running the script again on an existing environment only fills in what is missing.
#
# Workarounds (see benchmarks/README.md for the reasons):
#   * betty-ml declares Python < 3.11 although it is pure Python: installed with
#     --no-deps --ignore-requires-python (its only dependencies, torch and numpy, come separately).
#   * learn2learn ships only a source distribution whose pre-generated C files do not compile on
#     Python >= 3.11: they are regenerated with cython<3 before building. It is installed with
#     --no-deps (its declared dependencies would pull torchvision, gsutil and qpth) plus the
#     dependencies it really imports.
#   * torchvision 0.28 does not import beside the torch 2.13.0 CPU build, and the torchvision
#     that does (0.29.1) needs the 5.5 GB CUDA torch 2.14.1. We keep torch 2.13.0 (the version
#     mlopt is tested on) and no torchvision; learn2learn.vision is patched so that its
#     torchvision-based parts (datasets, transforms, benchmarks) are skipped when torchvision is
#     absent. learn2learn.vision.models and everything outside learn2learn.vision still work.
set -euo pipefail

VENV="${1:-${MLOPT_PEERS_VENV:-/work/peers-venv}}"
PYTHON="${PYTHON:-python3}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

TORCH_SPEC="torch==2.13.0"
HIGHER_SPEC="higher==0.2.1"
TORCHOPT_SPEC="torchopt==0.7.3"
BETTY_SPEC="betty-ml==0.2.1"
L2L_VERSION="0.2.0"
# What learn2learn imports at run time (instead of its declared requirements).
L2L_RUNTIME_DEPS=(gym tqdm requests scipy pillow)
# mlopt's own runtime dependencies except torch (mlopt itself is installed with --no-deps).
MLOPT_RUNTIME_DEPS=(numpy tqdm pillow tensorboard)

log() { printf '[setup_peers] %s\n' "$*"; }
die() { printf '[setup_peers] error: %s\n' "$*" >&2; exit 1; }

[[ -f "$REPO_ROOT/setup.cfg" && -d "$REPO_ROOT/mlopt" ]] \
    || die "cannot find the mlopt repository root at $REPO_ROOT"
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python3"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    die "$PYTHON is $("$PYTHON" -V 2>&1); Python 3.10 or newer is needed"
fi

# 1. The virtual environment.
if [[ -x "$VENV/bin/python" ]]; then
    log "reusing the environment at $VENV"
else
    [[ -e "$VENV" ]] && die "$VENV exists but is not a virtual environment; remove it or pick another path"
    log "creating the environment at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip, minus the harmless warnings this machine's pip configuration prints for every package
# missing from its local file:// indexes. The exit status stays pip's (pipefail).
pip_q() {
    { "${PIP[@]}" "$@" 2>&1 1>&3 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2; } 3>&1
}

# 2. torch, pinned to the CPU build mlopt is tested on (an unpinned torch resolves to a 5.5 GB
#    CUDA build here). Every later install names the same pin so that nothing upgrades it.
log "installing $TORCH_SPEC"
pip_q install --quiet "$TORCH_SPEC"

# 3. Pure-Python and wheel peers.
log "installing $HIGHER_SPEC $TORCHOPT_SPEC"
pip_q install --quiet "$TORCH_SPEC" "$HIGHER_SPEC" "$TORCHOPT_SPEC"
log "installing $BETTY_SPEC (--no-deps --ignore-requires-python)"
pip_q install --quiet --no-deps --ignore-requires-python "$BETTY_SPEC"

# 4. learn2learn from source, skipped when this version is already installed.
installed_l2l="$("$VENV/bin/python" - <<'EOF'
from importlib import metadata
try:
    print(metadata.version("learn2learn"))
except metadata.PackageNotFoundError:
    print("")
EOF
)"
log "installing learn2learn's runtime dependencies: ${L2L_RUNTIME_DEPS[*]}"
pip_q install --quiet "$TORCH_SPEC" "${L2L_RUNTIME_DEPS[@]}"
if [[ "$installed_l2l" == "$L2L_VERSION" ]]; then
    log "learn2learn $L2L_VERSION already installed"
else
    log "building learn2learn $L2L_VERSION from source (C files regenerated with cython<3)"
    pip_q install --quiet "cython<3" setuptools wheel
    build_dir="$(mktemp -d)"
    trap 'rm -rf "$build_dir"' EXIT
    pip_q download --quiet --no-deps --no-binary :all: \
        -d "$build_dir" "learn2learn==$L2L_VERSION"
    tar -xzf "$build_dir/learn2learn-$L2L_VERSION.tar.gz" -C "$build_dir"
    src="$build_dir/learn2learn-$L2L_VERSION"
    # The shipped .c files were made by Cython 0.29.15 and include longintrepr.h, which
    # Python 3.11 moved; regenerate them with the same directives as its setup.py.
    for pyx in "$src"/learn2learn/data/*.pyx; do
        "$VENV/bin/cython" -3 -X embedsignature=True "$pyx" -o "${pyx%.pyx}.c"
    done
    # Make learn2learn.vision import without torchvision (see the header of this script).
    "$VENV/bin/python" - "$src/learn2learn/vision/__init__.py" <<'EOF'
import sys

path = sys.argv[1]
expected = "from . import datasets\nfrom . import models\nfrom . import transforms\nfrom . import benchmarks\n"
text = open(path).read()
if expected not in text:
    sys.exit(f"unexpected content in {path}: the torchvision patch does not apply")
patched = (
    "from . import models\n"
    "\n"
    "# Patched by mlopt's benchmarks/setup_peers.sh: these parts need torchvision, which is\n"
    "# not installed in the peers environment; skip them rather than fail at import.\n"
    "try:\n"
    "    from . import datasets\n"
    "    from . import transforms\n"
    "    from . import benchmarks\n"
    "except ModuleNotFoundError as _err:\n"
    "    if (_err.name or '').split('.')[0] != 'torchvision':\n"
    "        raise\n"
)
open(path, "w").write(text.replace(expected, patched))
EOF
    pip_q install --quiet --no-deps --no-build-isolation "$src"
fi

# 5. mlopt itself, editable, without letting pip touch torch.
log "installing mlopt (editable, --no-deps) from $REPO_ROOT and: ${MLOPT_RUNTIME_DEPS[*]}"
pip_q install --quiet "$TORCH_SPEC" "${MLOPT_RUNTIME_DEPS[@]}"
pip_q install --quiet --no-deps -e "$REPO_ROOT"

# 6. Check that everything imports and report the versions. A failing peer is an error; a
#    failing `import mlopt` is only a warning (the editable working tree may be mid-edit).
log "installed versions:"
"$VENV/bin/python" - <<'EOF'
import contextlib
import io
import sys
from importlib import metadata

import torch

PINS = {"torch": "2.13.0", "higher": "0.2.1", "torchopt": "0.7.3", "betty-ml": "0.2.1",
        "learn2learn": "0.2.0"}
IMPORTS = {
    "higher": ["higher"],
    "torchopt": ["torchopt"],
    "betty-ml": ["betty", "betty.engine", "betty.problems"],
    # The .data modules are learn2learn's compiled Cython extensions.
    "learn2learn": ["learn2learn", "learn2learn.algorithms", "learn2learn.vision.models",
                    "learn2learn.data.task_dataset", "learn2learn.data.meta_dataset"],
    "mlopt": ["mlopt"],
}


def try_import(names):
    # gym prints a deprecation notice on import; keep it out of the report.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for name in names:
            try:
                __import__(name)
            except Exception as err:
                return f"import {name} failed: {type(err).__name__}: {err}"
    return None


errors = []
print(f"  python       {sys.version.split()[0]}")
print(f"  torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
print(f"  numpy        {metadata.version('numpy')}")
for dist, names in IMPORTS.items():
    version = metadata.version(dist)
    note = ""
    problem = try_import(names)
    if problem and dist == "mlopt":
        note = f"  WARNING: {problem}"
    elif problem:
        errors.append(f"{dist}: {problem}")
        note = f"  ERROR: {problem}"
    elif dist == "torchopt":
        try:
            import torchopt._C  # noqa: F401

            note = "  (compiled extension loads)"
        except Exception as err:
            note = f"  (compiled extension fails to load, pure-Python fallback: {err})"
    print(f"  {dist:<12} {version}{note}")
for dist, want in PINS.items():
    have = metadata.version(dist).split("+")[0]
    if have != want:
        errors.append(f"{dist} is {have}, expected {want}")
if errors:
    sys.exit("[setup_peers] error: " + "; ".join(errors))
EOF
log "done in ${SECONDS} s; $(du -sh "$VENV" | cut -f1) in $VENV"
log "activate with: source $VENV/bin/activate"
