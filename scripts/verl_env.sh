#!/usr/bin/env bash
# Create (or reuse) .venv-verl: a venv of its own for the verl tests, so verl's pins (transformers 5.x,
# Ray, tensordict) do not fight the dev extras. The CPU torch build, verl 0.9.1 with the three modules it
# imports without declaring them (cachetools, uvicorn, fastapi), pytest, and this package (editable, no
# dependencies). Then: .venv-verl/bin/python -m pytest -q tests/verl_real
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VERL_VENV:-.venv-verl}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import verl, torch, nthr_kernels" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet "verl==0.9.1" cachetools uvicorn fastapi pytest
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
fi
"$VENV/bin/python" -c "import verl, torch, transformers; print('verl-env: verl', verl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
