"""The one column schema of mpbatch's files and reports.

A mask file holds one row per image. Its columns are of three kinds:

* the image's own: ``index``, ``path``, sizes, classes, its file's stamp, ``prob_clean``,
  the boxes' coverage (IMAGE_COLUMNS);
* the method's: what its `explain` stored (``masks``, ``prob_masked``, ...), declared by each
  registered method in `Method.columns`;
* per scored map, the metrics of MAP_METRICS and the curves of MAP_CURVES. The run's own map
  is unprefixed (``deletion_auc``); every comparison map (centre, random, Grad-CAM, any
  registered comparison) is prefixed with its name (``gradcam_deletion_auc``).

Whatever reads or shows columns (report.csv, the summary, `report`'s side-by-side view, the
gallery, benchmarks/quality.py) asks this module for their order, label and which direction
is better, so a new metric or a new comparison is declared once. The module imports nothing
of mpbatch: the registries pass their names in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

METHOD_ROW = "method"  # the key of the unprefixed map in summaries and tables


@dataclass(frozen=True)
class Column:
    """A per-image column: its stored name, a readable label, and which way is better
    ("lower", "higher" or None); `key` marks the few shown for every map at a glance."""

    name: str
    label: str
    better: str | None = None
    key: bool = False


# `mpbatch sanity`'s measures of how alike a randomised model's map is to the trained one's
# (pipeline.metrics.similarity); lower is better: the map follows the weights that made the decision
SANITY_MEASURES = (
    Column("spearman", "Spearman rank correlation", "lower"),
    Column("ssim", "SSIM", "lower"),
    Column("hog", "HOG Pearson r", "lower"),
)
# repeatability: the maps of one image under K seeds, the mean Pearson r over pairs
REPEATABILITY = Column("pearson_r", "mean pairwise Pearson r over seeds", "higher")

# The metrics every scored map gets (pipeline.metrics.scoring), in report order.
MAP_METRICS = (
    Column("deletion_auc", "deletion AUC", "lower", key=True),
    Column("insertion_auc", "insertion AUC", "higher", key=True),
    Column("pointing_hit", "pointing hit", "higher", key=True),
    Column("pointing_energy", "pointing energy", "higher"),
    Column("pointing_hit_raw", "pointing hit, raw argmax", "higher"),
    Column("pointing_hit_smooth", "pointing hit, smoothed 0.09", "higher"),
    Column("loc_hit", "localization hit", "higher", key=True),
    Column("loc_hit_energy", "localization hit, energy 0.95", "higher"),
    Column("loc_hit_value", "localization hit, value 0.10", "higher"),
    Column("loc_hit_mean", "localization hit, mean 0.5", "higher"),
    # with --road only (pipeline.metrics.road): areas are the mean probability over the fractions
    Column("road_morf_area", "ROAD MoRF area", "lower"),
    Column("road_lerf_area", "ROAD LeRF area", "higher"),
    Column("road_gap", "ROAD gap (LeRF − MoRF)", "higher"),
)
# Per-map curves (N×K columns): kept in the mask file, summarised, never in report.csv.
MAP_CURVES = (
    "deletion_curve",
    "insertion_curve",
    "loc_curve_energy",
    "loc_curve_value",
    "loc_curve_mean",
    "road_morf_curve",
    "road_lerf_curve",
)
LOC_RULES = ("value", "energy", "mean")  # pipeline.metrics.localization.RULES, the default second

IMAGE_COLUMNS = (
    Column("index", "position in the listing"),
    Column("path", "path"),
    Column("width", "width"),
    Column("height", "height"),
    Column("label", "label"),
    Column("target", "explained class"),
    Column("pred", "predicted class"),
    Column("prob_clean", "p(class), clean image"),
    Column("box_coverage", "box coverage"),
    Column("small_object", "small object (boxes < 25%)"),
    Column("file_size", "file size"),
    Column("file_mtime_ns", "file mtime (ns)"),
)
# Columns that identify an image rather than score it.
ID_COLUMNS = frozenset(
    {"index", "row", "path", "width", "height", "label", "target", "pred"}
    | {"file_size", "file_mtime_ns"}
)
# report.csv's leading columns, in order (those present); the rest follow in file order.
REPORT_ORDER = (
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
)
CLASS_COLUMNS = ("label", "target", "pred")  # each gets a `<name>_name` column in reports

_BY_NAME = {c.name: c for c in (*MAP_METRICS, *IMAGE_COLUMNS)}


def prefix(map_name: str) -> str:
    """The column prefix of a scored map: "" for the run's own, "NAME_" for a comparison."""
    return "" if map_name == METHOD_ROW else f"{map_name}_"


def split(column: str, maps: Iterable[str] = ()) -> tuple[str, str]:
    """(map, metric) of a per-map column name; (METHOD_ROW, column) for an unprefixed one.

    `maps`: the comparison names to recognise (a prefix is only split off when it is one).
    """
    for name in sorted(maps, key=len, reverse=True):
        if column.startswith(f"{name}_") and len(column) > len(name) + 1:
            return name, column[len(name) + 1 :]
    return METHOD_ROW, column


