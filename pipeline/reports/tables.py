"""Pandas tables of a run: the per-image report, metric summaries with bootstrap intervals,
mean curves, localization error against α, and runs side by side.

Pure functions of a run's columns (pipeline.store.reader): nothing here writes a file
(pipeline.reports.writer does). Which columns exist, their order, labels and directions come from
pipeline.reports.schema; which maps were scored, from the comparisons registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SettingsError
from ..metrics.comparisons import comparison_names
from ..metrics.localization import ALPHA_GRID
from ..store.reader import RunFileError, read_config
from .schema import (
    CLASS_COLUMNS,
    LOC_RULES,
    MAP_METRICS,
    METHOD_ROW,
    REPORT_ORDER,
    prefix,
    scored_maps,
    summary_columns,
    summary_csv_columns,
)

SUMMARY_CSV = "summary.csv"
METRICS = tuple(c.name for c in MAP_METRICS if c.name != "loc_hit")
SUMMARY_COLUMNS = summary_csv_columns()


def _names(indices: np.ndarray, class_names: list[str]) -> list[str]:
    return [class_names[i] if 0 <= i < len(class_names) else "" for i in indices]


def per_image_table(columns: dict[str, np.ndarray], class_names: list[str]) -> pd.DataFrame:
    """One row per image: every one-dimensional column of a mask file, plus class names."""
    table = pd.DataFrame({k: v for k, v in columns.items() if np.ndim(v) == 1})
    for column in CLASS_COLUMNS:
        if column in table:
            table[f"{column}_name"] = _names(table[column].to_numpy(), class_names)
    first = [c for c in REPORT_ORDER if c in table]
    return table[first + [c for c in table.columns if c not in first]]


# --------------------------------------------------------------------------------------
# Metric summaries: bootstrap confidence intervals, per-method tables, run comparisons
# --------------------------------------------------------------------------------------


def comparison_rows(columns: dict[str, np.ndarray]) -> tuple[str, ...]:
    """ "method" (the unprefixed metric columns), then every scored comparison map present."""
    return scored_maps(columns, comparison_names())


# Bootstrap resample indices are drawn in blocks of about this many entries (memory bound).
_BOOTSTRAP_BLOCK = 4_000_000


def bootstrap_ci(
    values: np.ndarray, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over the non-NaN values; NaNs if none.

    Non-finite values are dropped first. The interval holds the central `confidence` of the
    means of `n_resamples` resamples (with replacement, same size); one value gives a
    zero-width interval. The same values and seed always give the same interval.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    if n == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK // n)
    means = np.empty(int(n_resamples), dtype=np.float64)
    for lo in range(0, int(n_resamples), block):
        hi = min(lo + block, int(n_resamples))
        means[lo:hi] = x[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, float(low), float(high)


def macro_accuracy(hits: np.ndarray, classes: np.ndarray) -> float:
    """Mean over classes of per-class mean hit (NaN hits ignored): TorchRay's 'class-averaged'
    pointing accuracy. NaN when no image has a finite hit."""
    hits = np.asarray(hits, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    if hits.shape != classes.shape:
        raise ValueError(f"{hits.size} hits for {classes.size} classes")
    keep = np.isfinite(hits)
    if not keep.any():
        return float("nan")
    hits, classes = hits[keep], classes[keep]
    return float(np.mean([hits[classes == c].mean() for c in np.unique(classes)]))


def _float_column(columns: dict[str, np.ndarray], name: str, rows: int) -> np.ndarray:
    """A 1-D float64 column, or all-NaN when absent."""
    if name not in columns:
        return np.full(rows, np.nan)
    return np.asarray(columns[name], dtype=np.float64).reshape(rows)


def _rows(columns: dict[str, np.ndarray]) -> int:
    lengths = {len(v) for v in columns.values() if np.ndim(v) >= 1}
    if len(lengths) > 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _small_rows(columns: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """Boolean small-object flag per row (NaN / missing = not small)."""
    small = _float_column(columns, "small_object", rows)
    return np.nan_to_num(small, nan=0.0) > 0.5


def _nan_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def summary_table(
    columns: dict[str, np.ndarray],
    methods: tuple[str, ...] | None = None,
    *,
    label: str = METHOD_ROW,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per scored map present, one column per pipeline.reports.schema.SUMMARY entry, with
    bootstrap 95% intervals (`*_low`, `*_high`) where the schema asks for one.

    "method" reads the unprefixed metric columns and is labelled `label`; a comparison B
    reads `B_deletion_auc` etc. (default: comparison_rows, every map present). A map is
    present when at least one of its metric columns is. Means are over the finite values:
    pointing and localization over images with boxes, the `small` columns over the
    `small_object` rows among them; `pointing_acc_macro` averages over `target` classes.
    """
    rows = _rows(columns)
    schema = summary_columns(columns)
    small = _small_rows(columns, rows)
    classes = np.asarray(columns["target"]).reshape(rows) if "target" in columns else np.zeros(rows)
    records = []
    for method in methods or comparison_rows(columns):
        if not any(f"{prefix(method)}{m}" in columns for m in METRICS):
            continue
        record: dict[str, object] = {}
        for column in schema:
            if column.statistic == "name":
                record[column.name] = label if method == METHOD_ROW else method
                continue
            values = _float_column(columns, f"{prefix(method)}{column.source}", rows)
            record.update(_statistic(column, values, small, classes, n_resamples, seed))
        records.append(record)
    return pd.DataFrame(records, columns=summary_csv_columns(columns))


