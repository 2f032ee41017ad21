#!/usr/bin/env bash
# GPU checks for mpbatch, sized for one H100 in under 8 minutes (the step limits sum to 480 s):
#   1. the device and versions;
#   2. the optimiser tests, CUDA ones included (they skip themselves without a GPU);
#   3. bench_optimize.py for efficientnet_lite0, resnet50, vgg19 at batch 1..64;
#   4. torch.compile on top of the recommended options, resnet50 at batch 32 (may time out).
# Every step has its own timeout; a failed step is reported and the next one still runs.
# Exit status: 0 when every step passed, 1 otherwise.
#
#   benchmarks/gpu_check.sh OUTDIR          # logs, CSVs and summary.txt under OUTDIR
#   PYTHON=/path/to/python benchmarks/gpu_check.sh OUTDIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=()

# step NAME LIMIT_S COMMAND...: run with a timeout, log to OUT/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then
        echo "$name: ok in ${took}s" | tee -a "$SUMMARY"
    else
        local why="rc=$rc"
        [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit}s"
        echo "$name: FAILED ($why) after ${took}s" | tee -a "$SUMMARY"
        failed+=("$name")
    fi
    tail -n 30 "$OUT/$name.log" || true
}

step env 30 bash -c "nvidia-smi || true; $PYTHON -c 'import torch; \
assert torch.cuda.is_available(), \"torch sees no CUDA device\"; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())'"

step tests_optimize 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
    tests/test_optimize.py

step bench_optimize 240 "$PYTHON" benchmarks/bench_optimize.py --device cuda \
    --models efficientnet_lite0,resnet50,vgg19 --batch-sizes 1,8,16,32,64 \
    --out "$OUT/bench_optimize_cuda.csv"

step bench_compile 120 "$PYTHON" benchmarks/bench_optimize.py --device cuda \
    --models resnet50 --batch-sizes 32 --variants recommended --compile-batch-sizes 32 \
    --out "$OUT/bench_optimize_cuda_compile.csv"

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed steps: ${failed[*]}" | tee -a "$SUMMARY"
    exit 1
fi
echo "all steps passed" | tee -a "$SUMMARY"
