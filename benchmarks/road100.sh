#!/usr/bin/env bash
# Issue 24's measured outcome: ROAD beside deletion/insertion on the sample's first 100
# images (efficientnet_lite0, 2 CPU cores): Grad-CAM with the centre and random baselines,
# the seed preset and the paper preset, each scored with --road. Each run resumes when the
# same command is run again (stop it with SIGTERM; --limit is part of a run's settings).
#   bash benchmarks/road100.sh [RUNS_FOLDER]     (default /work/runs/road100)
# then: .venv/bin/python -m benchmarks.road_ranking RUNS_FOLDER
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
SAMPLE=${SAMPLE:-$HERE/../shared/data/imagenet-val-sample}
RUNS=${1:-/work/runs/road100}
MPBATCH="nice -n 10 $HERE/.venv/bin/mpbatch"
# deletion/insertion at 1792 px a step (29 scores a curve) instead of 224 (225): 8x cheaper
COMMON="--limit 100 --road --step 1792 --batch-size 8 --workers 1 --quiet"
$MPBATCH run "$SAMPLE" -o "$RUNS/gradcam" --method gradcam --baselines center,random $COMMON
$MPBATCH run "$SAMPLE" -o "$RUNS/seed" --preset seed --iterations 150 --baselines none $COMMON
$MPBATCH run "$SAMPLE" -o "$RUNS/paper" --preset paper --iterations 100 --baselines none $COMMON
