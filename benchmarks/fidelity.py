"""Fidelity of the fast paths: masks made with bf16 autocast and/or torch.compile against the
float32 eager masks of the same images, and the summary metrics of each.

Runs ``pipeline.commands.run.run`` once per variant on the same images (same seeds, same targets),
each into its own folder under ``--work``, with deletion / insertion / pointing scored as usual
(no baselines). Then, per variant against ``fp32``:

- Pearson correlation of each image's 28×28 mask with the fp32 one (mean, minimum, and the
  share of images at ≥ 0.98), and the mean absolute difference;
- the summary metrics (means with 95% bootstrap intervals, from each run's summary.csv) and
  whether the variant's mean lies inside the fp32 interval;
- the run's own timings (seconds optimising and evaluating, images/s).

    .venv/bin/python -m benchmarks.fidelity DATA --limit 64 --variants fp32,bf16
    .venv/bin/python -m benchmarks.fidelity --compare A/masks.h5 B/masks.h5   # by image path
    python3 -m benchmarks.fidelity DATA --device cuda --limit 128 --batch-size 64 \\
        --variants fp32,bf16,bf16+compile --out benchmarks/results/fidelity_cuda.csv

A mask that the optimiser leaves almost uniform (e.g. all ones) has no defined correlation;
such images are counted in ``undefined`` and left out of the correlation figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]

from pipeline.commands.configuration import EvalOptions, RunOptions  # noqa: E402
from pipeline.commands.run import run  # noqa: E402
from pipeline.store.reader import read_columns  # noqa: E402

# variant name -> (precision, torch.compile, CUDA graphs)
VARIANTS = {
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "fp32+compile": ("fp32", True, False),
    "bf16+compile": ("bf16", True, False),
    "fp32+cudagraphs": ("fp32", True, True),
    "bf16+cudagraphs": ("bf16", True, True),
}
METRICS = ("deletion_auc", "insertion_auc", "pointing_acc", "pointing_energy")


def mask_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Per-image Pearson r and mean |difference| of two N×h×w mask stacks (same image order).

    Returns mean and min r over the images where both masks vary, the share of those at
    r ≥ 0.98, how many were undefined (a constant mask), and the mean absolute difference.
    """
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = other.reshape(len(other), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    defined = norms > 1e-12
    r = (a * b).sum(1)[defined] / norms[defined]
    return {
        "pearson_mean": float(r.mean()) if r.size else float("nan"),
        "pearson_min": float(r.min()) if r.size else float("nan"),
        "share_r_ge_0.98": float((r >= 0.98).mean()) if r.size else float("nan"),
        "undefined": int((~defined).sum()),
        "mean_abs_diff": float(np.abs(reference - other).mean()),
    }


def aligned_masks(reference: dict, other: dict) -> tuple[np.ndarray, np.ndarray]:
    """The masks of the images (matched by path) two mask files' columns share, in one order."""
    position = {p: i for i, p in enumerate(reference["path"])}
    shared = [i for i, p in enumerate(other["path"]) if p in position]
    reference_rows = [position[other["path"][i]] for i in shared]
    return reference["masks"][reference_rows], other["masks"][shared]


def compare_files(paths: list[Path]) -> pd.DataFrame:
    """Mask agreement of each mask file with the first, over the images (by path) they share."""
    reference, _ = read_columns(paths[0])
    rows = []
    for path in paths[1:]:
        mine, theirs = aligned_masks(reference, read_columns(path)[0])
        agreement = mask_agreement(mine, theirs)
        rows.append(
            {"reference": str(paths[0]), "other": str(path), "images": len(theirs), **agreement}
        )
    return pd.DataFrame(rows)


def run_variant(args: argparse.Namespace, name: str) -> Path:
    precision, compiled, graphs = VARIANTS[name]
    out = args.work / name
    options = RunOptions(
        data=args.data,
        out=out,
        model=args.model,
        weights=args.weights,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        limit=args.limit,
        overwrite=True,
        progress=False,
        precision=precision,
        compile=compiled,
        cuda_graphs=graphs,
        evaluation=EvalOptions(baselines=()),
        overrides={"iterations": args.iterations},
    )
    result = run(options)
    t = result.timings
    print(
        f"{name}: {result.processed} images in {result.seconds:.1f} s (optimise "
        f"{t['optimize']:.1f} s, evaluate {t['evaluate']:.1f} s, load {t['load']:.1f} s)",
        flush=True,
    )
    return out


def compare(args: argparse.Namespace, outs: dict[str, Path]) -> pd.DataFrame:
    reference_name = args.variants[0]
    files = {name: read_columns(out / "masks.h5") for name, out in outs.items()}
    summaries = {
        n: pd.read_csv(o / "summary.csv").set_index("method").loc["method"] for n, o in outs.items()
    }
    ref = summaries[reference_name]
    rows = []
    for name, (columns, attrs) in files.items():
        reference_masks, masks = aligned_masks(files[reference_name][0], columns)
        timings = attrs.get("timings", {})
        row = {"variant": name, "images": int(len(masks))}
        row.update(mask_agreement(reference_masks, masks))
        summary = summaries[name]
        for metric in METRICS:
            row[metric] = summary[metric]
            row[f"{metric}_low"] = summary[f"{metric}_low"]
            row[f"{metric}_high"] = summary[f"{metric}_high"]
            row[f"{metric}_in_ref_ci"] = bool(
                ref[f"{metric}_low"] <= summary[metric] <= ref[f"{metric}_high"]
            )
        for key in ("optimize", "evaluate", "load", "write", "total", "images_per_s"):
            row[f"time_{key}"] = round(float(timings.get(key, float("nan"))), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data", type=Path, nargs="?", help="image folder (any layout mpbatch accepts)"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=None,
        help="instead of running: compare these mask files' masks with the first one's",
    )
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="fp32,bf16",
        help="first is the reference; comma list of " + ", ".join(VARIANTS),
    )
    parser.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    parser.add_argument("--work", type=Path, default=Path("fidelity_runs"))
    parser.add_argument("--out", type=Path, default=None, help="CSV (default: print only)")
    args = parser.parse_args(argv)
    if args.data is None and not args.compare:
        parser.error("give an image folder, or --compare A.h5 B.h5 ...")
    missing = [path for path in args.compare or [] if not path.is_file()]
    if missing:
        parser.error(f"{missing[0]}: no such mask file")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        table = compare_files(args.compare)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if args.out:
            table.to_csv(args.out, index=False)
            print(f"wrote {args.out}")
        return
    outs = {name: run_variant(args, name) for name in args.variants}
    table = compare(args, outs)
    table.insert(0, "model", args.model)
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    table.insert(1, "device", device)
    table.insert(2, "device_name", torch.cuda.get_device_name() if device == "cuda" else "cpu")
    table.insert(3, "torch", torch.__version__)
    shown = [
        "variant",
        "images",
        "pearson_mean",
        "pearson_min",
        "share_r_ge_0.98",
        "mean_abs_diff",
        *METRICS,
        "time_optimize",
        "time_evaluate",
        "time_images_per_s",
    ]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
