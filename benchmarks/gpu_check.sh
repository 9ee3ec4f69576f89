#!/usr/bin/env bash
# The GPU check (issue 12) in one run, well under 10 minutes on one H100/H200: install the checkout, run
# the CUDA tests (tests/test_triton.py: every GPU path against float64, ops layer, torch.compile, host
# syncs), then the GPU suite (correctness against float64; timings of triton with the naive and torch
# baselines and the model in the same process; host syncs; the kernel profile), then the stage table of
# benchmarks/gpu_stages.py (each stage of one chunk against its floor; the host side), then the native CPU
# tests on the GPU machine's own processor (an AVX-512 Xeon on the H200 machines, where the dev and CI
# machines have AVX2 only: the AVX-512 GEMM and vector clones run there and nowhere else). JSON, Markdown
# and the logs go to one folder: $OUT when set, else benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # CPU self-test: Triton interpreter, tiny shapes
#   GPU_CONFIGS=qwen1.5b-step,mid-fp16-others bash benchmarks/gpu_check.sh   # a subset of the suite's configs
#
# Every step runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=()
[ "${1:-}" = "--smoke" ] && SMOKE=(--smoke)
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout is what runs, installed or not
export PYTHONUNBUFFERED=1
[ ${#SMOKE[@]} -gt 0 ] && export TRITON_INTERPRET=1
exec > >(tee "$LOG") 2>&1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0))s"
    [ $rc -eq 0 ] || status=1
}
echo "== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (modified)')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
if [ ${#SMOKE[@]} -eq 0 ]; then
    step install 30 "$PY" -m pip install --no-deps --no-build-isolation -q -e .
fi
# the CUDA tests compile many kernel variants: in parallel where pytest-xdist is there (the GPU image has it)
PAR=()
[ ${#SMOKE[@]} -eq 0 ] && "$PY" -c "import xdist" 2>/dev/null && PAR=(-n 8)
step cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider --durations=8 "${PAR[@]}" tests/test_triton.py
SUITE=()
[ -n "${GPU_CONFIGS:-}" ] && SUITE=(--configs "$GPU_CONFIGS")
step suite 190 "$PY" benchmarks/gpu_suite.py "${SMOKE[@]}" "${SUITE[@]}" --out "$OUT_DIR"
step stages 110 "$PY" benchmarks/gpu_stages.py "${SMOKE[@]}" --out "$OUT_DIR"
# the smoke run (CI, which runs every native test anyway) keeps to the ISA clones' bits
NATIVE=(tests/test_native_isa.py tests/test_native.py)
[ ${#SMOKE[@]} -gt 0 ] && NATIVE=(tests/test_native_isa.py)
grep -m1 "model name" /proc/cpuinfo 2>/dev/null; grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo "avx512f: yes" || echo "avx512f: no"
step native-cpu 110 "$PY" -m pytest -q -p no:cacheprovider "${PAR[@]}" "${NATIVE[@]}"
echo "== gpu_check: $([ $status -eq 0 ] && echo ok || echo FAILED) in ${SECONDS}s; results in $OUT_DIR"
exit $status
