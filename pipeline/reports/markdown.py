"""summary.md's text: the run's settings, protocol and timings above a table of the
summary with 'mean [low, high]' cells (also `mpbatch report`'s side-by-side view).

Pure functions of a summary table (pipeline.reports.tables) and a run's attributes; headers, order
and directions come from pipeline.reports.schema.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..store.reader import MASKS_FILE, map_label
from .schema import METHOD_ROW, markdown_columns


def _number(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value).replace("|", "\\|")


def _cell(row: pd.Series, column: str, interval: bool) -> str:
    value = row[column]
    if not interval or isinstance(value, str) or not np.isfinite(value):
        return _number(value)
    low, high = _number(row[f"{column}_low"]), _number(row[f"{column}_high"])
    return f"{_number(row[column])} [{low}, {high}]"


def markdown_table(table: pd.DataFrame) -> str:
    """The summary table as a GitHub markdown table, cells 'mean [low, high]'.

    Leading `run`, `model` and `preset` columns (compare_runs) are shown when present.
    """
    leading = tuple((c, c, False) for c in ("run", "model", "preset") if c in table)
    schema = tuple((c.header, c.name, c.interval) for c in markdown_columns(table.columns))
    columns = leading + schema
    text = {"run", "model", "preset", METHOD_ROW}
    lines = [
        "| " + " | ".join(h for h, _, _ in columns) + " |",
        "|" + "|".join("---" if c in text else "---:" for _, c, _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        cells = [_cell(row, column, interval) for _, column, interval in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _describe_value(value: object) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_describe_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe_value(v) for v in value)
    return str(value)


def _describe_timings(timings: dict) -> str:
    """One line: seconds per phase with its share of the total, then images/s."""
    total = float(timings.get("total", 0.0))
    parts = []
    for key, label in (
        ("load", "waiting for data"),
        ("optimize", "optimising"),
        ("evaluate", "evaluating"),
        ("write", "writing"),
    ):
        if key in timings:
            seconds = float(timings[key])
            share = f" ({100 * seconds / total:.1f}%)" if total > 0 else ""
            parts.append(f"{label} {seconds:.1f} s{share}")
    if total > 0:
        parts.append(f"total {total:.1f} s")
    if "images_per_s" in timings:
        parts.append(f"{float(timings['images_per_s']):.3g} images/s")
    return "- " + ", ".join(parts)


def markdown_header(title: str, attrs: dict, evaluated: int, skipped: int, n_resamples: int) -> str:
    """summary.md's text above the table: the maps, model, preset, counts, the protocol
    (`attrs["protocol"]`, else the run's recorded evaluation) and the last timings."""
    config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
    protocol = attrs.get("protocol") if isinstance(attrs.get("protocol"), dict) else None
    if protocol is None and isinstance(config.get("evaluation"), dict):
        protocol = config["evaluation"]  # the run's settings, when the attribute is missing
    weights = f" ({config['weights']} weights)" if config.get("weights") else ""
    lines = [
        f"# Saliency evaluation: {title}",
        "",
        f"- maps: {map_label(config)}"
        + (f" (method {config['method']})" if config.get("method") else ""),
        f"- model: {config.get('model', 'unknown')}{weights}",
        f"- preset: {config.get('preset', 'unknown')}",
    ]
    for key in ("size", "target", "source"):
        if key in config:
            lines.append(f"- {key}: {config[key]}")
    scored_by = attrs.get("evaluated") if isinstance(attrs.get("evaluated"), dict) else None
    if scored_by:  # `mpbatch evaluate` rescored this run
        scored_weights = f" ({scored_by['weights']} weights)" if scored_by.get("weights") else ""
        lines.append(
            f"- scored by `mpbatch evaluate` with model {scored_by.get('model')}{scored_weights}"
            f" at size {scored_by.get('size')}"
        )
    lines += [
        f"- images evaluated: {evaluated}",
        f"- images skipped: {skipped}",
    ]
    failures = int(attrs.get("failures", 0) or 0)
    if failures:
        lines.append(f"- unreadable images recorded in {MASKS_FILE}: {failures}")
    lines += ["", "## Protocol", ""]
    if protocol:
        lines += [f"- {key}: {_describe_value(value)}" for key, value in protocol.items()]
    else:
        lines.append(f"- not recorded in {MASKS_FILE}")
    timings = attrs.get("timings")
    if isinstance(timings, dict) and timings:
        lines += ["", "## Time (the run's last invocation)", "", _describe_timings(timings)]
    lines += [
        "",
        "## Results",
        "",
        f"Means with percentile-bootstrap 95% intervals ({n_resamples} resamples). "
        f"`{map_label(config)}` is the scored map; `center` and `random` are the baselines, "
        "other rows comparison methods scored on the same images.",
        "",
    ]
    return "\n".join(lines) + "\n"
