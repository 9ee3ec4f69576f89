#!/usr/bin/env bash
# One-time set-up of an environment, saying what it does at each step:
#   1. the environment: $VENV (default: the active virtual environment, else the project's .venv, created
#      here with `python3 -m venv`, so an externally-managed system Python is never pip-installed into);
#   2. torch==2.13.0, only if no torch is importable there (an existing CUDA torch is kept), from pip's
#      configured index, or from $TORCH_INDEX_URL when set (PyPI's Linux wheel is the CUDA build, several GB;
#      https://download.pytorch.org/whl/cpu has the CPU build);
#   3. this package, editable, with the extras in $EXTRAS (default "dev": tests, transformers, matplotlib;
#      the demo needs nothing more; EXTRAS=dev,trl adds TRL, whose tests are skipped without it);
#   4. the native CPU ops (optional: a machine without a compiler keeps the torch backend).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-${VIRTUAL_ENV:-.venv}}
EXTRAS=${EXTRAS:-dev}
if [ ! -x "$VENV/bin/python" ]; then
    existed=$([ -e "$VENV" ] && echo yes || echo no)
    echo "setup: creating the virtual environment $VENV with $(command -v python3) ($(python3 --version 2>&1))"
    if ! python3 -m venv "$VENV"; then
        # Debian's venv without python3-venv leaves a pip-less $VENV/bin/python behind: remove what this run
        # made, so that the next run (after the install) creates the environment again instead of using it
        if [ "$existed" = no ]; then rm -rf -- "$VENV"; fi
        echo "setup: python3 -m venv failed; on Debian/Ubuntu install it with: sudo apt install python3-venv" >&2
        exit 1
    fi
fi
PY="$VENV/bin/python"
echo "setup: using $PY ($("$PY" --version 2>&1))"
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "setup: $VENV has no pip (an environment whose creation failed half-way?); remove it (rm -r $VENV)" \
         "and run this again, or activate an environment that has pip" >&2
    exit 1
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        echo "setup: installing torch==2.13.0 from $TORCH_INDEX_URL"
        "$PY" -m pip install --progress-bar on --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
    else
        echo "setup: installing torch==2.13.0 from pip's configured index (PyPI's Linux wheel is the CUDA build," \
             "several GB; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build)"
        "$PY" -m pip install --progress-bar on "torch==2.13.0"
    fi
else
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
echo "setup: installing nthr-kernels (editable) with the extras [$EXTRAS] and their dependencies"
"$PY" -m pip install --progress-bar on -e ".[$EXTRAS]"
# Build (or load from the cache) the C++ CPU ops once, so the first test or demo does not pay for it.
echo "setup: building the native CPU ops (C++, about a minute the first time)"
"$PY" -m nthr_kernels.ops.native_lib || echo "setup: native CPU ops not built; the torch backend serves CPU tensors"
echo "setup: done; run Python from this environment: $PY"
