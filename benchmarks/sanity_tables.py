"""The sanity check's and repeatability's figures (issue 24): reads the checks of
benchmarks/sanity20.sh and writes benchmarks/results/sanity20_stages.csv,
sanity20_repeatability.csv and sanity20.md, and copies each check's plot to
benchmarks/results/sanity20_<name>.png.

    .venv/bin/python -m benchmarks.sanity_tables /work/runs/sanity20

Per check (a folder NAME holding sanity_summary.csv, repeatability_summary.csv and its
runs): the per-stage similarities with their 95% bootstrap intervals, the repeatability
summary, and the seconds per image of each part from the runs' own timings (the sum over
every invocation of a resumed run, `timings_total`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_resume import cpu_name  # noqa: E402
from pipeline.commands.sanity import sanity_summary  # noqa: E402
from pipeline.reports.pictures import sanity_figure  # noqa: E402
from pipeline.reports.writer import save_figure  # noqa: E402
from pipeline.store.reader import read_attrs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def seconds_per_image(folders: list[Path]) -> tuple[float, int]:
    """(seconds per image summed over the runs, images of the first run)."""
    total, images = 0.0, None
    for folder in folders:
        timings = read_attrs(folder / "masks.h5").get("timings_total", {})
        total += float(timings.get("total", 0.0))
        images = int(timings.get("images", 0)) if images is None else images
    return (total / images if images else float("nan")), images or 0


def main(runs: Path) -> None:
    checks = sorted(p for p in runs.iterdir() if (p / "sanity_summary.csv").is_file())
    stages, repeats, costs = [], [], []
    for check in checks:
        # the summary made again from the per-image table (today's columns)
        summary = sanity_summary(pd.read_csv(check / "sanity.csv"))
        stages.append(summary.assign(check=check.name)[["check", *summary.columns]])
        if (check / "repeatability_summary.csv").is_file():
            table = pd.read_csv(check / "repeatability_summary.csv")
            table.insert(0, "check", check.name)
            repeats.append(table)
        stage_runs = [check / "original", *sorted((check / "stages").iterdir())]
        repeat_runs = sorted((check / "repeats").iterdir())
        stage_s, images = seconds_per_image(stage_runs)
        repeat_s, _ = seconds_per_image(repeat_runs)
        costs.append(
            {
                "check": check.name,
                "images": images,
                "stages": len(stage_runs) - 1,
                "stage_runs_s_per_image": stage_s,
                "repeats": len(repeat_runs),
                "repeat_runs_s_per_image": repeat_s,
                "cpu": cpu_name(),
            }
        )
        # the plot drawn again from the stored summary by today's sanity_figure
        title = f"{check.name}, efficientnet_lite0, sample's first 20 images"
        save_figure(sanity_figure(summary, title), RESULTS / f"sanity20_{check.name}.png")
    stages_table, repeat_table = pd.concat(stages), pd.concat(repeats)
    cost_table = pd.DataFrame(costs)
    stages_table.to_csv(RESULTS / "sanity20_stages.csv", index=False)
    repeat_table.to_csv(RESULTS / "sanity20_repeatability.csv", index=False)
    cost_table.to_csv(RESULTS / "sanity20_cost.csv", index=False)
    (RESULTS / "sanity20.md").write_text(markdown(stages_table, repeat_table, cost_table))
    print((RESULTS / "sanity20.md").read_text())


def _interval(row, name: str) -> str:
    return f"{row[name]:.3f} [{row[name + '_low']:.3f}, {row[name + '_high']:.3f}]"


def markdown(stages: pd.DataFrame, repeats: pd.DataFrame, costs: pd.DataFrame) -> str:
    lines = ["# Sanity check and repeatability, sample's first 20 images (lite0)", ""]
    lines += ["| check | stage | randomised down to | Spearman (n) | SSIM | HOG r |"]
    lines += ["|---|--:|---|---|---|---|"]
    for _, row in stages.iterrows():
        lines.append(
            f"| {row['check']} | {row['stage']} | {row['layer']} | {_interval(row, 'spearman')} "
            f"({row['spearman_count']}) | {_interval(row, 'ssim')} | {_interval(row, 'hog')} |"
        )
    lines += ["", "| check | quantity | mean [95% CI] | mean per-image SD | max per-image SD "]
    lines[-1] += "| SD of the mean over seeds |"
    lines += ["|---|---|---|--:|--:|--:|"]
    for _, row in repeats.iterrows():
        spread = [row.get(k) for k in ("mean_image_sd", "max_image_sd", "sd_of_dataset_mean")]
        cells = " | ".join("" if pd.isna(v) else f"{v:.4f}" for v in spread)
        lines.append(
            f"| {row['check']} | {row['quantity']} | {row['mean']:.3f} [{row['low']:.3f}, "
            f"{row['high']:.3f}] | {cells} |"
        )
    lines += ["", "| check | images | stages | s/image, original + stages | repeats | "]
    lines[-1] += "s/image, repeats (scored) | CPU |"
    lines += ["|---|--:|--:|--:|--:|--:|---|"]
    for _, row in costs.iterrows():
        lines.append(
            f"| {row['check']} | {row['images']} | {row['stages']} | "
            f"{row['stage_runs_s_per_image']:.2f} | {row['repeats']} | "
            f"{row['repeat_runs_s_per_image']:.2f} | {row['cpu']} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/runs/sanity20"))
