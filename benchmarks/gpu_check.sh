#!/usr/bin/env bash
# GPU checks for mpbatch on one CUDA GPU. Without SAMPLE the step limits sum to 340 s; with
# SAMPLE (a folder of real images, e.g. ../shared/data/imagenet-val-sample) to 560 s.
#   env             the device and versions
#   bench_optimize  bench_optimize.py: lite0, resnet50, vgg19, batch 1..64, every variant
#   run_vgg19       with SAMPLE: `mpbatch run` of 192 images, vgg19 (random weights: timing
#                   only), --batch-size auto (the run of 2026-11-26 used 64), 8 loader
#                   workers, scored, with GPU utilisation sampled by nvidia-smi every
#                   200 ms (gpu_util.csv)
#   tests_cuda      the CUDA tests (they skip themselves without a GPU)
#   bench_compile   torch.compile and compile + CUDA graphs for lite0 at batch 64
#   fidelity        with SAMPLE: fidelity.py on 128 images, lite0 (pretrained), batch 64:
#                   fp32 against bf16 and bf16 + compile
# Every step has its own timeout; a failed step is reported and the next one still runs.
# Exit status: 0 when every step passed, 1 otherwise.
#
#   benchmarks/gpu_check.sh OUTDIR [SAMPLE]     # logs, CSVs and summary.txt under OUTDIR
#   PYTHON=/path/to/python benchmarks/gpu_check.sh OUTDIR
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUTDIR [SAMPLE]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SAMPLE=""
if [[ $# -eq 2 ]]; then SAMPLE=$(cd "$2" && pwd); fi
source "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"

step env 20 bash -c "nvidia-smi; $PYTHON -c 'import torch, torchvision, timm; \
assert torch.cuda.is_available(), \"torch sees no CUDA device\"; print(torch.__version__, \
torchvision.__version__, timm.__version__, torch.version.cuda, torch.cuda.get_device_name(0), \
torch.cuda.is_bf16_supported())'"

step bench_optimize 150 "$PYTHON" -m benchmarks.bench_optimize --device cuda --warmup 3 \
    --iters 10 --models efficientnet_lite0,resnet50,vgg19 --batch-sizes 1,8,16,32,64 \
    --out "$OUT/bench_optimize_cuda.csv"

if [[ -n "$SAMPLE" ]]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
        -lms 200 >"$OUT/gpu_util.csv" 2>/dev/null &
    sampler=$!
    date +%s.%N >"$OUT/run_vgg19.start"
    step run_vgg19 80 "$PYTHON" cli.py run "$SAMPLE" -o "$OUT/run_vgg19" --model vgg19 \
        --weights random --limit 192 --batch-size auto --workers 8 --device cuda \
        --baselines none --quiet
    date +%s.%N >"$OUT/run_vgg19.stop"
    kill "$sampler" 2>/dev/null
fi

step tests_cuda 70 "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" -k cuda \
    tests/test_optimize.py tests/test_metrics.py

step bench_compile 100 "$PYTHON" -m benchmarks.bench_optimize --device cuda --warmup 3 \
    --iters 10 --models efficientnet_lite0 --batch-sizes 64 --variants recommended \
    --compile-batch-sizes 64 --cudagraph-batch-sizes 64 \
    --out "$OUT/bench_optimize_cuda_compile.csv"

if [[ -n "$SAMPLE" ]]; then
    step fidelity 140 "$PYTHON" -m benchmarks.fidelity "$SAMPLE" --device cuda --limit 128 \
        --batch-size 64 --workers 8 --variants fp32,bf16,bf16+compile \
        --work "$OUT/fidelity_runs" --out "$OUT/fidelity_lite0_cuda.csv"
fi

finish
