"""Scoring with batch norm folded into the convolutions (pipeline.models.folding, which
scoring.evaluate_batch uses): the deletion + insertion curves of the same images with the
model as loaded and with its folded copy, both in channels_last on the CPU as scoring runs
them, timed alternately in one process so background load hits both alike.

    .venv/bin/python -m benchmarks.bench_folding --threads 1

Appends one row per model to benchmarks/results/bench_folding_cpu.csv: the CPU, torch, best
wall seconds of each variant, their ratio, the batch norms folded, and the largest curve
difference between the two (rounding only).
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_resume import cpu_name  # noqa: E402
from benchmarks.bench_scoring_format import (  # noqa: E402
    append_rows,
    scoring_arguments,
    scoring_inputs,
    timed,
)
from pipeline.models.folding import foldable_pairs, scoring_model  # noqa: E402
from pipeline.models.registry import load_model  # noqa: E402
from pipeline.models.speed import channels_last_on_cpu  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    args = scoring_arguments(argv, description, 1, "bench_folding_cpu.csv")
    images, saliency = scoring_inputs(args.images)
    rows = []
    for name in args.models.split(","):
        # lite0 has its bundled weights; the others random ones (no download here)
        model = load_model(name, None if "lite0" in name else "random").eval()
        folded = scoring_model(model, images[:2])
        with torch.inference_mode():
            targets = model(images).argmax(1)
        plain_s, folded_s = [], []
        for _ in range(args.repeats):
            with channels_last_on_cpu(model, "cpu"):
                seconds, plain = timed(model, images, saliency, targets, args.eval_batch_size)
            plain_s.append(seconds)
            with channels_last_on_cpu(folded, "cpu"):
                seconds, fast = timed(folded, images, saliency, targets, args.eval_batch_size)
            folded_s.append(seconds)
        row = {
            "cpu": cpu_name(),
            "model": name,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "images": args.images,
            "eval_batch_size": args.eval_batch_size,
            "batch_norms_folded": len(foldable_pairs(model.model)) if folded is not model else 0,
            "unfolded_s": round(min(plain_s), 3),
            "folded_s": round(min(folded_s), 3),
            "ratio": round(min(plain_s) / min(folded_s), 3),
            "max_abs_curve_diff": f"{(plain - fast).abs().max().item():.3g}",
        }
        print(row, flush=True)
        rows.append(row)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
