#!/usr/bin/env bash
# The part of issue 12's quality sweep that is too slow on a small CPU, on one CUDA GPU:
# extremal perturbations at TorchRay's benchmark settings (`--preset torchray-voc`; about
# 11 min an image on one CPU thread), beside the comparison rows (Grad-CAM, centre, random)
# scored on the same images, so the table pairs them. Both runs resume if stopped.
#
#   benchmarks/gpu_quality.sh OUTDIR SAMPLE [START STOP [LIMIT_S]]
#
# Images [START, STOP) of SAMPLE (default 0 100, the tuning images), runs under
# OUTDIR/sweep, the table as OUTDIR/quality_gpu-START-STOP.{csv,md}. LIMIT_S (default 420)
# bounds the whole sweep; a stopped sweep is tabulated as far as it got and resumes when
# the same command is run again. RUN_ARGS (default "--batch-size auto --workers 8 --quiet")
# replaces the `mpbatch run` options: a smaller batch loses less when the limit stops it.
set -uo pipefail

if [[ $# -lt 2 || $# -gt 5 ]]; then
    echo "usage: $0 OUTDIR SAMPLE [START STOP [LIMIT_S]]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SAMPLE=$(cd "$2" && pwd)
START=${3:-0}
STOP=${4:-100}
LIMIT=${5:-420}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

common=("$SAMPLE" --out-root "$OUT/sweep" --start "$START" --stop "$STOP"
    --settings baselines,extremal --tag "gpu-$START-$STOP" --results "$OUT")
rc=0
# SIGTERM at the limit reaches mpbatch, which flushes finished batches and exits resumable
timeout --kill-after=30 "$LIMIT" "$PYTHON" -m benchmarks.quality "${common[@]}" \
    --run-args "${RUN_ARGS:---batch-size auto --workers 8 --quiet}" 2>&1 | tee "$OUT/quality_sweep.log" ||
    rc=$?
"$PYTHON" -m benchmarks.quality "${common[@]}" --table-only >>"$OUT/quality_sweep.log" 2>&1
cat "$OUT/quality_gpu-$START-$STOP.md" 2>/dev/null
exit "$rc"
