"""Fidelity of bf16 scoring (issue 26): the deletion and insertion AUCs of the same maps
scored with the model in float32 and under bf16 autocast (`--eval-precision bf16`,
models.speed.Bf16Forward), per image, on the sample's first images.

    .venv/bin/python -m benchmarks.eval_precision_fidelity --images 100 --step 1792

The maps are Grad-CAM's (deterministic, one forward and backward), made once in float32.
Both scorings use what scoring.evaluate_batch uses (batch norm folded, channels_last on the
CPU). Appends to benchmarks/results/eval_precision_fidelity_images.csv (per image, as it
goes: a killed run resumes where it stopped) and appends
a summary row to eval_precision_fidelity.csv: mean and max |ΔAUC|, whether the family meets
the gate of speed.EVAL_BF16_FAMILIES (mean ≤ 0.002 and max ≤ 0.01 for both curves),
and the seconds each scoring took on this device. The pointing game reads only the map, so
bf16 scoring cannot move a point; its agreement is 1 by construction and not measured.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_resume import cpu_name  # noqa: E402
from benchmarks.bench_scoring_format import append_rows  # noqa: E402
from pipeline.data.datasets import discover  # noqa: E402
from pipeline.data.images import ImageFolderDataset  # noqa: E402
from pipeline.methods import get_method  # noqa: E402
from pipeline.metrics.deletion_insertion import CurveProtocol, auc, perturbation_curves  # noqa: E402
from pipeline.models.folding import scoring_model  # noqa: E402
from pipeline.models.registry import load_model  # noqa: E402
from pipeline.models.speed import Bf16Forward, channels_last_on_cpu  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MEAN_GATE, MAX_GATE = 0.002, 0.01


def aucs(model, images, maps, targets, protocol, batch) -> dict[str, np.ndarray]:
    with channels_last_on_cpu(model, images.device):
        return {
            mode: auc(
                perturbation_curves(
                    model,
                    images,
                    maps,
                    targets,
                    mode=mode,
                    protocol=protocol,
                    eval_batch_size=batch,
                )
            ).numpy()
            for mode in ("deletion", "insertion")
        }


def _done(path: Path, model: str, step: int) -> list[dict]:
    """The rows already measured for this model and step (a killed run resumes)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["model"] == model and int(r["step"]) == step]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/imagenet-val-sample"
    )
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--step", type=int, default=1792)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    samples, _ = discover(args.data)
    samples = samples[: args.images]
    dataset = ImageFolderDataset(args.data, samples, 224)
    model = load_model(args.model).eval()
    method = get_method("gradcam")
    settings = method.resolve_settings(method.default_settings, model)
    protocol = CurveProtocol(step=args.step)
    per_image = RESULTS / "eval_precision_fidelity_images.csv"
    rows = _done(per_image, args.model, args.step)  # resumes: images already measured
    seconds = {p: sum(float(r[f"{p}_s"]) for r in rows) for p in ("fp32", "bf16")}
    for lo in range(len(rows), len(samples), args.batch):
        items = [dataset[i] for i in range(lo, min(lo + args.batch, len(samples)))]
        images = torch.stack([item["image"] for item in items])
        with torch.inference_mode():
            predicted = model(images).argmax(1)
        labels = torch.tensor([samples[item["index"]].label for item in items])
        targets = torch.where(labels >= 0, labels, predicted)
        maps = method.saliency(
            method.explain(model, images, targets, [], settings), settings, (224, 224)
        )
        scorer = scoring_model(model, images[:2])
        scored, batch_seconds = {}, {}
        for precision, forward in (("fp32", scorer), ("bf16", Bf16Forward(scorer))):
            tick = time.perf_counter()
            scored[precision] = aucs(forward, images, maps, targets, protocol, args.eval_batch_size)
            batch_seconds[precision] = time.perf_counter() - tick
            seconds[precision] += batch_seconds[precision]
        batch_rows = []
        for i, item in enumerate(items):
            row = {"model": args.model, "step": args.step, "path": samples[item["index"]].path}
            for mode in ("deletion", "insertion"):
                fp32, bf16 = scored["fp32"][mode][i], scored["bf16"][mode][i]
                row.update({f"{mode}_fp32": fp32, f"{mode}_bf16": bf16})
                row[f"{mode}_abs_diff"] = abs(float(bf16) - float(fp32))
            for precision, spent in batch_seconds.items():  # the batch's time, shared out
                row[f"{precision}_s"] = spent / len(items)
            batch_rows.append(row)
        append_rows(per_image, batch_rows)
        rows += batch_rows
        print(f"{len(rows)} images, {seconds}", flush=True)
    summary = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "model": args.model,
        "maps": "gradcam",
        "images": len(rows),
        "step": args.step,
    }
    passed = True
    for mode in ("deletion", "insertion"):
        diffs = np.array([float(r[f"{mode}_abs_diff"]) for r in rows])
        summary[f"{mode}_mean_abs_diff"] = f"{diffs.mean():.2e}"
        summary[f"{mode}_max_abs_diff"] = f"{diffs.max():.2e}"
        passed &= bool(diffs.mean() <= MEAN_GATE and diffs.max() <= MAX_GATE)
    summary["meets_gate"] = passed
    summary["fp32_s"] = round(seconds["fp32"], 1)
    summary["bf16_s"] = round(seconds["bf16"], 1)
    append_rows(RESULTS / "eval_precision_fidelity.csv", [summary])
    print(summary)


if __name__ == "__main__":
    main()
