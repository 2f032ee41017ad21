"""Seconds per image of extremal perturbations (`--preset torchray-voc`'s settings): mpbatch's
paths against TorchRay's own `extremal_perturbation` on the same images, model and device,
in one run (issue 26, item 4).

mpbatch optimises `--batch-size` images (4 masks each) at once; TorchRay explains one image
at a time (its batch is the areas of one image), on the first `--torchray-count` images. Each
path's first batch also pays warm-up (and compilation, with `compile`), so it is timed once
untimed before; the GPU is synchronised around every timing.

    python -m benchmarks.bench_extremal --data SAMPLE --device cuda --count 40 \\
        --batch-size 40 --paths fast,fast-bf16,reference --torchray-count 2
    .venv/bin/python -m benchmarks.bench_extremal --data ../shared/data/imagenet-val-sample \\
        --count 2 --batch-size 2 --iterations 20 --torchray-count 1      # a CPU dry run

Paths: "reference" (TorchRay's operation order, float32), "fast" (smooth_masks'
FastMaskGenerator, float32), "fast-bf16" (and the model under bf16 autocast), and with
"+compile" / "+graphs" appended, torch.compile and CUDA graphs. Appends one row per path to
`--out` (default benchmarks/results/bench_extremal_<device>.csv): the device, torch, path,
images, batch size, iterations, seconds per image, and the ratio of TorchRay's seconds per
image to the path's. Needs TorchRay (`pip install --no-deps torchray`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_resume import cpu_name  # noqa: E402
from benchmarks.bench_scoring_format import append_rows  # noqa: E402
from benchmarks.parity import load_images, torchray_masks  # noqa: E402
from benchmarks.profile_extremal import seconds_of  # noqa: E402
from pipeline.methods.extremal.optimizer import EXTREMAL_PRESETS, extremal_masks  # noqa: E402
from pipeline.models.registry import load_model  # noqa: E402
from pipeline.models.speed import SpeedOptions  # noqa: E402


def speed_of(path: str) -> SpeedOptions:
    """The SpeedOptions a path name stands for (see the module docstring)."""
    name, *extras = path.split("+")
    if name == "reference":
        if extras:
            raise SystemExit("the reference path takes no +compile or +graphs")
        return SpeedOptions(reference=True)
    precision = {"fast": "fp32", "fast-bf16": "bf16"}.get(name)
    if precision is None or not set(extras) <= {"compile", "graphs"}:
        raise SystemExit(f"unknown path {path!r}")
    graphs = "graphs" in extras
    return SpeedOptions(
        precision=precision, compile="compile" in extras or graphs, cuda_graphs=graphs
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/imagenet-val-sample"
    )
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=40, help="images per mpbatch path")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--paths", default="fast,fast-bf16,reference")
    parser.add_argument("--torchray-count", type=int, default=2, help="0: skip TorchRay")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = EXTREMAL_PRESETS["torchray-voc"].replace(iterations=args.iterations)
    model = load_model(args.model).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    samples, images, _ = load_images(args.data, args.count, 224)
    images = images.to(device)
    targets = torch.tensor([s.label for s in samples], device=device)
    seconds: dict[str, float] = {}

    if args.torchray_count > 0:
        torchray_masks(model, images[:1], int(targets[0]), settings.replace(iterations=2))
        per_image = [
            seconds_of(
                lambda i=i: torchray_masks(model, images[i : i + 1], int(targets[i]), settings),
                device,
            )
            for i in range(min(args.torchray_count, len(samples)))
        ]
        seconds["torchray"] = statistics.mean(per_image)
        print(f"torchray: {seconds['torchray']:.3f} s an image", flush=True)

    for path in args.paths.split(","):
        speed = speed_of(path)
        batches = [
            range(start, min(start + args.batch_size, len(samples)))
            for start in range(0, len(samples), args.batch_size)
        ]

        def explain(batch: range, chosen=settings, speed=speed) -> None:
            rows = slice(batch.start, batch.stop)
            extremal_masks(model, images[rows], targets[rows], list(batch), chosen, speed=speed)

        explain(batches[0], settings.replace(iterations=2))  # warm-up, compilation
        total = sum(seconds_of(lambda b=batch: explain(b), device) for batch in batches)
        seconds[path] = total / len(samples)
        print(f"{path}: {seconds[path]:.3f} s an image", flush=True)

    rows = [
        {
            "device": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "model": args.model,
            "path": path,
            "images": args.torchray_count if path == "torchray" else len(samples),
            "batch_size": 1 if path == "torchray" else args.batch_size,
            "iterations": args.iterations,
            "seconds_per_image": round(value, 4),
            "torchray_over_path": round(seconds["torchray"] / value, 2)
            if "torchray" in seconds
            else "",
        }
        for path, value in seconds.items()
    ]
    out = args.out or ROOT / f"benchmarks/results/bench_extremal_{device.type}.csv"
    append_rows(out, rows)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
