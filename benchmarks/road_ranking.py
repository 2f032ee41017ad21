"""ROAD's ranking of maps beside deletion's and insertion's (issue 24): reads the runs of
benchmarks/road100.sh and writes benchmarks/results/road100_ranking_<runs>.csv and .md.

    .venv/bin/python -m benchmarks.road_ranking /work/runs/road100           (every run)
    .venv/bin/python -m benchmarks.road_ranking RUN_FOLDER [RUN_FOLDER ...]  (these runs)

One row per map: the run's own map (labelled by its folder: seed, paper, gradcam) and the
centre and random baselines of the Grad-CAM run; deletion and insertion AUC and ROAD's
MoRF area, LeRF area and gap, means with 95% bootstrap intervals over the images that every
run has finished (so all rows describe the same images), and each metric's rank (1 = best).
Kendall's tau between the rankings says whether ROAD orders the maps as deletion and
insertion do.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from pipeline.reports.tables import summary_table  # noqa: E402
from pipeline.store.reader import RunFile  # noqa: E402

# metric -> better direction ("lower" ranks ascending)
RANKED = {
    "deletion_auc": "lower",
    "insertion_auc": "higher",
    "road_morf": "lower",
    "road_lerf": "higher",
    "road_gap": "higher",
}


def run_folders(arguments: list[str]) -> list[Path]:
    """The run folders named, or those inside one folder named (default /work/runs/road100)."""
    paths = [Path(a) for a in arguments] or [Path("/work/runs/road100")]
    if len(paths) == 1 and not (paths[0] / "masks.h5").is_file():
        return sorted(p for p in paths[0].iterdir() if (p / "masks.h5").is_file())
    return paths


def rows(folders: list[Path]) -> pd.DataFrame:
    """One summary row per map, every run restricted to the images all runs finished."""
    found = {}
    for folder in folders:
        try:
            found[folder.name] = RunFile.open(folder)
        except OSError as error:  # a run still writing holds its file
            print(f"road_ranking: {folder} left out: {error}", file=sys.stderr)
    common = set.intersection(*(set(run.columns["path"]) for run in found.values()))
    tables = []
    for name, run in found.items():
        keep = np.isin(run.columns["path"], sorted(common))
        columns = {k: v[keep] for k, v in run.columns.items()}
        table = summary_table(columns, label=name)
        table.insert(0, "run", name)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def kendall_tau(a: list, b: list) -> float:
    """Kendall's tau between two rankings of the same items (no ties)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    agree = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    return (2 * agree - len(pairs)) / len(pairs) if pairs else float("nan")


def main() -> None:
    folders = run_folders(sys.argv[1:])
    table = rows(folders)
    for metric, better in RANKED.items():
        table[f"rank_{metric}"] = table[metric].rank(ascending=better == "lower").astype(int)
    ranks = {m: list(table[f"rank_{m}"]) for m in RANKED}
    taus = [(a, b, kendall_tau(ranks[a], ranks[b])) for a, b in itertools.combinations(RANKED, 2)]
    name = "road100_ranking" + "".join(f"_{f.name}" for f in folders)
    out = ROOT / "benchmarks" / "results" / f"{name}.csv"
    keep = ["run", "method", "images"]
    keep += [c for m in RANKED for c in (m, f"{m}_low", f"{m}_high")]
    keep += [f"rank_{m}" for m in RANKED]
    table[keep].to_csv(out, index=False)
    lines = [
        "<!-- .venv/bin/python -m benchmarks.road_ranking "
        + " ".join(str(f) for f in folders)
        + " -->",
        "| map | images | deletion ↓ | insertion ↑ | ROAD MoRF ↓ | ROAD LeRF ↑ | ROAD gap ↑ "
        "| ranks (del, ins, MoRF, LeRF, gap) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for _, row in table.iterrows():
        cells = [f"{row[m]:.3f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}]" for m in RANKED]
        order = ", ".join(str(row[f"rank_{m}"]) for m in RANKED)
        lines.append(
            f"| {row['method']} | {row['images']} | " + " | ".join(cells) + f" | {order} |"
        )
    lines += ["", "Kendall's tau between the rankings of the maps:", ""]
    lines += [f"- {a} vs {b}: {tau:.2f}" for a, b, tau in taus]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
