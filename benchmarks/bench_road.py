"""ROAD's imputation: mpbatch's two solvers (sparse LU, batched conjugate gradients)
against the reference's scipy solve, one image at a time (road_evaluation's
NoisyLinearImputer, as ported in grad-cam 1.5.7), on sample photos at 224×224: seconds per
image for the 18 imputations of one map (MoRF and LeRF at 10%..90%) and the largest
difference from the reference.

    .venv/bin/python -m benchmarks.bench_road --images 4 --threads 2
    python -m benchmarks.bench_road --images 8 --device cuda --out OUT/bench_road_cuda.csv

Writes benchmarks/results/bench_road.csv (one row per map kind and solver). With --device
cuda the conjugate-gradient solver runs on the GPU (the reference and the LU stay on the CPU).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_resume import cpu_name  # noqa: E402
from benchmarks.road_reference import load_road_reference  # noqa: E402
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the conjugate gradients run")
    parser.add_argument("--solvers", default="direct,cg", help="mpbatch's solvers to time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_road.csv")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    reference = load_road_reference()
    if reference is None:
        raise SystemExit("bench_road needs grad-cam's ROAD imputer: make references")
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
        for solver in args.solvers.split(","):
            where = device if solver == "cg" else torch.device("cpu")
            inputs, holes = repeated.to(where), removed.to(where)
            synchronize(where)
            started = time.perf_counter()
            ours = torch.cat(
                [
                    linear_imputation(
                        inputs[i : i + per_map], holes[i : i + per_map], solver=solver
                    ).cpu()
                    for i in range(0, len(removed), per_map)
                ]
            )
            synchronize(where)
            seconds = (time.perf_counter() - started) / args.images
            solver = f"{solver} on {where.type}"
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
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                    "cpu": cpu_name(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__,
                }
            )
            print(rows[-1])
    out = args.out
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
