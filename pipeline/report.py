"""Pandas tables from mask files: the per-image report, the failure list, metric summaries."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .errors import SettingsError
from .runfile import MASKS_FILE, SCORES_FILE, read_columns, read_failures

# Per-image columns in the order they appear in report.csv (those present in the file).
REPORT_COLUMNS = [
    "index",
    "path",
    "width",
    "height",
    "label",
    "label_name",
    "target",
    "target_name",
    "pred",
    "pred_name",
    "prob_clean",
    "prob_masked",
    "loss",
    "mask_area",
]


def _names(indices: np.ndarray, class_names: list[str]) -> list[str]:
    return [class_names[i] if 0 <= i < len(class_names) else "" for i in indices]


def per_image_table(columns: dict[str, np.ndarray], class_names: list[str]) -> pd.DataFrame:
    """One row per image: every one-dimensional column of a mask file, plus class names."""
    table = pd.DataFrame({k: v for k, v in columns.items() if np.ndim(v) == 1})
    for column in ("label", "target", "pred"):
        if column in table:
            table[f"{column}_name"] = _names(table[column].to_numpy(), class_names)
    first = [c for c in REPORT_COLUMNS if c in table]
    return table[first + [c for c in table.columns if c not in first]]


def write_report_csv(masks_file: str | Path, report_file: str | Path) -> pd.DataFrame:
    """Write report.csv (one row per masked image) from a mask file; returns the table."""
    columns, attrs = read_columns(masks_file)
    table = per_image_table(columns, list(attrs.get("class_names", [])))
    table.to_csv(report_file, index=False)
    return table


def write_failures_csv(masks_file: str | Path, failures_file: str | Path) -> pd.DataFrame:
    """Write failures.csv (index, path, reason of every image that could not be used)."""
    table = pd.DataFrame(read_failures(masks_file), columns=["index", "path", "reason"])
    table.to_csv(failures_file, index=False)
    return table


# --------------------------------------------------------------------------------------
# Metric summaries: bootstrap confidence intervals, per-method tables, run comparisons
# --------------------------------------------------------------------------------------

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
CURVES_PNG = "curves.png"
LOCALIZATION_CSV = "localization.csv"
LOCALIZATION_PNG = "localization.png"

METRICS = (
    "deletion_auc",
    "insertion_auc",
    "pointing_hit",
    "pointing_energy",
    "pointing_hit_raw",
    "pointing_hit_smooth",
    "loc_hit_value",
    "loc_hit_energy",
    "loc_hit_mean",
)
LOC_RULES = ("value", "energy", "mean")  # pipeline.localization.RULES, the default second
METHODS = ("method", "center", "random")  # the unprefixed map's key, then the baselines


def comparison_rows(columns: dict[str, np.ndarray]) -> tuple[str, ...]:
    """ "method" (the unprefixed metric columns) and every prefix P with a `P_deletion_auc`
    or `P_pointing_hit` column: the baselines first, then the comparison methods."""
    found = {
        name[: -len(suffix)]
        for name in columns
        for suffix in ("_deletion_auc", "_pointing_hit")
        if name.endswith(suffix) and len(name) > len(suffix)
    }
    ordered = [m for m in METHODS[1:] if m in found] + sorted(found - set(METHODS))
    return ("method", *ordered)


def row_label(config: dict) -> str:
    """How the unprefixed map is labelled in summaries: the run's name, else its method."""
    return str(config.get("name") or config.get("method") or "method")


# Summary column -> (per-image column, row selection); "boxes" = images with a finite hit.
_CI_COLUMNS = (
    ("deletion_auc", "deletion_auc"),
    ("insertion_auc", "insertion_auc"),
    ("pointing_acc", "pointing_hit"),
    ("pointing_acc_small", "pointing_hit"),
    ("pointing_energy", "pointing_energy"),
    ("loc_error", "loc_hit_energy"),  # 1 − hit: the paper's error, energy rule at α 0.95
)
SUMMARY_COLUMNS = (
    ["method", "images"]
    + [
        name
        for ci in ("deletion_auc", "insertion_auc", "pointing_acc")
        for name in (ci, f"{ci}_low", f"{ci}_high")
    ]
    + ["pointing_acc_macro"]
    + [
        name
        for ci in ("pointing_acc_small", "pointing_energy")
        for name in (ci, f"{ci}_low", f"{ci}_high")
    ]
    + ["pointing_images", "small_images"]
    + ["loc_error", "loc_error_low", "loc_error_high", "loc_error_value", "loc_error_mean"]
    + ["pointing_acc_raw", "pointing_acc_smooth"]
)

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


