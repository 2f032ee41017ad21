"""A static HTML gallery of explained images, for asking "where does the method fail?".

`write_gallery` writes ``dest/index.html`` and ``dest/thumbs/<row>-{image,perturbed,saliency}.jpg``
for the rows of a per-image report that come with thumbnails (typically the worst hundred of a
large run). The page is self-contained: the rows are inlined as JSON in a ``<script>`` tag, the
CSS and JavaScript are inline, nothing is fetched, so it works opened straight from disk
(``file://``). It sorts by any metric column, filters (pointing misses, worst deletion,
localization misses, small objects) and keeps its view in ``location.hash``, e.g.
``index.html#sort=deletion_auc&dir=desc&filter=misses``, so a view can be linked to.

Thumbnails are JPEG (quality 85): on the example ImageNet photos at 160 px that is about 6 KiB an
image against 32 KiB as PNG.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

from .visualize import _as_2d, _as_hwc

__all__ = ["write_gallery", "default_metrics", "thumbnail_size", "FILTERS"]

THUMB_DIR = "thumbs"
THUMB_KINDS = ("image", "perturbed", "saliency")
THUMB_EXT = "jpg"
JPEG_QUALITY = 85
CMAP = "jet"
ALPHA = 0.5  # opacity of the coloured saliency over the image

# Columns that identify an image rather than score it: never offered as metrics.
ID_COLUMNS = frozenset(
    {"index", "row", "path", "width", "height", "label", "target", "pred"}
    | {"file_size", "file_mtime_ns"}  # the file's stamp (store.STAMP_COLUMNS)
)
# Default metric order (those present); other numeric columns follow in table order.
PREFERRED_METRICS = (
    "deletion_auc",
    "insertion_auc",
    "pointing_hit",
    "pointing_energy",
    "loc_hit",
    "prob_clean",
    "prob_masked",
    "mask_area",
    "box_coverage",
    "small_object",
)
LOWER_IS_BETTER = frozenset({"deletion_auc"})
HIGHER_IS_BETTER = frozenset({"insertion_auc", "pointing_hit", "pointing_energy", "loc_hit"})
BASELINE_PREFIXES = ("center_", "random_")

# Filter name -> (label, column it needs, what it keeps); the page implements each "keep".
FILTERS: dict[str, tuple[str, str | None, str]] = {
    "all": ("all", None, "every row"),
    "misses": ("pointing misses", "pointing_hit", "pointing_hit == 0"),
    "worst": ("worst deletion", "deletion_auc", "the N highest deletion_auc"),
    "loc": ("localization misses", "loc_hit", "loc_hit == 0"),
    "small": ("small objects", "small_object", "small_object == 1"),
}


def default_metrics(table: pd.DataFrame) -> list[str]:
    """The numeric, non-identifier columns of `table`: known metrics first, then the rest."""
    numeric = [
        str(c)
        for c in table.columns
        if str(c) not in ID_COLUMNS
        and not str(c).endswith("_name")
        and (pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c]))
    ]
    first = [m for m in PREFERRED_METRICS if m in numeric]
    return first + [c for c in numeric if c not in first]


def _better(metric: str) -> str | None:
    """'lower' / 'higher' when that is known to be better for `metric` (baselines included)."""
    for prefix in BASELINE_PREFIXES:
        if metric.startswith(prefix):
            metric = metric[len(prefix) :]
    if metric in LOWER_IS_BETTER:
        return "lower"
    if metric in HIGHER_IS_BETTER:
        return "higher"
    return None


def thumbnail_size(height: int, width: int, thumb_size: int) -> tuple[int, int]:
    """(h, w) fitting height×width inside thumb_size×thumb_size, aspect kept, never enlarged."""
    scale = min(1.0, thumb_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _to_pil(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An H×W×3 float image in [0, 1] as an RGB PIL image resized to size = (h, w)."""
    pil = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return pil


