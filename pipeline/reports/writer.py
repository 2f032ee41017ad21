"""Every file mpbatch writes beside a run's mask file: report.csv, failures.csv, the summary
(summary.csv, summary.md, curves.png, localization.csv and .png), the per-image figures of
`mpbatch show` and the HTML gallery of `mpbatch show --html`.

The one module that writes report files. It reads a run through pipeline.store.reader, makes
its tables with pipeline.reports.tables, its pictures with pipeline.reports.pictures and the
gallery's page with pipeline.reports.gallery, all of which are pure.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..data.images import decode_image, resize_image
from ..errors import SettingsError
from ..methods import DEFAULT_METHOD, declared_columns, get_method, settings_from_config
from ..metrics.comparisons import MapRequest, comparison_maps, comparison_names, get_comparison
from ..models.registry import load_model
from ..store.reader import RunFile, read_failures
from .gallery import GalleryMap, gallery_data, render_page
from .markdown import markdown_header, markdown_table
from .pictures import (
    curves_figure,
    localization_figure,
    saliency_panel,
    sanity_figure,
    thumbnails,
)
from .schema import METHOD_ROW, Column
from .tables import (
    SUMMARY_CSV,
    localization_curves,
    mean_curves,
    per_image_table,
    summary_table,
)

SUMMARY_MD = "summary.md"
CURVES_PNG = "curves.png"
LOCALIZATION_CSV = "localization.csv"
LOCALIZATION_PNG = "localization.png"
SANITY_CSV = "sanity.csv"
SANITY_SUMMARY_CSV = "sanity_summary.csv"
SANITY_PNG = "sanity.png"
REPEATABILITY_CSV = "repeatability.csv"
REPEATABILITY_SUMMARY_CSV = "repeatability_summary.csv"
GALLERY_PAGE = "index.html"
THUMB_DIR = "thumbs"
JPEG_QUALITY = 85  # about 6 KiB a 160-px photo thumbnail, against 32 KiB as PNG
DPI = 100


def save_figure(fig: Figure, path: str | PathLike[str]) -> None:
    """Write `fig` to `path` as PNG at 100 dpi (creating parent folders), then close it.

    Closing clears the figure's contents (and drops it from pyplot if pyplot manages it), so a
    loop over thousands of images does not accumulate memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()


# ------------------------------------------------------------------------------ reports
def write_report_csv(masks_file: str | Path, report_file: str | Path) -> pd.DataFrame:
    """Write report.csv (one row per explained image) from a mask file; returns the table."""
    run = RunFile.open(masks_file)
    table = per_image_table(run.columns, run.class_names)
    table.to_csv(report_file, index=False)
    return table


def write_failures_csv(masks_file: str | Path, failures_file: str | Path) -> pd.DataFrame:
    """Write failures.csv (index, path, reason of every image that could not be used)."""
    table = pd.DataFrame(read_failures(masks_file), columns=["index", "path", "reason"])
    table.to_csv(failures_file, index=False)
    return table


