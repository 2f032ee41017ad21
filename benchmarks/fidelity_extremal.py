"""Fidelity of extremal's fast path against its reference path (issue 26, item 3): two runs of
the same images and settings, one with `--reference`, compared image by image.

    mpbatch run DATA --preset torchray-voc --limit 20 --iterations 300 --no-metrics \\
        --reference -o RUNS/reference
    mpbatch run DATA --preset torchray-voc --limit 20 --iterations 300 --no-metrics \\
        -o RUNS/fast
    mpbatch evaluate RUNS/reference --baselines none      # and the same for RUNS/fast
    .venv/bin/python -m benchmarks.fidelity_extremal RUNS/reference RUNS/fast \\
        --label "fast fp32" --out benchmarks/results/fidelity_extremal_fast.csv

Per image and area (`<out>_images.csv`): Pearson r of the two stored masks (56×56 area
averages of the applied masks), their areas (fraction of cells > 0.5) and the difference.
Per image: deletion and insertion AUC of each run and the difference, and whether the
pointing game's hit agrees. The summary row (`<out>`, appended): per area the mean and min r,
the mean |Δarea|; the mean and max |ΔAUC|; the pointing agreement; each run's optimisation
seconds per image (from the file's timings, which cover a resumed run's last process only:
blank them for a resumed run). TorchRay against itself (1 thread against 2) moves its masks
as much, so read r beside parity.py's r_torchray_vs_itself on the same images (`--control`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_scoring_format import append_rows  # noqa: E402
from pipeline.store.reader import read_columns  # noqa: E402


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two maps; NaN when either is constant."""
    a = a.ravel().astype(np.float64) - a.mean()
    b = b.ravel().astype(np.float64) - b.mean()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 1e-12 else float("nan")


def per_area(reference: Path, other: Path) -> tuple[pd.DataFrame, dict]:
    """One row per shared image and area; and the two runs' stored settings and timings."""
    (ref_columns, ref_attrs), (columns, attrs) = read_columns(reference), read_columns(other)
    position = {path: i for i, path in enumerate(ref_columns["path"])}
    areas = ref_attrs["config"]["mask"]["areas"]
    if attrs["config"]["mask"] != ref_attrs["config"]["mask"]:
        raise SystemExit(f"{other} was made with other settings than {reference}")
    rows = []
    for i, path in enumerate(columns["path"]):
        if path not in position:
            continue
        mine, theirs = ref_columns["masks"][position[path]], columns["masks"][i]
        for a, area in enumerate(areas):
            rows.append(
                {
                    "image": path,
                    "area": area,
                    "pearson_r": pearson(mine[a], theirs[a]),
                    "area_reference": float((mine[a] > 0.5).mean()),
                    "area_other": float((theirs[a] > 0.5).mean()),
                }
            )
    table = pd.DataFrame(rows)
    table["area_difference"] = table["area_other"] - table["area_reference"]
    return table, {"reference": ref_attrs, "other": attrs}


def per_image(reference: Path, other: Path) -> pd.DataFrame:
    """Deletion / insertion AUC and the pointing hit of each run, per shared image."""
    columns = ["path", "deletion_auc", "insertion_auc", "pointing_hit"]
    mine = pd.read_csv(reference.parent / "report.csv", usecols=columns).set_index("path")
    theirs = pd.read_csv(other.parent / "report.csv", usecols=columns).set_index("path")
    mine.columns = [f"{c}_reference" for c in mine.columns]
    theirs.columns = [f"{c}_other" for c in theirs.columns]
    table = mine.join(theirs, how="inner")
    for metric in ("deletion_auc", "insertion_auc"):
        table[f"{metric}_difference"] = table[f"{metric}_other"] - table[f"{metric}_reference"]
    both = table[["pointing_hit_other", "pointing_hit_reference"]].notna().all(axis=1)
    agrees = table["pointing_hit_other"] == table["pointing_hit_reference"]
    table["pointing_agrees"] = agrees.where(both)  # NaN without boxes
    return table.reset_index().rename(columns={"path": "image"})


def seconds_per_image(attrs: dict) -> float:
    timings = attrs.get("timings", {})
    rows = attrs.get("rows") or 0
    return float(timings.get("optimize", float("nan"))) / rows if rows else float("nan")


def summary_row(label, areas: pd.DataFrame, images: pd.DataFrame, attrs, control) -> dict:
    row: dict = {"comparison": label, "images": images.shape[0]}
    for area, group in areas.groupby("area"):
        row[f"r_mean_area_{area:g}"] = round(group["pearson_r"].mean(), 4)
        row[f"r_min_area_{area:g}"] = round(group["pearson_r"].min(), 4)
        row[f"abs_area_difference_area_{area:g}"] = round(group["area_difference"].abs().mean(), 4)
    row["r_mean"] = round(areas["pearson_r"].mean(), 4)
    defined = areas["pearson_r"].dropna()  # a constant mask has no r
    row["r_undefined"] = int(areas["pearson_r"].isna().sum())
    row["share_r_ge_0.9"] = round((defined >= 0.9).mean(), 3)
    for metric in ("deletion_auc", "insertion_auc"):
        difference = images[f"{metric}_difference"].abs()
        row[f"{metric}_abs_difference_mean"] = round(difference.mean(), 4)
        row[f"{metric}_abs_difference_max"] = round(difference.max(), 4)
        row[f"{metric}_reference_mean"] = round(images[f"{metric}_reference"].mean(), 4)
        row[f"{metric}_other_mean"] = round(images[f"{metric}_other"].mean(), 4)
    row["pointing_agreement"] = round(images["pointing_agrees"].astype(float).mean(), 3)
    row["seconds_per_image_reference"] = round(seconds_per_image(attrs["reference"]), 2)
    row["seconds_per_image_other"] = round(seconds_per_image(attrs["other"]), 2)
    row["r_torchray_vs_itself"] = control
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the --reference run's folder")
    parser.add_argument("other", type=Path, help="the fast path's run folder")
    parser.add_argument("--label", default="fast fp32 against reference")
    parser.add_argument(
        "--control",
        type=Path,
        default=None,
        help="parity.py's parity_extremal_*.csv: its mean r_torchray_vs_itself goes in the row",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/fidelity_extremal_fast.csv"
    )
    args = parser.parse_args(argv)
    areas, attrs = per_area(args.reference / "masks.h5", args.other / "masks.h5")
    images = per_image(args.reference / "masks.h5", args.other / "masks.h5")
    control = ""
    if args.control is not None:
        control = round(pd.read_csv(args.control)["r_torchray_vs_itself"].mean(), 4)
    row = summary_row(args.label, areas, images, attrs, control)
    details = areas.merge(images, on="image", how="left")
    details.insert(0, "comparison", args.label)
    details_path = args.out.with_name(args.out.stem + "_images.csv")
    append_rows(details_path, details.to_dict("records"))
    append_rows(args.out, [row])
    for key, value in row.items():
        print(f"{key}: {value}")
    print(f"written: {args.out} and {details_path}")


if __name__ == "__main__":
    main()