def saliency_overlay(image_thumb: np.ndarray, saliency: Any) -> np.ndarray:
    """The saliency coloured with `CMAP` at opacity `ALPHA` over an h×w×3 image in [0, 1].

    saliency: any h'×w' map, any range (NaN counts as the minimum); it is rescaled to [0, 1]
    (a constant map becomes all zeros) and resized bilinearly to h×w. Returns h×w×3 in [0, 1].
    """
    sal = _as_2d(saliency).astype(np.float32)
    sal = np.where(np.isfinite(sal), sal, np.nan)
    lo, hi = (float(np.nanmin(sal)), float(np.nanmax(sal))) if np.isfinite(sal).any() else (0, 0)
    sal = np.nan_to_num((sal - lo) / (hi - lo), nan=0.0) if hi > lo else np.zeros_like(sal)
    h, w = image_thumb.shape[:2]
    small = Image.fromarray(sal).resize((w, h), Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps[CMAP](np.clip(np.asarray(small), 0.0, 1.0))[..., :3]
    return (1.0 - ALPHA) * image_thumb + ALPHA * colours


def _write_thumbs(
    folder: Path, row: int, image: Any, perturbed: Any, saliency: Any, thumb_size: int
) -> dict[str, Any]:
    """Write the three JPEG thumbnails of one row; returns their relative paths and size."""
    img = _as_hwc(image)
    pert = _as_hwc(perturbed)
    size = thumbnail_size(img.shape[0], img.shape[1], thumb_size)
    img_pil = _to_pil(img, size)
    overlay = saliency_overlay(np.asarray(img_pil, dtype=np.float64) / 255.0, saliency)
    pictures = {
        "image": img_pil,
        "perturbed": _to_pil(pert, size),
        "saliency": _to_pil(overlay, size),
    }
    paths = {}
    for kind, pil in pictures.items():
        name = f"{row}-{kind}.{THUMB_EXT}"
        pil.save(folder / name, "JPEG", quality=JPEG_QUALITY)
        paths[kind] = f"{THUMB_DIR}/{name}"
    return {"thumbs": paths, "size": [size[0], size[1]]}


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


def _row_record(table: pd.DataFrame, row: int, columns: Sequence[str]) -> dict[str, Any]:
    """The identifying fields and the `columns` values of one table row, JSON-ready."""
    cells = table.loc[row]
    record: dict[str, Any] = {"row": int(row)}
    for field in ("path", "label", "label_name", "target", "target_name", "pred", "pred_name"):
        if field in table.columns:
            record[field] = _json_value(cells[field])
    record["values"] = {c: _json_value(cells[c]) for c in columns}
    return record


def _inline_json(data: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>', '&' or line separators left raw."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def write_gallery(
    dest: Path,
    table: pd.DataFrame,
    thumbnails: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
    *,
    title: str = "",
    metrics: Sequence[str] | None = None,
    thumb_size: int = 160,
) -> Path:
    """Write dest/index.html and dest/thumbs/<row>-{image,perturbed,saliency}.jpg; return the page.

    table: one row per image, indexed by row number (e.g. report.csv read with pandas).
    thumbnails: (row, image H×W×3 float in [0, 1], perturbed H×W×3 float in [0, 1], saliency
    h×w of any range), consumed one at a time; only these rows appear in the gallery, in the
    order given. metrics: the columns shown and sortable (default: `default_metrics`).
    thumb_size: the longest side of a thumbnail in pixels (smaller images are not enlarged).
    """
    dest = Path(dest)
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be positive, got {thumb_size}")
    metrics = list(default_metrics(table) if metrics is None else metrics)
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise KeyError(f"metrics not in the table: {missing}")
    if not table.index.is_unique:
        raise ValueError("the table index (row numbers) has duplicates")
    filters = [f for f, (_, column, _) in FILTERS.items() if column is None or column in table]
    columns = list(dict.fromkeys([*metrics, *(FILTERS[f][1] for f in filters if FILTERS[f][1])]))

    folder = dest / THUMB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for row, image, perturbed, saliency in thumbnails:
        row = int(row)
        if row in seen:
            raise ValueError(f"row {row} has thumbnails twice")
        if row not in table.index:
            raise KeyError(f"row {row} has thumbnails but is not in the table")
        seen.add(row)
        record = _row_record(table, row, columns)
        record.update(_write_thumbs(folder, row, image, perturbed, saliency, thumb_size))
        rows.append(record)

    data = {
        "title": title,
        "table_rows": len(table),
        "thumb_size": thumb_size,
        "metrics": [{"name": m, "better": _better(m)} for m in metrics],
        "filters": [{"name": f, "label": FILTERS[f][0]} for f in filters],
        "rows": rows,
    }
    page = dest / "index.html"
    page.write_text(_render_page(title, data), encoding="utf-8")
    return page


def _render_page(title: str, data: dict[str, Any]) -> str:
    """index.html from the template: `title` as text, `data` as inline JSON."""
    heading = title or "mpbatch gallery"
    return PAGE.substitute(
        title=html.escape(heading, quote=True),
        thumb_size=str(int(data["thumb_size"])),
        data=_inline_json(data),
    )


PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
  [hidden] { display: none !important; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
  header { position: sticky; top: 0; z-index: 2; background: #fff; padding: 8px 16px;
           border-bottom: 1px solid #ccc; }
  h1 { font-size: 18px; margin: 0 0 6px; }
  .controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
  .controls label { display: inline-flex; gap: 4px; align-items: center; }
  #count { color: #555; margin-left: auto; }
  #n { width: 5em; }
  table { border-collapse: collapse; margin: 8px 16px; }
  th, td { padding: 4px 6px; border-bottom: 1px solid #ddd; vertical-align: top; }
  th { background: #eee; font-weight: 600; text-align: left; max-width: 90px;
       overflow-wrap: break-word; }
  th button { all: unset; cursor: pointer; }
  th button:hover, th button:focus { text-decoration: underline; }
  th[aria-sort="ascending"] button::after { content: " \\25B2"; }
  th[aria-sort="descending"] button::after { content: " \\25BC"; }
  th .hint { display: block; font-weight: normal; color: #777; font-size: 11px; }
  td.thumbs { white-space: nowrap; }
  td.thumbs img { width: ${thumb_size}px; height: auto; max-height: ${thumb_size}px;
                  object-fit: contain; margin-right: 2px; }
  td.info { max-width: 260px; overflow-wrap: anywhere; }
  td.info .path { font-family: ui-monospace, monospace; font-size: 12px; }
  td.info .wrong { color: #b00; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  td.miss { background: #fdd; }
  td.nan { color: #999; }
  #empty { margin: 16px; color: #555; }
</style>
</head>
<body>
<header>
  <h1>$title</h1>
  <div class="controls">
    <label>sort <select id="sort"></select></label>
    <button id="dir" type="button"></button>
    <label>filter <select id="filter"></select></label>
    <label id="n-label">N <input id="n" type="number" min="1" step="1" size="5"></label>
    <span id="count"></span>
  </div>
</header>
<noscript><p>This gallery needs JavaScript to show its rows.</p></noscript>
<table>
  <thead><tr id="head"></tr></thead>
  <tbody id="rows"></tbody>
</table>
<p id="empty" hidden>No image matches this filter.</p>
<script type="application/json" id="gallery-data">$data</script>
<script>
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("gallery-data").textContent);
  var METRICS = DATA.metrics.map(function (m) { return m.name; });
  var FILTERS = DATA.filters.map(function (f) { return f.name; });
  var DEFAULT_N = 100;
  var KEEP = {
    all: function () { return true; },
    misses: function (r) { return r.values.pointing_hit === 0; },
    loc: function (r) { return r.values.loc_hit === 0; },
    small: function (r) { return r.values.small_object === 1; }
  };

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  // `name` as text with a line-break opportunity after each underscore.
  function breakable(node, name) {
    name.split("_").forEach(function (part, i, parts) {
      node.appendChild(document.createTextNode(part + (i < parts.length - 1 ? "_" : "")));
      if (i < parts.length - 1) { node.appendChild(document.createElement("wbr")); }
    });
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) { return "\\u2013"; }
    if (typeof v !== "number") { return String(v); }
    return Number.isInteger(v) ? String(v) : v.toFixed(3);
  }

  function worseFirst(metric) {
    var m = DATA.metrics.find(function (x) { return x.name === metric; });
    return m && m.better === "higher" ? "asc" : "desc";
  }

  function defaults() {
    var sort = METRICS.indexOf("deletion_auc") >= 0 ? "deletion_auc" : "row";
    return { sort: sort, dir: sort === "row" ? "asc" : "desc", filter: "all", n: DEFAULT_N };
  }

  function readHash() {
    var state = defaults();
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    var sort = params.get("sort"), dir = params.get("dir"), filter = params.get("filter");
    var n = parseInt(params.get("n"), 10);
    if (sort === "row" || METRICS.indexOf(sort) >= 0) { state.sort = sort; }
    if (dir === "asc" || dir === "desc") { state.dir = dir; }
    if (FILTERS.indexOf(filter) >= 0) { state.filter = filter; }
    if (n > 0) { state.n = n; }
    return state;
  }

  function writeHash(state) {
    var params = new URLSearchParams();
    params.set("sort", state.sort);
    params.set("dir", state.dir);
    params.set("filter", state.filter);
    if (state.filter === "worst") { params.set("n", String(state.n)); }
    location.hash = params.toString();
  }

  function sortKey(r, key) { return key === "row" ? r.row : r.values[key]; }

  // Stable sort by `key`; missing values (NaN) last in both directions.
  function sorted(rows, key, dir) {
    var sign = dir === "desc" ? -1 : 1;
    return rows.map(function (r, i) { return [r, i]; }).sort(function (a, b) {
      var x = sortKey(a[0], key), y = sortKey(b[0], key);
      var xm = x === null || x === undefined, ym = y === null || y === undefined;
      if (xm || ym) { return xm === ym ? a[1] - b[1] : (xm ? 1 : -1); }
      if (typeof x === "string" || typeof y === "string") {
        x = String(x); y = String(y);
      }
      return x < y ? -sign : x > y ? sign : a[1] - b[1];
    }).map(function (p) { return p[0]; });
  }

  function keptRows(state) {
    if (state.filter === "worst") {
      var worst = sorted(DATA.rows, "deletion_auc", "desc").filter(function (r) {
        return r.values.deletion_auc !== null;
      }).slice(0, state.n);
      var set = new Set(worst.map(function (r) { return r.row; }));
      return DATA.rows.filter(function (r) { return set.has(r.row); });
    }
    return DATA.rows.filter(KEEP[state.filter] || KEEP.all);
  }

  function buildRow(r) {
    var tr = el("tr", { "class": "item", "data-row": String(r.row) });
    var thumbs = el("td", { "class": "thumbs" });
    ["image", "perturbed", "saliency"].forEach(function (kind) {
      thumbs.appendChild(el("img", { src: r.thumbs[kind], alt: kind + " " + r.row,
        title: kind, width: String(r.size[1]), height: String(r.size[0]) }));
    });
    tr.appendChild(thumbs);
    var info = el("td", { "class": "info" });
    info.appendChild(el("div", { "class": "path" }, r.path === undefined ? "" : fmt(r.path)));
    info.appendChild(el("div", { "class": "rowno" }, "row " + r.row));
    [["label", "label"], ["target", "target"], ["pred", "pred"]].forEach(function (f) {
      if (r[f[0]] === undefined) { return; }
      var name = r[f[0] + "_name"];
      var line = el("div", {}, f[1] + ": " + fmt(r[f[0]]) + (name ? " " + name : ""));
      if (f[0] === "pred" && r.target !== undefined && r.pred !== r.target) {
        line.className = "wrong";
      }
      info.appendChild(line);
    });
    tr.appendChild(info);
    METRICS.forEach(function (m) {
      var v = r.values[m];
      var cls = "num" + (v === null ? " nan" : "");
      if (v === 0 && /(^|_)(pointing|loc)_hit$$/.test(m)) { cls += " miss"; }
      tr.appendChild(el("td", { "class": cls, "data-metric": m }, fmt(v)));
    });
    return tr;
  }

  function buildControls() {
    var sortSel = document.getElementById("sort");
    sortSel.appendChild(el("option", { value: "row" }, "row"));
    METRICS.forEach(function (m) { sortSel.appendChild(el("option", { value: m }, m)); });
    var filterSel = document.getElementById("filter");
    DATA.filters.forEach(function (f) {
      filterSel.appendChild(el("option", { value: f.name }, f.label));
    });
    var head = document.getElementById("head");
    head.appendChild(el("th", {}, "image / perturbed / saliency"));
    head.appendChild(el("th", {}, "path / classes"));
    DATA.metrics.forEach(function (m) {
      var th = el("th", { "data-metric": m.name });
      th.appendChild(breakable(el("button", { type: "button" }), m.name));
      if (m.better) { th.appendChild(el("span", { "class": "hint" }, m.better + " is better")); }
      head.appendChild(th);
    });
  }

  var ROWS = new Map(DATA.rows.map(function (r) { return [r.row, buildRow(r)]; }));

  function render() {
    var state = readHash();
    document.getElementById("sort").value = state.sort;
    document.getElementById("filter").value = state.filter;
    document.getElementById("n").value = String(state.n);
    document.getElementById("n-label").hidden = state.filter !== "worst";
    var dirButton = document.getElementById("dir");
    dirButton.textContent = state.dir === "asc" ? "ascending \\u25B2" : "descending \\u25BC";
    document.querySelectorAll("#head th[data-metric]").forEach(function (th) {
      var on = th.getAttribute("data-metric") === state.sort;
      if (on) { th.setAttribute("aria-sort", state.dir === "asc" ? "ascending" : "descending"); }
      else { th.removeAttribute("aria-sort"); }
    });
    var shown = sorted(keptRows(state), state.sort, state.dir);
    var body = document.getElementById("rows");
    body.replaceChildren.apply(body, shown.map(function (r) { return ROWS.get(r.row); }));
    document.getElementById("count").textContent =
      "showing " + shown.length + " of " + DATA.rows.length +
      (DATA.table_rows > DATA.rows.length ? " (" + DATA.table_rows + " in the table)" : "");
    document.getElementById("empty").hidden = shown.length > 0;
  }

  function change(update) {
    var state = readHash();
    update(state);
    writeHash(state);
  }

  buildControls();
  document.getElementById("sort").addEventListener("change", function (e) {
    change(function (s) { s.sort = e.target.value; });
  });
  document.getElementById("dir").addEventListener("click", function () {
    change(function (s) { s.dir = s.dir === "asc" ? "desc" : "asc"; });
  });
  document.getElementById("filter").addEventListener("change", function (e) {
    change(function (s) { s.filter = e.target.value; });
  });
  document.getElementById("n").addEventListener("change", function (e) {
    change(function (s) { var n = parseInt(e.target.value, 10); if (n > 0) { s.n = n; } });
  });
  document.getElementById("head").addEventListener("click", function (e) {
    var th = e.target.closest("th[data-metric]");
    if (!th) { return; }
    var key = th.getAttribute("data-metric");
    change(function (s) {
      s.dir = s.sort === key ? (s.dir === "asc" ? "desc" : "asc") : worseFirst(key);
      s.sort = key;
    });
  });
  window.addEventListener("hashchange", render);
  render();
})();
</script>
</body>
</html>
"""
)
