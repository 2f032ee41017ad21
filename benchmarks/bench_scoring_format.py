"""Scoring in channels_last on the CPU: the deletion + insertion curves of the same images
with the model's weights contiguous (NCHW) and in channels_last
(``pipeline.models.speed.channels_last_on_cpu``, which ``scoring.evaluate_batch`` uses), timed
alternately in one process so background load hits both alike.

    .venv/bin/python -m benchmarks.bench_scoring_format --threads 2

Appends one row per model to benchmarks/results/bench_scoring_format_cpu.csv: best wall
seconds of each variant, their ratio, and the largest curve difference between them.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from pipeline.metrics.deletion_insertion import perturbation_curves  # noqa: E402
from pipeline.models.registry import load_model  # noqa: E402
from pipeline.models.speed import channels_last_on_cpu  # noqa: E402


def curves(model, images, saliency, targets, batch: int) -> torch.Tensor:
    return torch.cat(
        [
            perturbation_curves(model, images, saliency, targets, mode=m, eval_batch_size=batch)
            for m in ("deletion", "insertion")
        ]
    )


def timed(*args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = curves(*args)
    return time.perf_counter() - start, out


def scoring_inputs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` smooth random 224-px images and random maps (seeded): what both scoring
    benchmarks time."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(count, 3, 14, 14, generator=gen)
    images = F.interpolate(low, size=(224, 224), mode="bilinear")
    return images, torch.rand(count, 224, 224, generator=gen)


def append_rows(out: Path, rows: list[dict]) -> None:
    """Append rows to a results CSV (its header first when the file is new). A file whose
    header differs (a script gained columns) is rewritten with the union of the columns,
    blank where a row lacks one."""
    new = not out.exists()
    if not new:
        with out.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != list(rows[0]):
            merged = pd.concat([pd.read_csv(out), pd.DataFrame(rows)], ignore_index=True)
            merged.to_csv(out, index=False)
            return
    with out.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def scoring_arguments(
    argv: list[str] | None, description: str, images: int, out: str
) -> argparse.Namespace:
    """The scoring benchmarks' options (models, images, batch, repeats, threads, out), parsed;
    the thread count is applied."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results" / out)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    args = scoring_arguments(argv, description, 2, "bench_scoring_format_cpu.csv")
    images, saliency = scoring_inputs(args.images)
    rows = []
    for name in args.models.split(","):
        # lite0 has its bundled weights; the others random ones (no download here)
        model = load_model(name, None if "lite0" in name else "random")
        with torch.inference_mode():
            targets = model(images).argmax(1)
        plain_s, cl_s = [], []
        for _ in range(args.repeats):
            seconds, plain = timed(model, images, saliency, targets, args.eval_batch_size)
            plain_s.append(seconds)
            with channels_last_on_cpu(model, "cpu"):
                seconds, fast = timed(model, images, saliency, targets, args.eval_batch_size)
            cl_s.append(seconds)
        row = {
            "model": name,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "images": args.images,
            "eval_batch_size": args.eval_batch_size,
            "contiguous_s": round(min(plain_s), 3),
            "channels_last_s": round(min(cl_s), 3),
            "ratio": round(min(plain_s) / min(cl_s), 2),
            "max_abs_curve_diff": f"{(plain - fast).abs().max().item():.3g}",
        }
        print(row)
        rows.append(row)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
