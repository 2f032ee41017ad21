"""Saliency maps as every metric takes them: B×h×w (or B×1×h×w), finite, float, resized
bilinearly with align_corners=False."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def as_bhw(saliency: Tensor, name: str = "saliency") -> Tensor:
    """Accept B×h×w or B×1×h×w; return B×h×w."""
    if not isinstance(saliency, Tensor):
        saliency = torch.as_tensor(saliency)
    if saliency.dim() == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if saliency.dim() != 3:
        raise ValueError(f"{name} must be B×h×w (or B×1×h×w), got shape {tuple(saliency.shape)}")
    return saliency


def as_float(t: Tensor) -> Tensor:
    """Float64 stays float64; anything else becomes float32."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def resize_maps(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """B×h×w -> B×H×W, bilinear, align_corners=False (identity at the same size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(saliency.shape[-2:]) == size:
        return saliency
    return F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def same_aspect(map_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether an h×w map covers an H×W image without stretching: h/w = H/W to within one
    cell of the map (|h − w·H/W| ≤ 1 or |w − h·W/H| ≤ 1), as a coarse grid's rounding gives."""
    (h, w), (big_h, big_w) = (int(v) for v in map_size), (int(v) for v in image_size)
    return abs(h - w * big_h / big_w) <= 1.0 or abs(w - h * big_w / big_h) <= 1.0


def check_fits(saliency: Tensor, images: Tensor) -> None:
    """ValueError unless saliency B×h×w has one map per image of B×C×H×W with H×W's aspect
    ratio (a map of another shape would be stretched over its image)."""
    b, (h, w) = images.shape[0], tuple(images.shape[-2:])
    if saliency.shape[0] != b:
        raise ValueError(f"got {saliency.shape[0]} saliency maps for {b} images")
    if not same_aspect(tuple(saliency.shape[-2:]), (h, w)):
        raise ValueError(
            f"saliency maps of {saliency.shape[-2]}×{saliency.shape[-1]} do not fit images of "
            f"{h}×{w} (another aspect ratio)"
        )


def check_finite(saliency: Tensor) -> None:
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency contains NaN or infinite values")