def _prefix(method: str) -> str:
    return "" if method == "method" else f"{method}_"


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
    label: str = "method",
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per method present, with bootstrap 95% intervals (`*_low`, `*_high`).

    "method" reads the unprefixed metric columns (deletion_auc, insertion_auc, pointing_hit,
    pointing_energy) and is labelled `label`; any other name B reads `B_deletion_auc` etc.
    (default: comparison_rows, every prefix present). A method is present when
    at least one of its metric columns is. `images` counts rows with a finite deletion AUC;
    pointing accuracy (micro and macro over `target` classes) and energy are over images
    with boxes (`pointing_images`), `pointing_acc_small` over the `small_object` rows among
    them (`small_images`). Lower deletion is better; higher insertion and pointing are better.
    Localization error (pipeline.localization: 1 − hit, over images with boxes) at the
    paper's α for the energy (with an interval), value and mean rules; pointing accuracy
    with the raw argmax and with TorchRay's σ 0.09 smoothing, whatever `smooth` scored.
    """
    rows = _rows(columns)
    small = _small_rows(columns, rows)
    classes = np.asarray(columns["target"]).reshape(rows) if "target" in columns else np.zeros(rows)
    records = []
    for method in methods or comparison_rows(columns):
        prefix = _prefix(method)
        if not any(f"{prefix}{m}" in columns for m in METRICS):
            continue
        values = {m: _float_column(columns, f"{prefix}{m}", rows) for m in METRICS}
        hits = values["pointing_hit"]
        boxes = np.isfinite(hits)
        record: dict[str, object] = {
            "method": label if method == "method" else method,
            "images": int(np.isfinite(values["deletion_auc"]).sum()),
        }
        for name, source in _CI_COLUMNS:
            selected = values[source][small] if name == "pointing_acc_small" else values[source]
            if name == "loc_error":
                selected = 1.0 - selected
            mean, low, high = bootstrap_ci(selected, n_resamples=n_resamples, seed=seed)
            record.update({name: mean, f"{name}_low": low, f"{name}_high": high})
        for rule in ("value", "mean"):
            record[f"loc_error_{rule}"] = _nan_mean(1.0 - values[f"loc_hit_{rule}"])
        record["pointing_acc_raw"] = _nan_mean(values["pointing_hit_raw"])
        record["pointing_acc_smooth"] = _nan_mean(values["pointing_hit_smooth"])
        record["pointing_acc_macro"] = macro_accuracy(hits, classes)
        record["pointing_images"] = int(boxes.sum())
        record["small_images"] = int((boxes & small).sum())
        records.append(record)
    return pd.DataFrame(records, columns=SUMMARY_COLUMNS)


# Markdown table: (header, summary column, interval?) in display order.
_MD_COLUMNS = (
    ("method", "method", False),
    ("images", "images", False),
    ("deletion AUC ↓", "deletion_auc", True),
    ("insertion AUC ↑", "insertion_auc", True),
    ("pointing acc ↑", "pointing_acc", True),
    ("pointing acc, class mean ↑", "pointing_acc_macro", False),
    ("pointing acc, small objects ↑", "pointing_acc_small", True),
    ("pointing energy ↑", "pointing_energy", True),
    ("images with boxes", "pointing_images", False),
    ("small objects", "small_images", False),
    ("loc error, energy 0.95 ↓", "loc_error", True),
    ("loc error, value 0.10 ↓", "loc_error_value", False),
    ("loc error, mean 0.5 ↓", "loc_error_mean", False),
    ("pointing, raw argmax ↑", "pointing_acc_raw", False),
    ("pointing, smoothed 0.09 ↑", "pointing_acc_smooth", False),
)


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
    # summaries written before a column existed lack it: leave it out
    columns = leading + tuple(c for c in _MD_COLUMNS if c[1] in table)
    text = {"run", "model", "preset", "method"}
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


def _markdown_header(
    title: str, attrs: dict, evaluated: int, skipped: int, n_resamples: int
) -> str:
    config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
    protocol = attrs.get("protocol") if isinstance(attrs.get("protocol"), dict) else None
    if protocol is None and isinstance(config.get("evaluation"), dict):
        protocol = config["evaluation"]  # the run's settings, when the attribute is missing
    weights = f" ({config['weights']} weights)" if config.get("weights") else ""
    lines = [
        f"# Saliency evaluation: {title}",
        "",
        f"- maps: {row_label(config)}"
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
        f"`{row_label(config)}` is the scored map; `center` and `random` are the baselines, "
        "other rows comparison methods scored on the same images.",
        "",
    ]
    return "\n".join(lines) + "\n"


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
    label: str = "method",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Row label -> (mean deletion curve, mean insertion curve), for rows with both curves
    (methods as in summary_table; the unprefixed map labelled `label`)."""
    out = {}
    for method in methods or comparison_rows(columns):
        prefix = _prefix(method)
        deletion = _mean_curve(columns, f"{prefix}deletion_curve")
        insertion = _mean_curve(columns, f"{prefix}insertion_curve")
        if deletion is not None and insertion is not None:
            out[label if method == "method" else method] = (deletion, insertion)
    return out


