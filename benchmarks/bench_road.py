"""ROAD's imputation: mpbatch's two solvers (sparse LU, batched conjugate gradients)
against the reference's scipy solve, one image at a time (road_evaluation's
NoisyLinearImputer, as ported in grad-cam 1.5.7), on sample photos at 224×224: seconds per
image for the 18 imputations of one map (MoRF and LeRF at 10%..90%) and the largest
difference from the reference.

    .venv/bin/python benchmarks/bench_road.py --images 4 --threads 2

Writes benchmarks/results/bench_road.csv (one row per map kind and solver).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_resume import cpu_name  # noqa: E402
from test_road import _reference  # noqa: E402

from pipeline.data.datasets import discover  # noqa: E402
from pipeline.data.images import decode_image, resize_image  # noqa: E402
from pipeline.metrics.deletion_insertion import center_saliency  # noqa: E402
from pipeline.metrics.road import ORDERS, ROAD_FRACTIONS, linear_imputation, removed_pixels  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-val-sample"


def photos(count: int) -> torch.Tensor:
    samples, _ = discover(SAMPLE)
    images = [resize_image(decode_image(SAMPLE / s.path)[0], 224) for s in samples[:count]]
    return torch.stack(images)


def maps(kind: str, count: int) -> torch.Tensor:
    """ "center": one smooth blob (large holes: the slow case); "random": scattered pixels."""
    if kind == "center":
        return center_saliency(count, (224, 224))
    return torch.rand(count, 7, 7, generator=torch.Generator().manual_seed(0))


def masks(saliency: torch.Tensor) -> torch.Tensor:
    """Every (order, fraction) removal of every image: (B·18)×224×224, image-major."""
    every = [removed_pixels(saliency, (224, 224), f, o) for o in ORDERS for f in ROAD_FRACTIONS]
    return torch.stack(every, dim=1).flatten(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = _reference()
    imputer = reference.NoisyLinearImputer(noise=0.0)
    images = photos(args.images)
    per_map = 2 * len(ROAD_FRACTIONS)
    rows = []
    for kind in ("random", "center"):
        removed = masks(maps(kind, args.images))
        repeated = images.repeat_interleave(per_map, dim=0)
        started = time.perf_counter()
        theirs = torch.stack(
            [imputer(repeated[i].clone(), (~removed[i]).float()) for i in range(len(removed))]
        )
        reference_s = (time.perf_counter() - started) / args.images
        results = [("reference: scipy spsolve, one image at a time", reference_s, 0.0)]
        for solver in ("direct", "cg"):
            started = time.perf_counter()
            ours = torch.cat(
                [
                    linear_imputation(
                        repeated[i : i + per_map], removed[i : i + per_map], solver=solver
                    )
                    for i in range(0, len(removed), per_map)
                ]
            )
            seconds = (time.perf_counter() - started) / args.images
            results.append((f"mpbatch {solver}", seconds, float((ours - theirs).abs().max())))
        for solver, seconds, worst in results:
            rows.append(
                {
                    "maps": kind,
                    "solver": solver,
                    "seconds_per_image": round(seconds, 3),
                    "images": args.images,
                    "max_abs_diff_vs_reference": f"{worst:.2e}",
                    "threads": args.threads,
                    "cpu": cpu_name(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__,
                }
            )
            print(rows[-1])
    out = ROOT / "benchmarks" / "results" / "bench_road.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
