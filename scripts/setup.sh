#!/usr/bin/env bash
# One-time set-up of a fresh machine: torch (the CPU build on disk, only if no torch is importable
# yet, so an existing CUDA torch is kept), then the package with its dev and TRL extras, then the native CPU
# ops (optional: a machine without a compiler keeps the torch backend).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev,trl]"
# Build (or load from the cache) the C++ CPU ops once, so the first test or demo does not pay for it.
"$PY" -m nthr_kernels.ops.native_lib || echo "setup: native CPU ops not built; the torch backend serves CPU tensors"
