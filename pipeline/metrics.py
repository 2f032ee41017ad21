"""Saliency metrics: deletion / insertion curves and the pointing game (DESIGN.md §4).

Pure tensor functions: no file I/O, batched, and device-agnostic (everything runs on the
device of the images, or of the saliency for the pointing game).

Conventions
-----------
Images are float tensors ``B×3×H×W`` of pixels in [0, 1]. The model is a wrapper
``model(pixels) -> logits B×C`` that normalises its input itself and exposes ``model.mean``
and ``model.std`` (shape (3,), pixel space). Put it in ``eval()`` mode before scoring:
these functions do not change its state.

Saliency is "higher = more important", shape ``B×h×w`` (a ``B×1×h×w`` tensor is also
accepted), at any resolution. It must be finite.

Deletion / insertion (Petsiuk et al., RISE, BMVC 2018):
    * pixels are ordered by saliency upsampled bilinearly (``align_corners=False``) to H×W,
      highest first; ties are broken by raster index (the lower index comes first);
    * score k (k = 0..N, N = ceil(H·W / step)) is taken with the first ``min(k·step, H·W)``
      pixels of that order changed: replaced by the deletion substrate (deletion) or taken
      from the original image on top of the insertion substrate (insertion);
    * the deletion substrate is the normalisation mean colour: zero after normalisation;
    * the insertion substrate is the image blurred with RISE's ``gkern(blur_kernel,
      blur_sigma)``: scipy's ``gaussian_filter`` (reflect mode, truncate 4) applied to a
      delta in a ``blur_kernel``×``blur_kernel`` array, so the Gaussian's tails fold back
      into the window and the 11×11, σ 5 kernel is almost flat (:func:`rise_kernel1d`
      computes it without scipy); applied per channel in the model's normalised space with
      zero padding (so the border fades to the mean colour), then un-normalised;
    * the score is the softmax probability of the target class;
    * AUC is the trapezoid rule on x in [0, 1]: ``(sum(s) - s_0/2 - s_N/2) / N``.

Pointing game (Zhang et al., 2016; TorchRay's ``pointing_game.py``):
    * box coordinates ``(xmin, ymin, xmax, ymax)`` are 0-based pixel indices, inclusive on
      both ends: pixel (row y, column x) of the original image belongs to the box when
      ``xmin <= x <= xmax`` and ``ymin <= y <= ymax``. This is TorchRay's convention after it
      subtracts 1 from PASCAL VOC's 1-based coordinates, and matches the ImageNet boxes of
      the sample data (0 .. 226 in 227-pixel images). Convert 1-based boxes before calling;
    * the point chosen by a saliency map is the pixel (x = column, y = row) of its maximum
      after bilinear resizing to the original image size (and, with ``smooth`` > 0, a
      Gaussian blur of σ = smooth·min(H, W) with zero padding: TorchRay's benchmark smooths
      extremal masks with 0.09), the first in raster order on ties;
    * its distance to a box is the Euclidean distance to the nearest point of the closed
      rectangle ``[xmin, xmax] × [ymin, ymax]`` (0 inside); its distance to the union of
      boxes is the minimum over the boxes; a hit when that distance is strictly below the
      tolerance (15 px). For integer boxes this equals TorchRay's test (some box pixel
      within the tolerance of the point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .perturbations import smooth_zero_padded
from .seeding import image_seed

__all__ = [
    "CurveProtocol",
    "saliency_order",
    "deletion_substrate",
    "insertion_substrate",
    "rise_kernel1d",
    "perturbation_curves",
    "auc",
    "pointing_points",
    "center_points",
    "pointing_hits",
    "pointing_game",
    "pointing_energy",
    "box_coverage",
    "center_saliency",
    "random_saliency",
    "image_seed",
]

_MODES = ("deletion", "insertion")


# --------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurveProtocol:
    """Parameters of the deletion / insertion games (DESIGN.md §4).

    step: pixels changed per step (at 224×224 the default gives 224 steps, 225 scores).
    blur_kernel, blur_sigma: the insertion start image's Gaussian blur (normalised space,
        zero padding).
    """

    step: int = 224
    blur_kernel: int = 11
    blur_sigma: float = 5.0

    def __post_init__(self) -> None:
        if int(self.step) != self.step or self.step < 1:
            raise ValueError(f"step must be a positive integer, got {self.step!r}")
        if int(self.blur_kernel) != self.blur_kernel or self.blur_kernel < 1:
            raise ValueError(f"blur_kernel must be a positive integer, got {self.blur_kernel!r}")
        if self.blur_kernel % 2 != 1:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        if not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma!r}")

    def n_steps(self, n_pixels: int) -> int:
        """Number of steps N for an image of ``n_pixels`` pixels: ceil(n_pixels / step)."""
        return -(-int(n_pixels) // int(self.step))

    def describe(self) -> str:
        """One line naming the protocol, for reports."""
        return (
            f"RISE deletion/insertion: {self.step} px per step, most salient first "
            f"(ties by raster index); deletion substrate = normalisation mean; insertion "
            f"start = blur with RISE's gkern({self.blur_kernel}, {self.blur_sigma:g}) "
            f"in normalised space, zero padding; score = softmax "
            f"probability of the target; AUC = trapezoid on [0, 1]"
        )


def _as_bhw(saliency: Tensor, name: str = "saliency") -> Tensor:
    """Accept B×h×w or B×1×h×w; return B×h×w."""
    if not isinstance(saliency, Tensor):
        saliency = torch.as_tensor(saliency)
    if saliency.dim() == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if saliency.dim() != 3:
        raise ValueError(f"{name} must be B×h×w (or B×1×h×w), got shape {tuple(saliency.shape)}")
    return saliency


def _float(t: Tensor) -> Tensor:
    """Float64 stays float64; anything else becomes float32."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _resize(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """B×h×w -> B×H×W, bilinear, align_corners=False (identity at the same size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(saliency.shape[-2:]) == size:
        return saliency
    return F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _check_finite(saliency: Tensor) -> None:
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency contains NaN or infinite values")


def saliency_order(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixel indices of an H×W image, most salient first.

    ``saliency`` (B×h×w, or B×1×h×w) is resized bilinearly (align_corners=False) to
    ``size`` = (H, W) and flattened in raster order. Returns a B×(H·W) long tensor; equal
    values keep raster order (stable sort), so ties go to the lower index first.
    """
    saliency = _float(_as_bhw(saliency))
    _check_finite(saliency)
    up = _resize(saliency, size)
    return torch.sort(up.flatten(1), dim=1, descending=True, stable=True).indices


def _norm_stats(model, images: Tensor) -> tuple[Tensor, Tensor]:
    c = images.shape[1]
    mean = torch.as_tensor(model.mean).to(device=images.device, dtype=images.dtype).reshape(-1)
    std = torch.as_tensor(model.std).to(device=images.device, dtype=images.dtype).reshape(-1)
    if mean.numel() != c or std.numel() != c:
        raise ValueError(
            f"model.mean / model.std have {mean.numel()} / {std.numel()} values, "
            f"images have {c} channels"
        )
    return mean.view(1, c, 1, 1), std.view(1, c, 1, 1)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError("images must be a B×3×H×W tensor")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")


def deletion_substrate(model, images: Tensor) -> Tensor:
    """The deletion substrate: every pixel set to the normalisation mean colour.

    This is "zero after the model's normalisation". Returns a new B×3×H×W pixel tensor.
    """
    _check_images(images)
    mean, _ = _norm_stats(model, images)
    return mean.expand_as(images).clone()


def insertion_substrate(model, images: Tensor, protocol: CurveProtocol = CurveProtocol()) -> Tensor:
    """The insertion start image, in pixel space.

    ``unnormalise(blur(normalise(images)))`` where normalise is ``(x - mean) / std`` with the
    model's ``mean`` / ``std``, and blur is a per-channel ``blur_kernel``×``blur_kernel``
    Gaussian (σ = ``blur_sigma``) with zero padding, i.e. pixels outside the image count as
    the mean colour. Returns a B×3×H×W tensor.
    """
    _check_images(images)
    mean, std = _norm_stats(model, images)
    c = images.shape[1]
    k = protocol.blur_kernel
    g = rise_kernel1d(k, protocol.blur_sigma)
    weight = (g[:, None] * g[None, :]).to(device=images.device, dtype=torch.float32)
    weight = weight.to(images.dtype).expand(c, 1, k, k).contiguous()
    z = (images - mean) / std
    z = F.conv2d(z, weight, padding=k // 2, groups=c)
    return z * std + mean


def rise_kernel1d(size: int, sigma: float) -> Tensor:
    """One axis of RISE's ``gkern(size, sigma)``: a delta at the centre of `size` samples,
    filtered as scipy.ndimage.gaussian_filter1d does by default (taps
    exp(−x²/2σ²) normalised over |x| ≤ ⌊4σ + 0.5⌋, borders reflected about the half-sample:
    d c b a | a b c d | d c b a). Returns `size` float64 values; the 2-D kernel is their
    outer product, which RISE casts to float32.
    """
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 / sigma**2 * offsets**2)
    taps /= taps.sum()
    delta = np.zeros(size)
    delta[size // 2] = 1.0
    padded = np.pad(delta, radius, mode="symmetric")
    return torch.from_numpy(np.correlate(padded, taps, mode="valid"))


def _targets_tensor(targets, batch: int, device) -> Tensor:
    t = torch.as_tensor(targets, device=device).reshape(-1).to(torch.long)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} targets for {batch} images")
    return t


def perturbation_curves(
    model,
    images: Tensor,
    saliency: Tensor,
    targets,
    *,
    mode: str,
    protocol: CurveProtocol = CurveProtocol(),
    eval_batch_size: int = 256,
    on_chunk: Callable[[], None] | None = None,
) -> Tensor:
    """Deletion or insertion curves.

    mode 'deletion': start from the image and replace the most salient pixels first with
    the deletion substrate; mode 'insertion': start from the insertion substrate and put the
    most salient original pixels back first. Score k (k = 0..N, N =
    ``protocol.n_steps(H·W)``) is taken with the first ``min(k·step, H·W)`` pixels of
    :func:`saliency_order` changed.

    Returns B×(N+1) softmax probabilities of ``targets[b]`` (float64 for float64 images,
    float32 otherwise), on the images' device. The step images are built on the device from
    a per-pixel rank map (pixel p is changed at step k when rank(p) < k·step) and scored in
    chunks of ``eval_batch_size`` images under ``torch.inference_mode()``; the result does
    not depend on ``eval_batch_size`` beyond floating-point batching effects of the model.
    ``on_chunk`` is called after each chunk (a caller's stop check may raise there).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if int(eval_batch_size) < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    _check_images(images)
    b, _, h, w = images.shape
    saliency = _as_bhw(saliency)
    if saliency.shape[0] != b:
        raise ValueError(f"got {saliency.shape[0]} saliency maps for {b} images")
    device = images.device
    targets = _targets_tensor(targets, b, device)
    hw = h * w
    n = protocol.n_steps(hw)
    step = int(protocol.step)
    out_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32

    with torch.inference_mode():
        order = saliency_order(saliency.to(device), (h, w))
        # rank[b, p] = position of pixel p in image b's order.
        positions = torch.arange(hw, device=device).expand(b, hw)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        if mode == "deletion":
            # The substrate is one colour (1×3×1×1): broadcast it instead of gathering copies.
            start, finish = images, _norm_stats(model, images)[0]
        else:
            start, finish = insertion_substrate(model, images, protocol), images
        scores = _step_scores(
            model, start, finish, rank, targets, n, step, out_dtype, eval_batch_size, on_chunk
        )
    # A normal (non-inference) tensor, so callers may modify it in place.
    return scores.view(b, n + 1).clone()


def _step_scores(model, start, finish, rank, targets, n, step, out_dtype, chunk, on_chunk):
    """The b·(N+1) step images' target probabilities, built and scored `chunk` at a time:
    step k of image i shows `finish` where rank < k·step and `start` elsewhere (`finish` is
    one colour, 1×3×1×1, or B×3×H×W)."""
    b, _, h, w = start.shape
    one_colour = finish.shape[0] == 1 and finish.shape[-2:] == (1, 1)
    total = b * (n + 1)
    scores = []
    for lo in range(0, total, int(chunk)):
        flat = torch.arange(lo, min(lo + int(chunk), total), device=start.device)
        bi = torch.div(flat, n + 1, rounding_mode="floor")
        ki = flat - bi * (n + 1)
        changed = (rank[bi] < (ki * step)[:, None]).view(-1, 1, h, w)
        shown = finish if one_colour else finish[bi]
        x = torch.where(changed, shown, start[bi])
        probs = torch.softmax(model(x).to(out_dtype), dim=1)
        scores.append(probs.gather(1, targets[bi][:, None])[:, 0])
        if on_chunk is not None:
            on_chunk()
    return torch.cat(scores)


def auc(curves: Tensor) -> Tensor:
    """Area under curve(s) of N+1 scores on x in [0, 1] (trapezoid rule).

    ``(sum(s) - s_0/2 - s_N/2) / N`` along the last dimension: B×(N+1) -> B (or a scalar
    for a single curve).
    """
    curves = torch.as_tensor(curves)
    if not curves.is_floating_point():
        curves = curves.to(torch.float64)
    if curves.dim() == 0 or curves.shape[-1] < 2:
        raise ValueError("auc needs at least 2 scores per curve")
    n = curves.shape[-1] - 1
    return (curves.sum(-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / n


# --------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------


def _sizes(original_sizes, batch: int) -> list[tuple[int, int]]:
    sizes = [(int(wh[0]), int(wh[1])) for wh in original_sizes]
    if len(sizes) != batch:
        raise ValueError(f"got {len(sizes)} original sizes for {batch} images")
    for wd, ht in sizes:
        if wd < 1 or ht < 1:
            raise ValueError(f"original size must be positive (width, height), got {(wd, ht)}")
    return sizes


def _boxes(boxes, batch: int) -> list[Tensor | None]:
    if len(boxes) != batch:
        raise ValueError(f"got {len(boxes)} box lists for {batch} images")
    out: list[Tensor | None] = []
    for bx in boxes:
        if bx is None:
            out.append(None)
            continue
        t = torch.as_tensor(bx, dtype=torch.float64, device="cpu").reshape(-1, 4)
        if t.numel() == 0:
            out.append(None)
            continue
        if bool((t[:, 0] > t[:, 2]).any() or (t[:, 1] > t[:, 3]).any()):
            raise ValueError(f"boxes must be (xmin, ymin, xmax, ymax) with min <= max, got {t}")
        out.append(t)
    return out


def _groups_by_size(sizes: list[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return groups


def pointing_points(saliency: Tensor, original_sizes, smooth: float = 0.0) -> Tensor:
    """The point each saliency map chooses, in its image's original pixel grid.

    Each map is resized bilinearly (align_corners=False) to its (width, height), blurred
    when smooth > 0 (σ = smooth·min(width, height), TorchRay's imsmooth with zero padding, as
    its benchmark does to extremal masks with 0.09), and its maximum taken, the first in
    raster order on ties. Returns a B×2 float64 tensor of (x = column, y = row) on the CPU.
    """
    saliency = _float(_as_bhw(saliency))
    _check_finite(saliency)
    b = saliency.shape[0]
    sizes = _sizes(original_sizes, b)
    points = torch.empty(b, 2, dtype=torch.float64)
    for (wd, ht), idx in _groups_by_size(sizes).items():
        sel = torch.as_tensor(idx, device=saliency.device)
        resized = _resize(saliency[sel], (ht, wd))
        if smooth > 0:
            resized = smooth_zero_padded(resized[:, None], smooth * min(ht, wd))[:, 0]
        flat = resized.flatten(1)
        top = flat.max(dim=1, keepdim=True).values
        raster = torch.arange(flat.shape[1], device=flat.device).expand_as(flat)
        first = torch.where(flat == top, raster, flat.shape[1]).min(dim=1).values.cpu()
        points[torch.as_tensor(idx), 0] = (first % wd).to(torch.float64)
        points[torch.as_tensor(idx), 1] = torch.div(first, wd, rounding_mode="floor").double()
    return points


def center_points(original_sizes) -> Tensor:
    """The image centres ((width-1)/2, (height-1)/2) in pixel-index coordinates: B×2 (x, y).

    The pointing game's centre baseline (DESIGN.md §4): pass them to :func:`pointing_hits`.
    """
    sizes = [(int(wh[0]), int(wh[1])) for wh in original_sizes]
    return torch.tensor(
        [((wd - 1) / 2.0, (ht - 1) / 2.0) for wd, ht in sizes], dtype=torch.float64
    ).reshape(-1, 2)


def pointing_hits(points: Tensor, boxes, *, tolerance: float = 15.0) -> Tensor:
    """Hit (1.0) / miss (0.0) for given points; NaN for an image without boxes.

    ``points`` B×2 (x, y) in original pixels; ``boxes`` a list of K×4 tensors
    (xmin, ymin, xmax, ymax), 0-based inclusive pixel coordinates. A hit when the
    Euclidean distance from the point to the nearest box rectangle is < ``tolerance``.
    Returns a float32 tensor of length B on the CPU.
    """
    pts = torch.as_tensor(points, dtype=torch.float64).detach().cpu().reshape(-1, 2)
    b = pts.shape[0]
    bxs = _boxes(boxes, b)
    out = torch.full((b,), float("nan"), dtype=torch.float32)
    tol2 = float(tolerance) ** 2
    for i, bx in enumerate(bxs):
        if bx is None:
            continue
        x, y = pts[i, 0], pts[i, 1]
        dx = torch.clamp(torch.maximum(bx[:, 0] - x, x - bx[:, 2]), min=0.0)
        dy = torch.clamp(torch.maximum(bx[:, 1] - y, y - bx[:, 3]), min=0.0)
        out[i] = float(bool(((dx * dx + dy * dy) < tol2).any()))
    return out


def pointing_game(saliency: Tensor, boxes, original_sizes, *, tolerance: float = 15.0) -> Tensor:
    """Pointing game per image: 1.0 hit, 0.0 miss, NaN when the image has no boxes.

    ``saliency`` B×h×w; ``boxes`` a list (length B) of K×4 tensors (xmin, ymin, xmax, ymax)
    of the target class only, 0-based inclusive pixel coordinates of the original image;
    ``original_sizes`` a list of (width, height). The point is the argmax of the saliency
    resized to the original size (first in raster order on ties); a hit when it lies
    strictly within ``tolerance`` px (Euclidean) of the union of boxes. Returns a float32
    tensor of length B on the saliency's device.
    """
    saliency = _as_bhw(saliency)
    b = saliency.shape[0]
    bxs = _boxes(boxes, b)
    _sizes(original_sizes, b)
    out = torch.full((b,), float("nan"), dtype=torch.float32)
    have = [i for i, bx in enumerate(bxs) if bx is not None]
    if have:
        sel = torch.as_tensor(have, device=saliency.device)
        pts = pointing_points(saliency[sel], [original_sizes[i] for i in have])
        out[torch.as_tensor(have)] = pointing_hits(pts, [bxs[i] for i in have], tolerance=tolerance)
    return out.to(saliency.device)


def _box_masks(bxs: list[Tensor], wd: int, ht: int, device) -> Tensor:
    """G×ht×wd bool: pixel (y, x) inside the union of each image's boxes."""
    ys = torch.arange(ht, device=device, dtype=torch.float64).view(1, ht, 1)
    xs = torch.arange(wd, device=device, dtype=torch.float64).view(1, 1, wd)
    masks = []
    for bx in bxs:
        t = bx.to(device).view(-1, 4, 1, 1)
        inside = (xs >= t[:, 0]) & (xs <= t[:, 2]) & (ys >= t[:, 1]) & (ys <= t[:, 3])
        masks.append(inside.any(dim=0))
    return torch.stack(masks)


def pointing_energy(saliency: Tensor, boxes, original_sizes) -> Tensor:
    """Energy-based pointing game: the fraction of saliency mass inside the boxes.

    The saliency is resized bilinearly to each original size and clamped at 0; the score
    is sum(saliency inside the union of boxes) / sum(saliency), with "inside" as in
    :func:`pointing_game` (0-based inclusive pixel boxes). NaN when the image has no boxes,
    or when its saliency has no positive mass. Returns a float32 tensor of length B on the
    saliency's device.
    """
    saliency = _float(_as_bhw(saliency))
    _check_finite(saliency)
    b = saliency.shape[0]
    bxs = _boxes(boxes, b)
    sizes = _sizes(original_sizes, b)
    out = torch.full((b,), float("nan"), dtype=torch.float64, device=saliency.device)
    have = [i for i, bx in enumerate(bxs) if bx is not None]
    groups = _groups_by_size([sizes[i] for i in have])
    for (wd, ht), local in groups.items():
        idx = [have[j] for j in local]
        sel = torch.as_tensor(idx, device=saliency.device)
        up = _resize(saliency[sel], (ht, wd)).clamp(min=0).to(torch.float64)
        inside = _box_masks([bxs[i] for i in idx], wd, ht, saliency.device)
        out[sel] = (up * inside).sum(dim=(1, 2)) / up.sum(dim=(1, 2))
    return out.to(torch.float32)


# DESIGN.md §4's "small objects": the target's boxes cover less than this share of the image
SMALL_OBJECT_COVERAGE = 0.25
# TorchRay's benchmark blurs extremal masks with σ = 0.09·min(H, W) before the argmax
TORCHRAY_POINTING_SMOOTH = 0.09


def box_coverage(boxes, original_sizes) -> Tensor:
    """Fraction of each image's pixels inside the union of its boxes (NaN without boxes).

    Same pixel convention as :func:`pointing_game`. DESIGN.md §4's "small objects" subset
    is ``box_coverage(...) < SMALL_OBJECT_COVERAGE``. Returns float32 of length B on the CPU.
    """
    sizes = [(int(wh[0]), int(wh[1])) for wh in original_sizes]
    bxs = _boxes(boxes, len(sizes))
    out = torch.full((len(sizes),), float("nan"), dtype=torch.float32)
    for i, (bx, (wd, ht)) in enumerate(zip(bxs, sizes, strict=True)):
        if bx is not None:
            out[i] = _box_masks([bx], wd, ht, "cpu").double().mean().float()
    return out


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


def center_saliency(
    batch: int,
    size: tuple[int, int],
    sigma_fraction: float = 0.25,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Centred Gaussian baseline, B×h×w (``size`` = (h, w)), peak 1 at the centre.

    Pixel (i, j) has centre ((i + 0.5)/h, (j + 0.5)/w) in unit coordinates; the value is
    exp(-((u - 0.5)² + (v - 0.5)²) / (2 σ²)) with σ = ``sigma_fraction`` of each side (so
    the map stretches with the image). For the pointing game's centre baseline prefer
    :func:`center_points`: an even-sized map has a flat top of tied maxima whose
    first-in-raster-order pixel sits a little above-left of the true centre.
    """
    h, w = int(size[0]), int(size[1])
    if sigma_fraction <= 0:
        raise ValueError(f"sigma_fraction must be > 0, got {sigma_fraction}")
    v = (torch.arange(h, dtype=torch.float64) + 0.5) / h - 0.5
    u = (torch.arange(w, dtype=torch.float64) + 0.5) / w - 0.5
    g = torch.exp(-(v[:, None] ** 2 + u[None, :] ** 2) / (2.0 * float(sigma_fraction) ** 2))
    return g.to(dtype=dtype, device=device).expand(int(batch), h, w).clone()


def random_saliency(
    image_ids: Sequence,
    size: tuple[int, int],
    seed: int = 0,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform-noise baseline, len(image_ids)×h×w, values in [0, 1).

    Image i's map comes from a CPU ``torch.Generator`` seeded with
    :func:`image_seed` (seed, image_ids[i]), so it is the same whatever batch (or device)
    the image is scored in. Ints from a tensor of ids are accepted.
    """
    if isinstance(image_ids, Tensor):
        image_ids = image_ids.reshape(-1).tolist()
    h, w = int(size[0]), int(size[1])
    maps = []
    for image_id in image_ids:
        g = torch.Generator(device="cpu").manual_seed(image_seed(seed, image_id))
        maps.append(torch.rand(h, w, generator=g, dtype=torch.float64))
    if not maps:
        return torch.empty(0, h, w, dtype=dtype, device=device)
    return torch.stack(maps).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# Everything at once, for one batch
# --------------------------------------------------------------------------------------


def score_saliency(
    model,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    boxes: Sequence,
    original_sizes: Sequence,
    *,
    protocol: CurveProtocol = CurveProtocol(),
    tolerance: float = 15.0,
    eval_batch_size: int = 256,
    points: Tensor | None = None,
    smooth: float = 0.0,
    on_chunk: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """Deletion and insertion curves and AUCs, pointing hit and energy for one batch.

    images B×3×H×W pixels; saliency B×h×w (higher = more important); boxes: per image a
    K×4 tensor of the target class's boxes or None; original_sizes: (width, height) per
    image. `points` (B×2, x/y in original pixels) replaces the saliency's argmax in the
    pointing game (the centre baseline points at the image centre); `smooth` blurs the
    map before its argmax (pointing_points); `on_chunk` as in perturbation_curves. Returns
    CPU tensors:
    deletion_curve, insertion_curve (B×(N+1)), deletion_auc, insertion_auc, pointing_hit,
    pointing_energy (B; NaN where an image has no boxes).
    """
    columns = {}
    for mode in _MODES:
        curves = perturbation_curves(
            model,
            images,
            saliency,
            targets,
            mode=mode,
            protocol=protocol,
            eval_batch_size=eval_batch_size,
            on_chunk=on_chunk,
        )
        columns[f"{mode}_curve"] = curves.float().cpu()
        columns[f"{mode}_auc"] = auc(curves).float().cpu()
    if points is None:
        points = pointing_points(saliency, original_sizes, smooth)
    columns["pointing_hit"] = pointing_hits(points, boxes, tolerance=tolerance)
    columns["pointing_energy"] = pointing_energy(saliency, boxes, original_sizes).float().cpu()
    return columns
