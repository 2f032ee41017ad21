"""Pictures as pure functions: per-image saliency panels, deletion / insertion curves,
localization error against α, and the gallery's thumbnails.

Figures are `matplotlib.figure.Figure` objects built directly (the Agg canvas, no pyplot
state, no display), so they work on headless cluster nodes and in worker processes;
thumbnails are uint8 arrays. Nothing here reads or writes a file: pipeline.reports.writer saves
what these functions return.

Inputs may be numpy arrays or torch tensors (any device; they are detached and copied to the
CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from ..metrics.deletion_insertion import auc
from .schema import SANITY_MEASURES

__all__ = [
    "curves_figure",
    "curve_auc",
    "localization_figure",
    "saliency_overlay",
    "saliency_panel",
    "sanity_figure",
    "thumbnail",
    "thumbnail_size",
    "thumbnails",
    "upsample_bilinear",
]

DPI = 100
PANEL_HEIGHT_IN = 3.0


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy float64 copy of an array or a (possibly CUDA, grad-tracking) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_hwc(image: Any) -> np.ndarray:
    """An image as H×W×3 float in [0, 1].

    Accepts 3×H×W, H×W×3, 1×H×W, H×W×1, H×W (greyscale, repeated to 3 channels) and a leading
    batch axis of size 1 (1×3×H×W).
    """
    a = _to_numpy(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected an image of shape 3×H×W or H×W×3, got {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got an image of shape {a.shape}")
    return np.clip(a, 0.0, 1.0)


def _as_2d(saliency: Any) -> np.ndarray:
    """A saliency map as h×w; accepts h×w, 1×h×w and 1×1×h×w."""
    a = _to_numpy(saliency)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a saliency map of shape h×w, got {a.shape}")
    return a


def upsample_bilinear(saliency: Any, size: tuple[int, int]) -> np.ndarray:
    """Resize an h×w map to `size` = (H, W) bilinearly.

    Same sampling as `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`
    (half-pixel centres, edge values repeated), in numpy. Returns H×W float64.
    """
    a = _as_2d(saliency)
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")

    def weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0.0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = weights(a.shape[0], out_h)
    x0, x1, wx = weights(a.shape[1], out_w)
    rows = a[y0] * (1.0 - wy)[:, None] + a[y1] * wy[:, None]  # out_h × w
    return rows[:, x0] * (1.0 - wx)[None, :] + rows[:, x1] * wx[None, :]


def saliency_panel(
    image: Any,
    perturbed: Any,
    saliency: Any,
    title: str,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Three panels side by side: the image, the perturbed image, the saliency over the image.

    image, perturbed: 3×H×W or H×W×3 in [0, 1] (numpy or torch; values are clipped).
    saliency: h×w (or 1×h×w, 1×1×h×w), higher = more important, any resolution; it is
    upsampled bilinearly to H×W and drawn with `cmap` at opacity `alpha` over the image, with
    a colorbar spanning [vmin, vmax] (default: the map's own min and max).
    The figure has 4 axes: the three panels and the colorbar; `title` is the suptitle.
    """
    img = _as_hwc(image)
    pert = _as_hwc(perturbed)
    if pert.shape != img.shape:
        raise ValueError(f"perturbed {pert.shape} does not match image {img.shape}")
    h, w = img.shape[:2]
    sal = upsample_bilinear(saliency, (h, w))

    lo = float(np.nanmin(sal)) if vmin is None else float(vmin)
    hi = float(np.nanmax(sal)) if vmax is None else float(vmax)
    if not hi > lo:  # a constant map: give the colorbar a non-empty range
        hi = lo + 1.0
    norm = Normalize(vmin=lo, vmax=hi)

    panel_w = PANEL_HEIGHT_IN * w / h
    fig = Figure(figsize=(3 * panel_w + 1.2, PANEL_HEIGHT_IN + 0.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(pert)
    axes[1].set_title("perturbed")
    axes[2].imshow(img)
    axes[2].imshow(sal, cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest")
    axes[2].set_title("saliency")
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[2], fraction=0.046, pad=0.02)
    fig.suptitle(title)
    return fig


def curve_auc(curve: Any) -> float:
    """Area under a curve of N+1 scores sampled evenly on x ∈ [0, 1] (trapezoid rule).

    (Σ s − s₀/2 − s_N/2) / N, as in docs/design.md §4; a single score is its own area.
    """
    s = _to_numpy(curve).reshape(-1)
    if s.size == 0:
        raise ValueError("empty curve")
    if s.size == 1:
        return float(s[0])
    return float(auc(s))


def curves_figure(curves: Mapping[str, tuple[Any, Any]], title: str = "") -> Figure:
    """Deletion and insertion curves side by side, one line per method.

    curves: method name -> (mean deletion curve, mean insertion curve), each 1-D with N+1
    scores at x = linspace(0, 1, N+1) (methods may use different N). Each legend entry shows
    the AUC of that mean curve. Returns a figure with 2 axes.
    """
    fig = Figure(figsize=(10.0, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    top = 1.0
    for name, pair in curves.items():
        if len(pair) != 2:
            raise ValueError(f"{name!r}: expected (deletion, insertion), got {len(pair)} curves")
        for ax, curve in zip(axes, pair, strict=True):
            y = _to_numpy(curve).reshape(-1)
            if y.size < 2:
                raise ValueError(f"{name!r}: a curve needs at least 2 points, got {y.size}")
            x = np.linspace(0.0, 1.0, y.size)
            ax.plot(x, y, label=f"{name} (AUC {curve_auc(y):.3f})")
            top = max(top, float(np.nanmax(y)))
    for ax, kind, verb in zip(
        axes, ("deletion", "insertion"), ("deleted", "inserted"), strict=True
    ):
        ax.set_title(kind)
        ax.set_xlabel(f"fraction of pixels {verb}")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.05 * top)
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(loc="upper right" if kind == "deletion" else "lower right")
    axes[0].set_ylabel("probability of the explained class")
    if title:
        fig.suptitle(title)
    return fig


def localization_figure(errors: Any, title: str = "") -> Figure:
    """Localization error against α, one panel per rule, one line per map; `errors` is
    report.localization_curves' table (method, rule, alpha, loc_error)."""
    rules = list(dict.fromkeys(errors["rule"]))
    fig = Figure(figsize=(4.0 * len(rules), 3.2), dpi=DPI)
    FigureCanvasAgg(fig)
    for position, rule in enumerate(rules, start=1):
        axes = fig.add_subplot(1, len(rules), position)
        for method, rows in errors[errors["rule"] == rule].groupby("method", sort=False):
            axes.plot(rows["alpha"], rows["loc_error"], marker=".", label=str(method))
        axes.set_title(f"{rule} rule")
        axes.set_xlabel("α")
        axes.set_ylabel("localization error")
        axes.set_ylim(0.0, 1.0)
        axes.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sanity_figure(summary: Any, title: str = "") -> Figure:
    """Similarity to the original map against the stage of cascading randomisation, one line
    per measure with its 95% interval; `summary` is sanity.sanity_summary's table (stage,
    layer, and per measure its mean, _low and _high). The x axis names each stage's layer."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(summary) + 2.0), 3.8), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.add_subplot(1, 1, 1)
    x = np.arange(1, len(summary) + 1)
    for measure, label in ((c.name, c.label) for c in SANITY_MEASURES):
        if measure not in summary:
            continue
        line = axes.plot(x, summary[measure], marker="o", label=label)[0]
        axes.fill_between(x, summary[f"{measure}_low"], summary[f"{measure}_high"], alpha=0.2)
        # the trained model's maps against themselves: 1 by definition, drawn to read from
        axes.plot([0, 1], [1.0, summary[measure].iloc[0]], linestyle=":", color=line.get_color())
    axes.plot([0], [1.0], marker="o", color="grey")
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xticks(np.arange(len(summary) + 1))
    labels = ["none (trained)", *(str(layer) for layer in summary["layer"])]
    axes.set_xticklabels(labels, rotation=60, ha="right")
    axes.set_xlabel("randomised down to (cumulative, from the top)")
    axes.set_ylabel("similarity to the original map")
    axes.set_ylim(-0.5, 1.05)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ thumbnails
CMAP = "jet"
ALPHA = 0.5  # opacity of the coloured saliency over the image


def thumbnail_size(height: int, width: int, thumb_size: int) -> tuple[int, int]:
    """(h, w) fitting height×width inside thumb_size×thumb_size, aspect kept, never enlarged."""
    scale = min(1.0, thumb_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def thumbnail(image: Any, size: tuple[int, int]) -> np.ndarray:
    """An image (as _as_hwc accepts) as h×w×3 uint8 at `size` = (h, w), Lanczos-resized."""
    pil = Image.fromarray(np.round(_as_hwc(image) * 255.0).astype(np.uint8))
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(pil)


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


def thumbnails(
    image: Any, perturbed: Any, maps: dict[str, Any], thumb_size: int
) -> dict[str, np.ndarray]:
    """The gallery's pictures of one image as h×w×3 uint8 arrays: "image", "perturbed" and
    "map:NAME" (the map over the image) for each of `maps` (name -> h'×w' saliency)."""
    img = _as_hwc(image)
    size = thumbnail_size(img.shape[0], img.shape[1], thumb_size)
    small = thumbnail(img, size)
    pictures = {"image": small, "perturbed": thumbnail(perturbed, size)}
    base = small.astype(np.float64) / 255.0
    for name, saliency in maps.items():
        pictures[f"map:{name}"] = thumbnail(saliency_overlay(base, saliency), size)
    return pictures
