#!/usr/bin/env bash
# Create (or reuse) .venv-verl: a venv of its own for the verl tests, so verl's pins (transformers 5.x,
# Ray, tensordict) do not fight the dev extras. torch first (the CPU build on disk), then this package
# with its verl extra (verl 0.9 and the modules it imports without declaring them) and pytest.
# Then: .venv-verl/bin/python -m pytest -q tests/test_verl_real.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VERL_VENV:-.venv-verl}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import verl, torch, nthr_kernels" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e ".[verl]" pytest
fi
"$VENV/bin/python" -c "import verl, torch, transformers; print('verl-env: verl', verl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
