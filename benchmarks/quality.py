"""Which masks are best: a sweep of settings over one data folder, one table.

Each setting is one `mpbatch run` into OUT_ROOT/<setting>/ (rerunning the script resumes
every unfinished run, so a stopped sweep continues). The comparison rows are scored once,
by the `baselines` setting (Grad-CAM with the centre and random baselines); the other
settings score their own maps only (`--baselines none`), and are paired with the centre
baseline on the same images (joined by path). Images [START, STOP) of DATA are linked into
OUT_ROOT/data-START-STOP/ (labels and boxes travel with them), so the tuning images (0-100)
and the confirmation images (100-300) are separate folders.

    python -m benchmarks.quality ../shared/data/imagenet-val-sample --out-root /work/sweep \
        --start 0 --stop 100 --settings baselines,seed,paper,preserve,extremal

Writes benchmarks/results/quality_<tag>.csv and .md: per setting and row (the method, or
Grad-CAM / centre / random), deletion and insertion AUC (with bootstrap intervals from the
summary), pointing (all, small objects, raw argmax, smoothed σ 0.09), energy pointing,
localization error (energy 0.95, value 0.10, mean 0.5), seconds per image (summed over
every invocation of the run: optimising the map / scoring one map), the median target
probability under the learnt mask (`prob_masked_median`; a deletion game aims at 0), and
the paired differences against the centre baseline (method − centre, mean and 95% interval).
With --per-image, also quality_<tag>_per_image.csv: every setting's per-image columns.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from pipeline.commands.shards import sum_timings  # noqa: E402
from pipeline.reports.tables import bootstrap_ci, summary_table  # noqa: E402
from pipeline.store.reader import map_label, read_columns  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# setting -> `mpbatch run` options. `baselines` scores the comparison rows once.
SETTINGS: dict[str, list[str]] = {
    "baselines": ["--method", "gradcam"],  # + --baselines COMPARISONS (centre, random)
    "seed": ["--preset", "seed"],
    "paper": ["--preset", "paper"],
    "preserve": ["--preset", "paper", "--game", "preserve"],
    "extremal": ["--preset", "torchray-voc"],
    # a grid around the seed preset (the sweep picks the centre of the next one)
    "seed-it300": ["--preset", "seed", "--iterations", "300"],
    "seed-l1x2": ["--preset", "seed", "--l1", "0.02"],
    "seed-l1/2": ["--preset", "seed", "--l1", "0.005"],
    "seed-tv/2": ["--preset", "seed", "--tv", "0.1"],
    "seed-tvx2": ["--preset", "seed", "--tv", "0.4"],
    "seed-noise0": ["--preset", "seed", "--noise", "0"],
    "seed-pyramid": ["--preset", "seed", "--perturbation", "blur-pyramid"],
}
STOPPED: list[int] = []  # signals received: a stopped sweep starts no further setting
PAIRED = ("deletion_auc", "insertion_auc", "pointing_hit_smooth")  # against the centre
PAIRED_GRADCAM = ("deletion_auc", "insertion_auc")  # issue 12's aim: better than Grad-CAM


def is_small_object(data: Path, sample) -> bool:
    """docs/design.md §4's small-object subset: the label's boxes cover < 25% of the photo."""
    from PIL import Image

    from pipeline.metrics.pointing import box_coverage
    from pipeline.metrics.scoring import target_boxes

    boxes = target_boxes(sample, sample.label)
    if boxes is None:
        return False
    with Image.open(data / sample.path) as image:
        size = image.size
    return bool(box_coverage([boxes], [size])[0] < 0.25)


def subset_folder(
    data: Path, out_root: Path, start: int, stop: int, small_only: bool = False
) -> Path:
    """OUT_ROOT/data-START-STOP: links to images [start, stop) of DATA (sorted as mpbatch
    sorts them) beside DATA's label and box files, so a run sees only those images.
    `small_only`: only the small-object images among them (folder data-START-STOP-small)."""
    from pipeline.data.datasets import discover

    samples, _ = discover(data)
    folder = out_root / (f"data-{start}-{stop}" + ("-small" if small_only else ""))
    chosen = samples[start:stop]
    if small_only:
        chosen = [s for s in chosen if is_small_object(data, s)]
    for sample in chosen:
        link = folder / sample.path
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((data / sample.path).resolve(), link)
    for extra in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        if (data / extra).exists() and not (folder / extra).exists():
            os.symlink((data / extra).resolve(), folder / extra)
    return folder


def run_setting(
    name: str, data: Path, out: Path, run_args: list[str], comparisons: str = "center,random"
) -> int:
    """`mpbatch run` for one setting (resumes an unfinished one); its exit status.
    `comparisons`: the rows the `baselines` setting scores beside Grad-CAM."""
    options = SETTINGS[name] + ["--baselines", comparisons if name == "baselines" else "none"]
    command = [sys.executable, "-m", "cli", "run", str(data), "-o", str(out), *options, *run_args]
    print("$", shlex.join(command), flush=True)
    process = subprocess.Popen(command, cwd=ROOT)

    def forward(signum, _frame) -> None:  # the run flushes its finished batches and stops
        STOPPED.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _seconds(attrs: dict, rows: int) -> tuple[float, float]:
    """(seconds per image making the maps, seconds per image scoring all maps), summed
    over every invocation of the run."""
    total = attrs.get("timings_total") or attrs.get("timings") or {}
    images = max(1, int(total.get("images", rows) or rows))
    return total.get("optimize", np.nan) / images, total.get("evaluate", np.nan) / images


def run_files(out: Path) -> list[Path]:
    """OUT/masks.h5, or while a sharded run is unmerged its shard files (finished rows)."""
    if (out / "masks.h5").exists():
        return [out / "masks.h5"]
    return sorted(out.glob("masks-*-of-*.h5"))


def read_run(out: Path) -> tuple[dict, dict]:
    """The columns of a run's finished rows (shards concatenated in order) and its
    attributes (the first file's; `timings_total` summed over the shards)."""
    parts = []
    for path in run_files(out):
        try:
            parts.append(read_columns(path))
        except OSError as error:  # e.g. locked: another shard's process is writing it
            print(f"quality: {path}: cannot be read now, left out ({error})", file=sys.stderr)
    if not parts:
        raise SystemExit(f"quality: {out}: no mask file can be read")
    parts = [p for p in parts if p[1].get("rows", 0)] or parts[:1]  # a shard yet to write
    columns = {k: np.concatenate([c[k] for c, _ in parts]) for k in parts[0][0]}
    attrs = dict(parts[0][1])
    attrs["timings_total"] = sum_timings([a.get("timings_total") or {} for _, a in parts])
    return columns, attrs


def setting_rows(name: str, run: tuple[dict, dict], centre: pd.DataFrame | None) -> list[dict]:
    """One record per row of this setting's summary (`run`: read_run's columns and
    attributes), with the paired differences."""
    columns, attrs = run
    label = map_label(attrs["config"])
    summary = summary_table(columns, label=label)
    making, scoring = _seconds(attrs, len(columns.get("path", [])))
    maps = len(summary)
    records = []
    for _, row in summary.iterrows():
        record = {"setting": name, "row": row["method"], **row.drop("method").to_dict()}
        own = row["method"] == label
        record["s_per_image_map"] = making if own else 0.0
        if own and "prob_masked" in columns:  # did the game reach its goal? (delete: → 0)
            record["prob_masked_median"] = float(np.nanmedian(columns["prob_masked"]))
        record["s_per_image_scoring"] = scoring / maps
        prefix = "" if own else f"{row['method']}_"
        record["pointing_acc_small_smooth"] = small_object_mean(
            columns, f"{prefix}pointing_hit_smooth"
        )
        if centre is not None and row["method"] != "center":
            vs_gradcam = row["method"] != "gradcam"
            record.update(paired_differences(columns, prefix, centre, vs_gradcam))
        records.append(record)
    return records


def small_object_mean(columns: dict, name: str) -> float:
    """Mean of a per-image column over the small-object images with a value (NaN if none)."""
    if name not in columns or "small_object" not in columns:
        return np.nan
    values = np.asarray(columns[name], dtype=np.float64)
    small = (np.asarray(columns["small_object"], dtype=np.float64) > 0.5) & np.isfinite(values)
    return float(values[small].mean()) if small.any() else np.nan


def paired_differences(
    columns: dict, prefix: str, centre: pd.DataFrame, vs_gradcam: bool = True
) -> dict:
    """mean and 95% bootstrap interval of (map − centre) per image, joined by path; with
    `vs_gradcam`, of (map − Grad-CAM) for deletion and insertion as well."""
    mine = pd.DataFrame({"path": list(columns["path"])})
    for metric in PAIRED:
        if f"{prefix}{metric}" in columns:
            mine[metric] = np.asarray(columns[f"{prefix}{metric}"], dtype=np.float64)
    joined = mine.merge(centre, on="path", suffixes=("", "_centre"))
    out = {"paired_images": len(joined)}
    for metric in PAIRED:
        if metric in joined and f"{metric}_centre" in joined:
            if metric == "pointing_hit_smooth":  # small objects: where the centre fails most
                small = joined["small_object"] > 0.5
                difference = (joined[metric] - joined[f"{metric}_centre"])[small]
                metric = "pointing_small_smooth"
            else:
                difference = joined[metric] - joined[f"{metric}_centre"]
            mean, low, high = bootstrap_ci(difference.to_numpy())
            out.update({f"d_{metric}": mean, f"d_{metric}_low": low, f"d_{metric}_high": high})
    for metric in PAIRED_GRADCAM if vs_gradcam else ():
        if metric in joined and f"{metric}_gradcam" in joined:
            difference = (joined[metric] - joined[f"{metric}_gradcam"]).to_numpy()
            mean, low, high = bootstrap_ci(difference[np.isfinite(difference)])
            name = f"d_gradcam_{metric}"
            out.update({name: mean, f"{name}_low": low, f"{name}_high": high})
    return out


def beats_centre(table: pd.DataFrame) -> pd.DataFrame:
    """Issue 12's test of a setting: better than the centre baseline on deletion (lower),
    insertion (higher) and small-object pointing (higher) at once, on the same images.
    `beats_centre`: by the paired means; `beats_centre_95`: every paired interval excludes 0."""
    needed = ["d_deletion_auc", "d_insertion_auc", "d_pointing_small_smooth"]
    if not all(c in table for c in needed):
        return table
    means = (
        (table["d_deletion_auc"] < 0)
        & (table["d_insertion_auc"] > 0)
        & (table["d_pointing_small_smooth"] > 0)
    )
    intervals = (
        (table["d_deletion_auc_high"] < 0)
        & (table["d_insertion_auc_low"] > 0)
        & (table["d_pointing_small_smooth_low"] > 0)
    )
    return table.assign(beats_centre=means, beats_centre_95=intervals)


def centre_table(run: tuple[dict, dict]) -> pd.DataFrame:
    """The centre baseline's per-image metrics from the `baselines` run (read_run's columns
    and attributes), by path, and Grad-CAM's deletion and insertion (columns `*_gradcam`)
    where that run has them."""
    columns, attrs = run
    table = pd.DataFrame({"path": list(columns["path"])})
    table["small_object"] = np.asarray(columns["small_object"], dtype=np.float64)
    for metric in PAIRED:
        table[f"{metric}_centre"] = np.asarray(columns[f"center_{metric}"], dtype=np.float64)
    own = map_label(attrs["config"]) == "gradcam"  # Grad-CAM as the run's method: unprefixed
    for metric in PAIRED_GRADCAM:
        name = metric if own else f"gradcam_{metric}"
        if name in columns:
            table[f"{metric}_gradcam"] = np.asarray(columns[name], dtype=np.float64)
    return table


def per_image_table(runs: dict[str, tuple[dict, dict]]) -> pd.DataFrame:
    """Every setting's per-image scalar columns side by side (`runs`: setting -> read_run's
    columns and attributes), one row per image (outer join on `path`), named
    `<setting>:<column>`: what a later setting needs to be paired with these runs after
    their mask files are gone (e.g. a GPU machine's)."""
    table = None
    for name, (columns, _) in runs.items():
        scalars = {
            f"{name}:{key}": values
            for key, values in columns.items()
            if key != "path" and np.ndim(values) == 1 and np.asarray(values).dtype.kind in "biuf"
        }
        part = pd.DataFrame({"path": list(columns["path"]), **scalars})
        table = part if table is None else table.merge(part, on="path", how="outer")
    return pd.DataFrame({"path": []}) if table is None else table


SHOWN = [
    "setting",
    "row",
    "images",
    "deletion_auc",
    "insertion_auc",
    "pointing_acc",
    "pointing_acc_small",
    "pointing_acc_small_smooth",
    "pointing_acc_raw",
    "pointing_acc_smooth",
    "pointing_energy",
    "loc_error",
    "loc_error_value",
    "loc_error_mean",
    "road_morf",  # with --road only (the columns of a summary come from pipeline.reports.schema)
    "road_lerf",
    "road_gap",
    "prob_masked_median",
    "s_per_image_map",
    "s_per_image_scoring",
    "d_deletion_auc",
    "d_insertion_auc",
    "d_pointing_small_smooth",
    "d_gradcam_deletion_auc",
    "d_gradcam_insertion_auc",
    "beats_centre",
    "beats_centre_95",
]


def markdown(table: pd.DataFrame, command: str) -> str:
    def cell(row, column):
        value = row.get(column, np.nan)
        if isinstance(value, (str, bool, np.bool_)):
            return str(value)
        if not np.isfinite(value):
            return "n/a"
        if column == "images":
            return str(int(value))
        if f"{column}_low" in row and np.isfinite(row[f"{column}_low"]):
            return f"{value:.3f} [{row[f'{column}_low']:.3f}, {row[f'{column}_high']:.3f}]"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"

    if table.empty:
        return f"<!-- command: {command} -->\nNo setting has a finished image yet.\n"
    shown = [c for c in SHOWN if c in table]
    lines = [f"<!-- command: {command} -->", "| " + " | ".join(shown) + " |"]
    lines.append("|" + "|".join("---" for _ in shown) + "|")
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(cell(row, c) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out-root", type=Path, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=100)
    parser.add_argument("--settings", default="baselines,seed,paper,preserve,extremal")
    parser.add_argument(
        "--run-args",
        default="--batch-size 10 --workers 1 --quiet",
        help="more `mpbatch run` options for every setting",
    )
    parser.add_argument(
        "--comparisons",
        default="center,random",
        help="rows the baselines setting scores beside Grad-CAM (center is needed for d_*)",
    )
    parser.add_argument(
        "--small-only",
        action="store_true",
        help="only the small-object images of [start, stop) (a cheap screen of a grid)",
    )
    parser.add_argument("--tag", default=None, help="results name (default: data-START-STOP)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true", help="tabulate finished runs")
    parser.add_argument(
        "--per-image",
        action="store_true",
        help="also write every setting's per-image columns as quality_<tag>_per_image.csv",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    data = subset_folder(args.data, args.out_root, args.start, args.stop, args.small_only)
    tag = args.tag or f"{args.out_root.name}-{args.start}-{args.stop}"
    outs = {name: args.out_root / f"{tag}-{name}".replace("/", "_") for name in names}
    if not args.table_only:
        for name, out in outs.items():
            status = run_setting(name, data, out, shlex.split(args.run_args), args.comparisons)
            if status != 0:
                print(f"{name}: mpbatch exited {status}; rerun to resume", file=sys.stderr)
            if STOPPED:
                break
    runs = {name: read_run(out) for name, out in outs.items() if run_files(out)}  # read once
    centre = centre_table(runs["baselines"]) if "baselines" in runs else None
    records = []
    for name, run in runs.items():
        records += setting_rows(name, run, centre)
    table = beats_centre(pd.DataFrame(records))
    if table.empty:
        print(f"no setting has a finished image under {args.out_root}", file=sys.stderr)
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / f"quality_{tag}.csv", index=False)
    command = "python -m benchmarks.quality " + shlex.join(argv or sys.argv[1:])
    (args.results / f"quality_{tag}.md").write_text(markdown(table, command), encoding="utf-8")
    if args.per_image:
        per_image = per_image_table(runs)
        per_image.to_csv(
            args.results / f"quality_{tag}_per_image.csv", index=False, float_format="%.6g"
        )
    return table


if __name__ == "__main__":
    main()
