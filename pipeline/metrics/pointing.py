"""The pointing game and the boxes' helpers (docs/design.md §4).

Pure tensor functions, batched, on the saliency's device. Saliency is "higher = more
important", B×h×w (or B×1×h×w), finite, at any resolution; original sizes are (width,
height) per image; boxes are per image a K×4 tensor of the target class's boxes or None.

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

import torch
from torch import Tensor

from ..methods.perturbations import smooth_zero_padded
from .maps import as_bhw, as_float, check_finite, resize_maps

# A hit: the point lies within this many pixels (Euclidean, strict <) of a target box
# (Zhang et al. 2016; TorchRay's pointing_game.py)
POINTING_TOLERANCE = 15.0


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
    saliency = as_float(as_bhw(saliency))
    check_finite(saliency)
    b = saliency.shape[0]
    sizes = _sizes(original_sizes, b)
    points = torch.empty(b, 2, dtype=torch.float64)
    for (wd, ht), idx in _groups_by_size(sizes).items():
        sel = torch.as_tensor(idx, device=saliency.device)
        resized = resize_maps(saliency[sel], (ht, wd))
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

    The pointing game's centre baseline (docs/design.md §4): pass them to :func:`pointing_hits`.
    """
    sizes = [(int(wh[0]), int(wh[1])) for wh in original_sizes]
    return torch.tensor(
        [((wd - 1) / 2.0, (ht - 1) / 2.0) for wd, ht in sizes], dtype=torch.float64
    ).reshape(-1, 2)


def pointing_hits(points: Tensor, boxes, *, tolerance: float = POINTING_TOLERANCE) -> Tensor:
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


def pointing_game(
    saliency: Tensor, boxes, original_sizes, *, tolerance: float = POINTING_TOLERANCE
) -> Tensor:
    """Pointing game per image: 1.0 hit, 0.0 miss, NaN when the image has no boxes.

    ``saliency`` B×h×w; ``boxes`` a list (length B) of K×4 tensors (xmin, ymin, xmax, ymax)
    of the target class only, 0-based inclusive pixel coordinates of the original image;
    ``original_sizes`` a list of (width, height). The point is the argmax of the saliency
    resized to the original size (first in raster order on ties); a hit when it lies
    strictly within ``tolerance`` px (Euclidean) of the union of boxes. Returns a float32
    tensor of length B on the saliency's device.
    """
    saliency = as_bhw(saliency)
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
    saliency = as_float(as_bhw(saliency))
    check_finite(saliency)
    b = saliency.shape[0]
    bxs = _boxes(boxes, b)
    sizes = _sizes(original_sizes, b)
    out = torch.full((b,), float("nan"), dtype=torch.float64, device=saliency.device)
    have = [i for i, bx in enumerate(bxs) if bx is not None]
    groups = _groups_by_size([sizes[i] for i in have])
    for (wd, ht), local in groups.items():
        idx = [have[j] for j in local]
        sel = torch.as_tensor(idx, device=saliency.device)
        up = resize_maps(saliency[sel], (ht, wd)).clamp(min=0).to(torch.float64)
        inside = _box_masks([bxs[i] for i in idx], wd, ht, saliency.device)
        out[sel] = (up * inside).sum(dim=(1, 2)) / up.sum(dim=(1, 2))
    return out.to(torch.float32)


# docs/design.md §4's "small objects": the target's boxes cover less than this share of the image
SMALL_OBJECT_COVERAGE = 0.25
# TorchRay's benchmark blurs extremal masks with σ = 0.09·min(H, W) before the argmax
TORCHRAY_POINTING_SMOOTH = 0.09


def box_coverage(boxes, original_sizes) -> Tensor:
    """Fraction of each image's pixels inside the union of its boxes (NaN without boxes).

    Same pixel convention as :func:`pointing_game`. docs/design.md §4's "small objects" subset
    is ``box_coverage(...) < SMALL_OBJECT_COVERAGE``. Returns float32 of length B on the CPU.
    """
    sizes = [(int(wh[0]), int(wh[1])) for wh in original_sizes]
    bxs = _boxes(boxes, len(sizes))
    out = torch.full((len(sizes),), float("nan"), dtype=torch.float32)
    for i, (bx, (wd, ht)) in enumerate(zip(bxs, sizes, strict=True)):
        if bx is not None:
            out[i] = _box_masks([bx], wd, ht, "cpu").double().mean().float()
    return out
