#!/usr/bin/env bash
# The GPU check: one command for a machine with an NVIDIA GPU (under 8 minutes).
#
#   bash benchmarks/gpu_check.sh [OUT.json] [extra gpu_check.py options]
#
# Runs `pytest -m cuda tests/test_cuda.py`, then the GPU benchmarks of benchmarks/gpu_check.py
# (MAML meta-batch 16: Engine, vmap, loop, higher/TorchOpt; RHG T=200 with and without
# Reverse(checkpoint=k); bf16 error per hypergradient method; host syncs per method), and
# writes everything to ONE JSON file: the first argument, else $OUT/gpu_check.json when $OUT
# is set, else ./gpu_check.json. The JSON is rewritten after each section, so a run stopped by
# the time limit keeps what it measured.
#
# Python: $PYTHON, else .venv/bin/python when its torch sees CUDA, else python3. The checkout
# is put on PYTHONPATH (no install needed); torch, numpy, tqdm, pillow, tensorboard and pytest
# must be importable. higher and TorchOpt are measured when they import.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${OUT:-}" ]]; then default_out="$OUT/gpu_check.json"; else default_out="gpu_check.json"; fi
out="${1:-$default_out}"
shift || true

has_cuda='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "$has_cuda" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
if ! "$PYTHON" -c "$has_cuda"; then
    echo "gpu_check.sh: $PYTHON's torch sees no CUDA device (torch.cuda.is_available() is False);" \
        "run this on a machine with an NVIDIA GPU, or set PYTHON" >&2
    exit 2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
# 470 s: the whole check stays under 8 minutes even if a section hangs
exec timeout --signal=INT --kill-after=10 470 \
    "$PYTHON" benchmarks/gpu_check.py --device cuda --pytest --out "$out" "$@"
