#!/usr/bin/env bash
# Issue 24's measured outcome: the model-randomisation sanity check and repeatability over 3
# seeds on the sample's first 20 images (efficientnet_lite0, 2 CPU cores), for Grad-CAM and
# the seed preset (150 iterations, as benchmarks/road100.sh). Each check resumes when the
# same command is run again (stop it with SIGTERM).
#   bash benchmarks/sanity20.sh [RUNS_FOLDER]     (default /work/runs/sanity20)
# Then each RUNS_FOLDER/NAME holds sanity.csv, sanity_summary.csv, sanity.png,
# repeatability.csv and repeatability_summary.csv.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
SAMPLE=${SAMPLE:-$HERE/../shared/data/imagenet-val-sample}
RUNS=${1:-/work/runs/sanity20}
MPBATCH=${MPBATCH:-"nice -n 10 $HERE/.venv/bin/mpbatch"}
# repeats are scored with deletion/insertion at 1792 px a step (as road100.sh) and ROAD
COMMON="--limit 20 --repeat 3 --road --step 1792 --batch-size 8 --workers 1 --quiet"
for name in gradcam seed; do
  case $name in
    gradcam) method="--method gradcam" ;;
    seed) method="--preset seed --iterations 150" ;;
  esac
  start=$(date +%s)
  $MPBATCH sanity "$SAMPLE" -o "$RUNS/$name" $method $COMMON
  echo "$name: $(( $(date +%s) - start )) s wall" | tee -a "$RUNS/wall.txt"
done
