"""The HTML gallery of a run (`mpbatch show --html`): the page's data and its text.

Pure functions: `gallery_data` turns a per-image table and the thumbnails' relative paths
into the JSON the page reads; `render_page` fills the template kept as package data
(pipeline/reports/templates/gallery.html, read with importlib.resources).
pipeline.reports.writer writes the thumbnails and the page.

Per image the page shows the image, the perturbed image and a thumbnail of every scored
map (the run's and the comparisons': the baselines behind a switch), each with its key
metrics (pipeline.reports.schema: deletion, insertion, pointing, localization) labelled with the
better direction. Other columns sit behind a column chooser. It sorts by any metric and by
the difference between the run's map and a comparison's ("where does the method beat
Grad-CAM?"), filters (pointing misses, worst deletion, localization misses, small objects)
and keeps its view in ``location.hash``, e.g. ``#sort=deletion_auc&dir=desc&filter=misses``.
Everything is inline, so the page works opened from disk.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any

import numpy as np
import pandas as pd

from .schema import ID_COLUMNS, MAP_METRICS, METHOD_ROW, Column, describe, prefix

__all__ = ["FILTERS", "GalleryMap", "default_metrics", "gallery_data", "render_page"]

# Filter name -> (label, column it needs, what it keeps); the page implements each "keep".
FILTERS: dict[str, tuple[str, str | None, str]] = {
    "all": ("all", None, "every row"),
    "misses": ("pointing misses", "pointing_hit", "pointing_hit == 0"),
    "worst": ("worst deletion", "deletion_auc", "the N highest deletion_auc"),
    "loc": ("localization misses", "loc_hit", "loc_hit == 0"),
    "small": ("small objects", "small_object", "small_object == 1"),
}
# The image's own fields shown beside its thumbnails.
INFO_FIELDS = ("path", "label", "label_name", "target", "target_name", "pred", "pred_name")


@dataclass(frozen=True)
class GalleryMap:
    """A scored map the gallery shows: its column prefix name, its label, and whether it
    is hidden until asked for (the centre and random baselines)."""

    name: str
    label: str
    optional: bool = False


def default_metrics(table: pd.DataFrame) -> list[str]:
    """The numeric, non-identifier columns of `table`: per-map metrics in schema order for
    the run's map first, then every other numeric column in table order."""
    numeric = [
        str(c)
        for c in table.columns
        if str(c) not in ID_COLUMNS
        and not str(c).endswith("_name")
        and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))
    ]
    first = [m.name for m in MAP_METRICS if m.name in numeric]
    return first + [c for c in numeric if c not in first]


def _json_value(value: Any) -> Any:
    """A table cell as JSON: numbers as float/int, NaN/None/NA as null, the rest as str."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _difference(table: pd.DataFrame, row: int, metric: str, other: str) -> float | None:
    """The run's map minus comparison `other` on `metric` for one row (None if either is
    missing)."""
    mine, theirs = table.at[row, metric], table.at[row, f"{other}_{metric}"]
    if pd.isna(mine) or pd.isna(theirs):
        return None
    return float(mine) - float(theirs)


def _columns_entry(column: Column) -> dict[str, Any]:
    return {"name": column.name, "label": column.label, "better": column.better}


def gallery_data(
    table: pd.DataFrame,
    thumbs: Sequence[tuple[int, dict[str, str], tuple[int, int]]],
    maps: Sequence[GalleryMap],
    *,
    title: str = "",
    metrics: Sequence[str] | None = None,
    thumb_size: int = 160,
    extra: Sequence[Column] = (),
) -> dict[str, Any]:
    """What the page reads, JSON-ready.

    table: one row per image, indexed by row number (report.csv read with pandas).
    thumbs: (row, {"image"|"perturbed"|"map:NAME": relative path}, (h, w)) per shown row,
    in the order given. maps: the scored maps with thumbnails, the run's first.
    metrics: the sortable columns (default `default_metrics`); extra: columns declared
    outside the schema (the methods'), for their labels.
    """
    metrics = list(default_metrics(table) if metrics is None else metrics)
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise KeyError(f"metrics not in the table: {missing}")
    if not table.index.is_unique:
        raise ValueError("the table index (row numbers) has duplicates")
    names = [m.name for m in maps if m.name != METHOD_ROW]
    key_metrics = [m for m in MAP_METRICS if m.key]
    differences = [
        (other, m)
        for other in names
        for m in key_metrics
        if f"{other}_{m.name}" in table and m.name in table
    ]
    filters = [f for f, (_, column, _) in FILTERS.items() if column is None or column in table]
    needed = [FILTERS[f][1] for f in filters if FILTERS[f][1]]
    shown = list(dict.fromkeys([*metrics, *needed, *_key_columns(table, maps, key_metrics)]))
    return {
        "title": title,
        "table_rows": len(table),
        "thumb_size": thumb_size,
        "maps": [{"name": m.name, "label": m.label, "optional": m.optional} for m in maps],
        "key_metrics": [_columns_entry(m) for m in key_metrics],
        "metrics": [_columns_entry(describe(m, names, extra)) for m in metrics],
        "differences": [_difference_entry(other, m, maps) for other, m in differences],
        "filters": [{"name": f, "label": FILTERS[f][0]} for f in filters],
        "rows": _rows(table, thumbs, shown, differences),
    }


def _key_columns(table, maps, key_metrics) -> list[str]:
    return [
        f"{prefix(m.name)}{k.name}"
        for m in maps
        for k in key_metrics
        if f"{prefix(m.name)}{k.name}" in table
    ]


def _difference_entry(other: str, metric: Column, maps: Sequence[GalleryMap]) -> dict:
    labels = {m.name: m.label for m in maps}
    return {
        "name": f"diff:{other}:{metric.name}",
        "label": f"{labels[METHOD_ROW]} − {labels[other]}: {metric.label}",
        "better": metric.better,
    }


def _rows(table, thumbs, columns, differences) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for row, paths, size in thumbs:
        row = int(row)
        if row in seen:
            raise ValueError(f"row {row} has thumbnails twice")
        if row not in table.index:
            raise KeyError(f"row {row} has thumbnails but is not in the table")
        seen.add(row)
        cells = table.loc[row]
        record: dict[str, Any] = {"row": row}
        for name in INFO_FIELDS:
            if name in table.columns:
                record[name] = _json_value(cells[name])
        values = {c: _json_value(cells[c]) for c in columns}
        for other, metric in differences:
            values[f"diff:{other}:{metric.name}"] = _difference(table, row, metric.name, other)
        record.update(values=values, thumbs=dict(paths), size=[int(size[0]), int(size[1])])
        rows.append(record)
    return rows


def _inline_json(data: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>', '&' or line separators left raw."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_page(data: dict[str, Any]) -> str:
    """index.html's text: the template with the title escaped and `data` inlined."""
    template = (
        resources.files("pipeline.reports").joinpath("templates/gallery.html").read_text("utf-8")
    )
    return Template(template).substitute(
        title=html.escape(data["title"] or "mpbatch gallery", quote=True),
        thumb_size=str(int(data["thumb_size"])),
        data=_inline_json(data),
    )