def write_summary(
    masks_file: str | Path,
    out_dir: str | Path,
    *,
    skipped: int = 0,
    name: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Write OUT/summary.csv, OUT/summary.md and OUT/curves.png; return the summary table.

    summary.md starts with the model, preset, protocol (the file's `protocol` attribute) and
    the counts evaluated / skipped (`skipped`: images the caller left out), then the table
    with 'mean [low, high]' cells. curves.png shows the mean deletion and insertion curves
    of the method and baselines. `name` titles both (default: the out folder's name).
    """
    from .visualize import curves_figure, localization_figure, save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, attrs = read_columns(masks_file)
    title = name if name is not None else out_dir.resolve().name
    config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
    label = row_label(config)
    table = summary_table(columns, label=label, n_resamples=n_resamples, seed=seed)
    table.to_csv(out_dir / SUMMARY_CSV, index=False)

    evaluated = int(attrs.get("rows", _rows(columns)))
    header = _markdown_header(title, attrs, evaluated, int(skipped), n_resamples)
    (out_dir / SUMMARY_MD).write_text(header + markdown_table(table), encoding="utf-8")

    figure_title = f"{title}: {config.get('model', '')} {config.get('preset', '')}".strip()
    curves = mean_curves(columns, label=label)
    save_figure(curves_figure(curves, title=figure_title), out_dir / CURVES_PNG)
    errors = localization_curves(columns, label=label)
    if len(errors):
        errors.to_csv(out_dir / LOCALIZATION_CSV, index=False)
        figure = localization_figure(errors, title=figure_title)
        save_figure(figure, out_dir / LOCALIZATION_PNG)
    return table


def localization_curves(
    columns: dict[str, np.ndarray], methods: tuple[str, ...] | None = None, *, label: str = "method"
) -> pd.DataFrame:
    """Localization error against α, per map and rule, from the `loc_curve_<rule>` columns:
    one row per (method, rule, alpha) with the error (1 − mean hit over the images with
    boxes) and that image count; choose α on held-out images, as the paper did."""
    from .localization import ALPHA_GRID

    records = []
    for method in methods or comparison_rows(columns):
        prefix = _prefix(method)
        for rule in LOC_RULES:
            name = f"{prefix}loc_curve_{rule}"
            if name not in columns or np.ndim(columns[name]) != 2:
                continue
            curves = np.asarray(columns[name], dtype=np.float64)
            with_boxes = np.isfinite(curves).all(axis=1)
            for k, alpha in enumerate(ALPHA_GRID[rule]):
                hits = curves[with_boxes, k]
                records.append(
                    {
                        "method": label if method == "method" else method,
                        "rule": rule,
                        "alpha": float(alpha),
                        "loc_error": round(float(1.0 - hits.mean()), 6) if len(hits) else np.nan,
                        "images": int(with_boxes.sum()),
                    }
                )
    return pd.DataFrame(records, columns=["method", "rule", "alpha", "loc_error", "images"])


def _run_config(folder: Path) -> dict:
    """The config attribute of folder/masks.h5 (or scores.h5, for maps scored by
    `evaluate`), without loading its datasets; {} if none."""
    for name in (MASKS_FILE, SCORES_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            with h5py.File(path, "r") as file:
                raw = file.attrs.get("config")
        except OSError:
            return {}
        if isinstance(raw, bytes):
            raw = raw.decode()
        try:
            config = json.loads(raw) if isinstance(raw, str) else {}
        except ValueError:
            return {}
        return config if isinstance(config, dict) else {}
    return {}


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
            raise FileNotFoundError(f"{csv}: no {SUMMARY_CSV} (run write_summary first)")
        folder = csv.resolve().parent
        config = _run_config(folder)
        table = pd.read_csv(csv)
        table.insert(0, "run", names[position] if names else folder.name)
        table.insert(1, "model", config.get("model", ""))
        table.insert(2, "preset", config.get("preset", ""))
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["run", "model", "preset", *SUMMARY_COLUMNS])
    return pd.concat(tables, ignore_index=True)
