#!/usr/bin/env bash
# One GPU run that fits one device call (< 9 minutes) and returns at most 4 files in $OUT:
#   results.jsonl  one JSON line per measurement, appended the moment it is taken (benchmarks/gpu_run.py)
#   log.txt        everything printed (install, stages, tests)
#
#   bash benchmarks/gpu_run.sh          # on the GPU machine: install (no nvcc build), stages, gpu tests
#   bash benchmarks/gpu_run.sh --dry    # CPU rehearsal of the whole script at tiny shapes (the CPU suite runs it)
#
# Budget: BUDGET_S (default 530 s) for everything; a stage starts only if its estimate fits what is left, and the
# gpu-marked tests get what remains (at least 30 s, else they are skipped with a line in results.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-530}
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-/tmp/desmoe-gpu-out}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
log() { echo "=== $* (+$(( $(date +%s) - START ))s)"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ $DRY = 1 ]; then
    log "dry run: CPU, tiny shapes, Triton interpreter; install step shown, not run"
    echo "would run: DESMOE_SKIP_EXT=1 python -m pip install --no-deps --no-build-isolation -e ."
    export TRITON_INTERPRET=1
    PY=python
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    log "install (no extension build)"
    PY=python3
    DESMOE_SKIP_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation -e . || { log "install failed"; exit 1; }
    export TRITON_CACHE_DIR=$(mktemp -d)  # empty: the first-call compile time is real
fi

log "stages"
$PY benchmarks/gpu_run.py --out "$RES" --budget "$(( BUDGET_S - 45 ))" --start "$START" $([ $DRY = 1 ] && echo --dry)
rc=$?
log "stages rc=$rc"

T_LEFT=$(left)
if [ $DRY = 1 ]; then
    log "gpu tests (collected; they skip without CUDA)"
    $PY -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_permute.py 2>&1 | tail -1
elif [ "$T_LEFT" -ge 30 ]; then
    log "gpu tests (${T_LEFT}s left)"
    timeout "$(( T_LEFT - 5 ))" $PY -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tail -30
    echo "{\"stage\": \"gpu_tests\", \"rc\": ${PIPESTATUS[0]}}" >> "$RES"
else
    echo "{\"stage\": \"gpu_tests\", \"skipped\": \"budget\", \"left_s\": $T_LEFT}" >> "$RES"
fi
log "done"
exec 1>&- 2>&-  # tee sees EOF and finishes log.txt before $OUT is collected
sleep 1
exit $rc