def _statistic(column, values, small, classes, n_resamples, seed) -> dict[str, object]:
    """One SUMMARY column's value(s) for one map: see pipeline.reports.schema.SummaryColumn."""
    if column.statistic == "count":
        finite = np.isfinite(values) & (small if column.small else True)
        return {column.name: int(finite.sum())}
    if column.statistic == "class_mean":
        return {column.name: macro_accuracy(values, classes)}
    selected = values[small] if column.small else values
    if column.complement:
        selected = 1.0 - selected
    if not column.interval:
        return {column.name: _nan_mean(selected)}
    mean, low, high = bootstrap_ci(selected, n_resamples=n_resamples, seed=seed)
    return {column.name: mean, f"{column.name}_low": low, f"{column.name}_high": high}


def _mean_curve(columns: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """Mean over the rows whose curve is entirely finite; None when there are none."""
    if name not in columns or np.ndim(columns[name]) != 2:
        return None
    curves = np.asarray(columns[name], dtype=np.float64)
    curves = curves[np.isfinite(curves).all(axis=1)]
    return curves.mean(axis=0) if len(curves) else None


def mean_curves(
    columns: dict[str, np.ndarray],
    methods: tuple[str, ...] | None = None,
    *,
    label: str = METHOD_ROW,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Row label -> (mean deletion curve, mean insertion curve), for rows with both curves
    (methods as in summary_table; the unprefixed map labelled `label`)."""
    out = {}
    for method in methods or comparison_rows(columns):
        deletion = _mean_curve(columns, f"{prefix(method)}deletion_curve")
        insertion = _mean_curve(columns, f"{prefix(method)}insertion_curve")
        if deletion is not None and insertion is not None:
            out[label if method == METHOD_ROW else method] = (deletion, insertion)
    return out


def localization_curves(
    columns: dict[str, np.ndarray],
    methods: tuple[str, ...] | None = None,
    *,
    label: str = METHOD_ROW,
) -> pd.DataFrame:
    """Localization error against α, per map and rule, from the `loc_curve_<rule>` columns:
    one row per (method, rule, alpha) with the error (1 − mean hit over the images with
    boxes) and that image count; choose α on held-out images, as the paper did."""
    records = []
    for method in methods or comparison_rows(columns):
        for rule in LOC_RULES:
            name = f"{prefix(method)}loc_curve_{rule}"
            if name not in columns or np.ndim(columns[name]) != 2:
                continue
            curves = np.asarray(columns[name], dtype=np.float64)
            with_boxes = np.isfinite(curves).all(axis=1)
            for k, alpha in enumerate(ALPHA_GRID[rule]):
                hits = curves[with_boxes, k]
                records.append(
                    {
                        "method": label if method == METHOD_ROW else method,
                        "rule": rule,
                        "alpha": float(alpha),
                        "loc_error": round(float(1.0 - hits.mean()), 6) if len(hits) else np.nan,
                        "images": int(with_boxes.sum()),
                    }
                )
    return pd.DataFrame(records, columns=["method", "rule", "alpha", "loc_error", "images"])


def compare_runs(paths: list[Path], names: list[str] | None = None) -> pd.DataFrame:
    """Side-by-side comparison of runs: one row per (run, method) from each summary.csv.

    A path is a run folder or its summary.csv. Adds `run` (`names[i]`, default the folder
    name) and the run's `model` / `preset` from its masks.h5 (or scores.h5) config.
    """
    if names and len(names) != len(paths):
        raise SettingsError(f"{len(names)} names for {len(paths)} runs; give one --name per run")
    tables = []
    for position, path in enumerate(paths):
        path = Path(path)
        csv = path / SUMMARY_CSV if path.is_dir() else path
        if not csv.is_file():
            raise RunFileError(
                f"{csv}: no such file: the run is not finished (resume it with `mpbatch run`), "
                f"ran without metrics, or its shards are not merged (`mpbatch merge`)"
            )
        folder = csv.resolve().parent
        config = read_config(folder)
        table = pd.read_csv(csv)
        table.insert(0, "run", names[position] if names else folder.name)
        table.insert(1, "model", config.get("model", ""))
        table.insert(2, "preset", config.get("preset", ""))
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["run", "model", "preset", *SUMMARY_COLUMNS])
    return pd.concat(tables, ignore_index=True)