def describe(column: str, maps: Iterable[str] = (), extra: Sequence[Column] = ()) -> Column:
    """The schema entry of any column, prefixed or not: its label and direction.

    extra: columns declared elsewhere (a method's). Unknown columns get their own name as
    label and no direction.
    """
    owner, metric = split(column, maps)
    known = {**_BY_NAME, **{c.name: c for c in extra}}
    base = known.get(metric, Column(metric, metric.replace("_", " ")))
    label = base.label if owner == METHOD_ROW else f"{owner}: {base.label}"
    return Column(column, label, base.better, base.key)


def scored_maps(columns: Iterable[str], comparisons: Sequence[str]) -> tuple[str, ...]:
    """METHOD_ROW, then every map P with a `P_deletion_auc` or `P_pointing_hit` column:
    the registered comparisons in `comparisons`' order, then unknown prefixes sorted."""
    found = {
        name[: -len(suffix)]
        for name in columns
        for suffix in ("_deletion_auc", "_pointing_hit")
        if name.endswith(suffix) and len(name) > len(suffix)
    }
    ordered = [m for m in comparisons if m in found] + sorted(found - set(comparisons))
    return (METHOD_ROW, *ordered)


# --------------------------------------------------------------------------------------
# The summary: one row per scored map
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryColumn:
    """A column of summary.csv and of the markdown table, for one scored map.

    statistic: "mean" of the per-image column `source` over its finite values (of the
    small-object rows when `small`; 1 − value when `complement`: an error from a hit),
    with a bootstrap interval when `interval`; "class_mean": the mean over target classes
    of per-class means; "count": finite `source` values (of small-object rows when
    `small`); "name": the map's label.
    """

    name: str
    label: str
    source: str | None = None
    better: str | None = None
    interval: bool = False
    statistic: str = "mean"
    small: bool = False
    complement: bool = False
    optional: bool = False  # a metric scored on request: a column only when some map has it

    @property
    def header(self) -> str:
        return self.label + {"lower": " ↓", "higher": " ↑"}.get(self.better or "", "")


def _count(name: str, label: str, source: str, small: bool = False) -> SummaryColumn:
    return SummaryColumn(name, label, source, statistic="count", small=small)


def _error(name: str, label: str, source: str, interval: bool = False) -> SummaryColumn:
    return SummaryColumn(name, label, source, "lower", interval, complement=True)


SUMMARY = (
    SummaryColumn(METHOD_ROW, "method", statistic="name"),
    _count("images", "images", "deletion_auc"),
    SummaryColumn("deletion_auc", "deletion AUC", "deletion_auc", "lower", True),
    SummaryColumn("insertion_auc", "insertion AUC", "insertion_auc", "higher", True),
    SummaryColumn("pointing_acc", "pointing acc", "pointing_hit", "higher", True),
    SummaryColumn(
        "pointing_acc_macro",
        "pointing acc, class mean",
        "pointing_hit",
        "higher",
        False,
        statistic="class_mean",
    ),
    SummaryColumn(
        "pointing_acc_small",
        "pointing acc, small objects",
        "pointing_hit",
        "higher",
        True,
        small=True,
    ),
    SummaryColumn("pointing_energy", "pointing energy", "pointing_energy", "higher", True),
    _count("pointing_images", "images with boxes", "pointing_hit"),
    _count("small_images", "small objects", "pointing_hit", small=True),
    # the paper's localization error (1 − hit), energy rule at α 0.95, then the others
    _error("loc_error", "loc error, energy 0.95", "loc_hit_energy", interval=True),
    _error("loc_error_value", "loc error, value 0.10", "loc_hit_value"),
    _error("loc_error_mean", "loc error, mean 0.5", "loc_hit_mean"),
    SummaryColumn("pointing_acc_raw", "pointing, raw argmax", "pointing_hit_raw", "higher"),
    SummaryColumn(
        "pointing_acc_smooth", "pointing, smoothed 0.09", "pointing_hit_smooth", "higher"
    ),
    SummaryColumn("road_morf", "ROAD MoRF", "road_morf_area", "lower", True, optional=True),
    SummaryColumn("road_lerf", "ROAD LeRF", "road_lerf_area", "higher", True, optional=True),
    SummaryColumn("road_gap", "ROAD gap", "road_gap", "higher", True, optional=True),
)


def summary_columns(columns: Iterable[str] = ()) -> list[SummaryColumn]:
    """The SUMMARY entries of a summary over a file with these per-image `columns`: every
    one that is not optional, and the optional ones some map was scored with."""
    stored = list(columns)
    return [
        c for c in SUMMARY if not c.optional or any(name.endswith(str(c.source)) for name in stored)
    ]


def summary_csv_columns(columns: Iterable[str] = ()) -> list[str]:
    """summary.csv's header: each of summary_columns(columns), its `_low` and `_high` after
    it when it has an interval (in the order of the files mpbatch has always written)."""
    names: list[str] = []
    for column in summary_columns(columns):
        names.append(column.name)
        if column.interval:
            names += [f"{column.name}_low", f"{column.name}_high"]
    return names


def markdown_columns(present: Iterable[str]) -> list[SummaryColumn]:
    """The SUMMARY columns of a summary table (a summary written before a column existed
    lacks it), in the markdown table's order."""
    present = set(present)
    return [c for c in SUMMARY if c.name in present]
