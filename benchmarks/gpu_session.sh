#!/usr/bin/env bash
# One call on a lent GPU machine: install, GPU tests, every benchmark, results JSON into benchmarks/results/
# (and into $OUT when set, so they come back from the device tool). Sized to fit one 10-minute command.
#
#   bash benchmarks/gpu_session.sh            # all
#   STAGES="tests moe" bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-"install tests routing moe grad_mask routing_stats train_step"}
OUT=${OUT:-/tmp/desmoe-gpu-out}
mkdir -p "$OUT"
log() { echo "=== $* ($(date -u +%H:%M:%S))"; }
run() {  # run a stage, keep going on failure, record its status
    local name=$1; shift
    log "$name"
    timeout "${STAGE_TIMEOUT:-300}" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -25 "$OUT/$name.log"
    echo "$name rc=$rc" | tee -a "$OUT/status.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
for s in $STAGES; do
    case $s in
        install) run install pip install --no-deps --no-build-isolation -e . ;;
        tests) run tests python -m pytest -m gpu -q -x tests ;;
        routing) run routing python benchmarks/bench_routing.py ;;
        moe) run moe python benchmarks/bench_moe_layer.py ;;
        grad_mask) run grad_mask python benchmarks/bench_grad_mask.py ;;
        routing_stats) run routing_stats python benchmarks/bench_routing_stats.py ;;
        train_step) run train_step python benchmarks/bench_train_step.py ;;
        *) echo "unknown stage $s" ;;
    esac
done
cp benchmarks/results/*.json "$OUT/" 2>/dev/null || true
cat "$OUT/status.txt"
