"""Perturbation substrates: what a masked-out pixel is replaced with.

Every function here works in pixel space (float tensors in [0, 1], shape B×3×H×W) so that a
substrate means the same thing for every model; the model wrapper normalises afterwards.
A substrate is computed once per batch, on the batch's device, and reused by every iteration
of the mask optimisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SUBSTRATES = ("blur-median", "blur", "constant")


def gaussian_kernel1d(kernel_size: int, sigma: float, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, shape (kernel_size,), summing to 1."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (taps / taps.sum()).to(torch.float32)


def default_kernel_size(sigma: float) -> int:
    """An odd kernel wide enough for a Gaussian of this sigma (±3σ)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def _fit_kernel(kernel_size: int, height: int, width: int) -> int:
    """Shrink a kernel so that reflect padding stays valid on small images."""
    largest = 2 * (min(height, width) - 1) + 1
    return max(1, min(kernel_size, largest))


def gaussian_blur(
    images: torch.Tensor,
    sigma: float,
    kernel_size: int | None = None,
    padding_mode: str = "reflect",
) -> torch.Tensor:
    """Separable Gaussian blur of B×C×H×W images.

    `padding_mode` is passed to F.pad: "reflect" (OpenCV's default border, what the seed
    used), "replicate", or "zeros" (constant 0).
    """
    if sigma <= 0:
        return images
    batch, channels, height, width = images.shape
    kernel_size = kernel_size or default_kernel_size(sigma)
    if padding_mode == "reflect":
        kernel_size = _fit_kernel(kernel_size, height, width)
    taps = gaussian_kernel1d(kernel_size, sigma, device=images.device).to(images.dtype)
    pad = kernel_size // 2
    mode = "constant" if padding_mode == "zeros" else padding_mode
    x = images.reshape(batch * channels, 1, height, width)
    x = F.pad(x, (pad, pad, 0, 0), mode=mode)
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad, pad), mode=mode)
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return x.reshape(batch, channels, height, width)


def median_blur(images: torch.Tensor, kernel_size: int = 11) -> torch.Tensor:
    """Median over a kernel_size² window (replicate border, as OpenCV's medianBlur).

    Processed one image at a time: the unfolded windows of one 224² image are ~70 MB.
    """
    batch, channels, height, width = images.shape
    kernel_size = _fit_kernel(kernel_size, height, width)
    pad = kernel_size // 2
    out = torch.empty_like(images)
    for b in range(batch):
        padded = F.pad(images[b : b + 1], (pad, pad, pad, pad), mode="replicate")
        windows = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)
        windows = windows.reshape(1, channels, height, width, kernel_size * kernel_size)
        out[b] = windows.median(dim=-1).values[0]
    return out


def blur_median_substrate(
    images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0
) -> torch.Tensor:
    """The seed README's perturbation: mean of an 11×11 Gaussian (σ 5) and an 11×11 median blur."""
    return 0.5 * (gaussian_blur(images, sigma, kernel_size) + median_blur(images, kernel_size))


def make_substrate(
    images: torch.Tensor,
    kind: str,
    *,
    blur_sigma: float = 5.0,
    blur_kernel: int | None = 11,
    mean_colour: torch.Tensor | None = None,
) -> torch.Tensor:
    """The perturbed image p(x) for a batch, B×3×H×W in pixel space.

    kind: "blur-median" (seed preset), "blur" (Gaussian, σ = blur_sigma; the paper's), or
    "constant" (every pixel = mean_colour, shape (3,), e.g. the model's normalisation mean).
    """
    if kind == "blur-median":
        return blur_median_substrate(images, blur_kernel or 11, blur_sigma)
    if kind == "blur":
        return gaussian_blur(images, blur_sigma, blur_kernel)
    if kind == "constant":
        if mean_colour is None:
            raise ValueError("the constant substrate needs mean_colour")
        colour = torch.as_tensor(mean_colour).to(images).view(1, 3, 1, 1)
        return colour.expand_as(images).clone()
    raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(SUBSTRATES)}")
