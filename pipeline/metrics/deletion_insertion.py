"""Saliency metrics: deletion / insertion curves, their AUC, the baseline maps, and every
metric of a batch at once (docs/design.md §4).

Pure tensor functions: no file I/O, batched, and device-agnostic (everything runs on the
device of the images).

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

The pointing game and the box helpers are in pipeline.metrics.pointing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.seeding import image_seed
from .maps import as_bhw, as_float, check_finite, check_fits, resize_maps
from .pointing import POINTING_TOLERANCE, pointing_energy, pointing_hits, pointing_points

__all__ = [
    "CurveProtocol",
    "saliency_order",
    "deletion_substrate",
    "insertion_substrate",
    "rise_kernel1d",
    "perturbation_curves",
    "auc",
    "center_saliency",
    "random_saliency",
    "score_saliency",
]

_MODES = ("deletion", "insertion")


# --------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurveProtocol:
    """Parameters of the deletion / insertion games (docs/design.md §4).

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


def saliency_order(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixel indices of an H×W image, most salient first.

    ``saliency`` (B×h×w, or B×1×h×w) is resized bilinearly (align_corners=False) to
    ``size`` = (H, W) and flattened in raster order. Returns a B×(H·W) long tensor; equal
    values keep raster order (stable sort), so ties go to the lower index first.
    """
    saliency = as_float(as_bhw(saliency))
    check_finite(saliency)
    up = resize_maps(saliency, size)
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
    saliency = as_bhw(saliency)
    check_fits(saliency, images)
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
    tolerance: float = POINTING_TOLERANCE,
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