def write_summary(
    masks_file: str | Path,
    out_dir: str | Path,
    *,
    skipped: int = 0,
    name: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Write OUT/summary.csv, OUT/summary.md and OUT/curves.png (and the localization
    table and figure when the maps were localized); return the summary table.

    summary.md starts with the model, preset, protocol and the counts evaluated / skipped
    (`skipped`: images the caller left out), then the table with 'mean [low, high]' cells.
    `name` titles both (default: the out folder's name).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunFile.open(masks_file)
    title = name if name is not None else out_dir.resolve().name
    table = summary_table(run.columns, label=run.label, n_resamples=n_resamples, seed=seed)
    table.to_csv(out_dir / SUMMARY_CSV, index=False)

    evaluated = int(run.attrs.get("rows", run.rows))
    header = markdown_header(title, run.attrs, evaluated, int(skipped), n_resamples)
    (out_dir / SUMMARY_MD).write_text(header + markdown_table(table), encoding="utf-8")

    config = run.config
    figure_title = f"{title}: {config.get('model', '')} {config.get('preset', '')}".strip()
    curves = mean_curves(run.columns, label=run.label)
    save_figure(curves_figure(curves, title=figure_title), out_dir / CURVES_PNG)
    errors = localization_curves(run.columns, label=run.label)
    if len(errors):
        errors.to_csv(out_dir / LOCALIZATION_CSV, index=False)
        save_figure(localization_figure(errors, title=figure_title), out_dir / LOCALIZATION_PNG)
    return table


def write_run_reports(
    masks_file: Path, out: Path, report_name: str, failures_name: str | None = None
) -> int:
    """report.csv and (when named) failures.csv beside a mask file; returns the failures."""
    write_report_csv(masks_file, out / report_name)
    if failures_name is None:
        return len(read_failures(masks_file))
    return len(write_failures_csv(masks_file, out / failures_name))


def write_sanity(out: Path, table: pd.DataFrame, summary: pd.DataFrame, title: str) -> list[Path]:
    """`mpbatch sanity`'s files: the per-image table, the per-stage summary and its plot."""
    table.to_csv(out / SANITY_CSV, index=False)
    summary.to_csv(out / SANITY_SUMMARY_CSV, index=False)
    save_figure(sanity_figure(summary, title), out / SANITY_PNG)
    return [out / SANITY_CSV, out / SANITY_SUMMARY_CSV, out / SANITY_PNG]


def write_repeatability(out: Path, per_image: pd.DataFrame, summary: pd.DataFrame) -> list[Path]:
    """`mpbatch sanity --repeat K`'s per-image and summary tables."""
    per_image.to_csv(out / REPEATABILITY_CSV, index=False)
    summary.to_csv(out / REPEATABILITY_SUMMARY_CSV, index=False)
    return [out / REPEATABILITY_CSV, out / REPEATABILITY_SUMMARY_CSV]


def write_comparison(table: pd.DataFrame, output: Path) -> Path:
    """`mpbatch report`: the runs side by side as CSV at `output` and markdown beside it."""
    table.to_csv(output, index=False)
    markdown = Path(output).with_suffix(".md")
    markdown.write_text(markdown_table(table))
    return markdown


# ------------------------------------------------------------------------------ pictures
@dataclass
class Panel:
    """One explained image as `show` draws it: image and perturbed image 1×3×H×W in [0, 1],
    the run's map 1×H×W, and a title."""

    row: int
    image: torch.Tensor
    perturbed: torch.Tensor
    saliency: torch.Tensor
    title: str


def run_panels(run: RunFile, rows: Iterable[int]) -> Iterator[Panel]:
    """The panels of `rows`, as the run's method made them (images re-read from the run's
    data folder at its input size)."""
    config = run.config
    if "mask" not in config:
        raise SettingsError(f"{run.path}: not a run of an mpbatch method (no mask settings)")
    method = get_method(config.get("method") or DEFAULT_METHOD)
    settings = settings_from_config(config)
    data, size = Path(config["data"]), int(config["size"])
    mean = torch.tensor(config.get("normalization", {}).get("mean", [0.5, 0.5, 0.5]))
    for row in rows:
        relative = str(run.columns["path"][row])
        pixels, width, height = decode_image(data / relative)
        image = resize_image(pixels, size)[None]
        one = run.method_columns([row])
        saliency = run.maps([row], (size, size))
        perturbed, caption = method.perturbed(image, one, settings, mean, relative, (width, height))
        target = int(run.columns["target"][row])
        name = run.class_name(target) or str(target)
        title = f"{relative}: {name} — p(clean) {run.columns['prob_clean'][row]:.3f}; {caption}"
        yield Panel(row, image, perturbed, saliency, title)


def write_figures(out: str | Path, dest: str | Path, limit: int | None = None) -> list[Path]:
    """One PNG per explained image of the run in `out`: image, perturbed image, saliency."""
    run = RunFile.open(out)
    dest = Path(dest)
    written = []
    for panel in run_panels(run, range(run.rows if limit is None else min(limit, run.rows))):
        relative = str(run.columns["path"][panel.row])
        figure = saliency_panel(panel.image[0], panel.perturbed[0], panel.saliency[0], panel.title)
        path = dest / (Path(relative).with_suffix("").as_posix().replace("/", "__") + ".png")
        save_figure(figure, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ the gallery
def write_gallery_page(
    dest: Path,
    table: pd.DataFrame,
    pictures: Iterable[tuple[int, dict[str, np.ndarray]]],
    maps: Sequence[GalleryMap],
    *,
    title: str = "",
    metrics: Sequence[str] | None = None,
    thumb_size: int = 160,
    extra: Sequence[Column] = (),
) -> Path:
    """dest/index.html and dest/thumbs/<row>-<kind>.jpg; returns the page.

    pictures: (row, {"image"|"perturbed"|"map:NAME": h×w×3 uint8}) per shown row, consumed
    one at a time (visualize.thumbnails makes them); see gallery.gallery_data for the rest.
    """
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be positive, got {thumb_size}")
    folder = Path(dest) / THUMB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    thumbs = []
    for row, kinds in pictures:
        paths = {}
        for kind, array in kinds.items():
            name = f"{int(row)}-{kind.replace(':', '-')}.jpg"
            Image.fromarray(array).save(folder / name, "JPEG", quality=JPEG_QUALITY)
            paths[kind] = f"{THUMB_DIR}/{name}"
        thumbs.append((row, paths, next(iter(kinds.values())).shape[:2]))
    data = gallery_data(
        table, thumbs, maps, title=title, metrics=metrics, thumb_size=thumb_size, extra=extra
    )
    page = Path(dest) / GALLERY_PAGE
    page.write_text(render_page(data), encoding="utf-8")
    return page


def gallery_maps(run: RunFile) -> list[GalleryMap]:
    """The run's map, then each registered comparison it was scored beside: those shown by
    default (Grad-CAM) before the baselines hidden until asked for."""
    method = get_method(run.config.get("method") or DEFAULT_METHOD)
    maps = [GalleryMap(METHOD_ROW, run.config.get("name") or method.label or method.name)]
    for name in comparison_names():
        if f"{name}_deletion_auc" in run.columns or f"{name}_pointing_hit" in run.columns:
            comparison = get_comparison(name)
            maps.append(GalleryMap(name, comparison.label, comparison.optional))
    return sorted(maps, key=lambda m: m.optional)


def _gallery_pictures(run: RunFile, rows: Sequence[int], maps, thumb_size: int):
    """Each shown row's thumbnails: the run's map and every comparison's, made again from
    the re-read image (comparisons that need the model load it once)."""
    config = run.config
    model = None
    if len(maps) > 1:
        model = load_model(config["model"], config.get("weights")).eval()
    grid = tuple(run.columns["masks"].shape[-2:])
    seed = int((config.get("scoring") or {}).get("seed", 0))
    for panel in run_panels(run, rows):
        targets = torch.from_numpy(np.asarray(run.columns["target"][[panel.row]]))
        keys = [str(run.columns["path"][panel.row])]
        request = MapRequest(model, panel.image, targets, keys, grid, seed)
        images = {METHOD_ROW: panel.saliency[0]}
        for map_ in maps[1:]:
            images[map_.name] = comparison_maps(map_.name, request)[0].detach()
        yield panel.row, thumbnails(panel.image[0], panel.perturbed[0], images, thumb_size)


def write_gallery(
    out: str | Path,
    dest: str | Path,
    *,
    sort: str = "deletion_auc",
    descending: bool = True,
    limit: int | None = 100,
    thumb_size: int = 160,
) -> Path:
    """dest/index.html for the run in `out`: the `limit` rows first by `sort` (descending:
    the worst deletion first by default), with a thumbnail of every scored map."""
    run = RunFile.open(out)
    table = per_image_table(run.columns, run.class_names)
    if sort not in table:
        raise SettingsError(f"{run.path}: no column {sort!r} to sort the gallery by")
    order = table.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    rows = [int(r) for r in order.index[: len(order) if limit is None else limit]]
    maps = gallery_maps(run)
    title = f"{Path(out).resolve().name}: {len(rows)} of {len(table)} images by {sort}"
    pictures = _gallery_pictures(run, rows, maps, thumb_size)
    return write_gallery_page(
        Path(dest),
        table,
        pictures,
        maps,
        title=title,
        thumb_size=thumb_size,
        extra=declared_columns(),
    )
