"""Perturbation substrates: what a masked-out pixel is replaced with.

Every function here works in pixel space (float tensors in [0, 1], shape B×3×H×W) so that a
substrate means the same thing for every model; the model wrapper normalises afterwards.
A substrate is computed once per batch, on the batch's device, and reused by every iteration
of the mask optimisation.

Besides the single substrates p(x) of `make_substrate`, `blur_pyramid` / `apply_blur_pyramid`
give the mask-dependent blur of extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019):
the blur strength at each pixel is a function of the mask value there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import SettingsError

SUBSTRATES = ("blur-median", "blur", "constant", "noise")


def gaussian_kernel1d(
    kernel_size: int, sigma: float, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sampled Gaussian exp(-d²/2σ²), d = -(size//2)..size//2, normalised to sum 1 (computed
    in float64, returned in `dtype`)."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-(x**2) / (2.0 * float(sigma) ** 2))
    return (taps / taps.sum()).to(dtype)


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
    x = _blur_axis(images, sigma, kernel_size, padding_mode, vertical=False)
    return _blur_axis(x, sigma, kernel_size, padding_mode, vertical=True)


def gaussian_blur_per_image(
    images: torch.Tensor,
    sigmas: Sequence[tuple[float, float]],
    kernel_size: int | None = None,
    padding_mode: str = "replicate",
) -> torch.Tensor:
    """Separable Gaussian blur with its own (σ_y, σ_x) for each image: B×C×H×W -> B×C×H×W.

    sigmas:      B pairs (σ_y, σ_x) in pixels; 0 leaves that axis unblurred.
    kernel_size: odd, for both axes; None: 2·ceil(3σ)+1 for each axis's σ.
    padding_mode: as gaussian_blur; "replicate" (the default) extends the edge pixels, the
                 border closest to Pillow's GaussianBlur.

    Used where a blur is defined in pixels of each image's original photo (the released
    code's σ 10, applied before resizing) and so differs per image and per axis once every
    image is resized to the same square. One image at a time, so image b's result does not
    depend on its batch neighbours.
    """
    if len(sigmas) != images.shape[0]:
        raise ValueError(f"need one (σ_y, σ_x) per image: {len(sigmas)} for {images.shape[0]}")
    out = []
    for image, (sigma_y, sigma_x) in zip(images, sigmas, strict=True):
        x = _blur_axis(image[None], float(sigma_x), kernel_size, padding_mode, vertical=False)
        out.append(_blur_axis(x, float(sigma_y), kernel_size, padding_mode, vertical=True)[0])
    return torch.stack(out)


def _blur_axis(
    images: torch.Tensor, sigma: float, kernel_size: int | None, padding_mode: str, vertical: bool
) -> torch.Tensor:
    """1-D Gaussian blur of B×C×H×W along H (vertical) or W."""
    if sigma <= 0:
        return images
    batch, channels, height, width = images.shape
    size = kernel_size or default_kernel_size(sigma)
    if padding_mode == "reflect":
        size = _fit_kernel(size, height, width)
    taps = gaussian_kernel1d(size, sigma, device=images.device).to(images.dtype)
    pad, mode = size // 2, "constant" if padding_mode == "zeros" else padding_mode
    x = images.reshape(batch * channels, 1, height, width)
    if vertical:
        x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), taps.view(1, 1, -1, 1))
    else:
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), taps.view(1, 1, 1, -1))
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


def noise_substrate(
    images: torch.Tensor,
    sigma: float | Sequence[float] = 0.25,
    mean_colour: torch.Tensor | Sequence[float] | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pure Gaussian noise around a colour, clipped to [0, 1]: B×3×H×W.

    Pixel (b, c, y, x) = clip(μ_c + σ_c · ε, 0, 1), ε ~ N(0, 1) i.i.d. per pixel and channel:
    the image content is discarded (Fong & Vedaldi 2017's "noise" perturbation, where masked
    pixels are replaced by i.i.d. noise samples). μ = mean_colour (3 values, e.g. the model's
    normalisation mean; default 0.5 grey); σ is a scalar or 3 values in pixel units (default 0.25,
    about the per-channel std of ImageNet pixels, i.e. roughly unit-variance noise after the usual
    normalisation). Clipping makes the actual std a little smaller than σ.

    generators: one torch.Generator per image, on the images' device; image b's noise is drawn
    from generators[b] alone (exactly torch.randn(3, H, W, generator=generators[b])), so it does
    not depend on batch neighbours. None: the global RNG, which is NOT batch invariant.
    """
    batch = images.shape[0]
    if generators is not None and len(generators) != batch:
        raise ValueError(f"need one generator per image: {len(generators)} for {batch} images")
    mean = 0.5 if mean_colour is None else mean_colour
    mean = torch.as_tensor(mean, dtype=images.dtype).to(images.device).reshape(-1, 1, 1)
    scale = torch.as_tensor(sigma, dtype=images.dtype).to(images.device).reshape(-1, 1, 1)
    # contiguous, so that normal_ on noise[b] draws what torch.randn(3, H, W) would
    noise = torch.empty(images.shape, dtype=images.dtype, device=images.device)
    if generators is None:
        noise.normal_()
    else:
        for b, generator in enumerate(generators):
            noise[b].normal_(generator=generator)
    return (mean + scale * noise).clamp_(0.0, 1.0)


def make_substrate(
    images: torch.Tensor,
    kind: str,
    *,
    blur_sigma: float = 5.0,
    blur_kernel: int | None = 11,
    mean_colour: torch.Tensor | None = None,
    noise_sigma: float | Sequence[float] = 0.25,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """The perturbed image p(x) for a batch, B×3×H×W in pixel space.

    kind: "blur-median" (seed preset), "blur" (Gaussian, σ = blur_sigma; the paper's),
    "constant" (every pixel = mean_colour, shape (3,), e.g. the model's normalisation mean), or
    "noise" (see noise_substrate: N(mean_colour or 0.5, noise_sigma²) per pixel, clipped to
    [0, 1], drawn from the per-image `generators` when given).
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
    if kind == "noise":
        return noise_substrate(images, noise_sigma, mean_colour, generators)
    raise SettingsError(f"unknown perturbation {kind!r}; choose from {', '.join(SUBSTRATES)}")


# ----------------------------------------------------------------------------- TorchRay's blur
# The square root of 2 and the float32 epsilon, as TorchRay's imsmooth rounds them.
_SQRT2_F32 = torch.tensor(math.sqrt(2.0), dtype=torch.float32)
_EPS_F32 = torch.tensor(torch.finfo(torch.float32).eps, dtype=torch.float32)


def wide_gaussian_kernel1d(sigma: float | torch.Tensor, device=None) -> torch.Tensor:
    """The 1-D kernel of TorchRay's ``imsmooth``: taps i = −⌈4σ⌉..⌈4σ⌉,
    exp(−(i / (√2·σ + ε))²) normalised to sum 1, all in float32 (σ = 0 gives the identity [1])."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    half = math.ceil(4 * sigma)
    taps = torch.arange(-half, half + 1, dtype=torch.float32) / (_SQRT2_F32 * sigma + _EPS_F32)
    taps = torch.exp(-taps * taps)
    return (taps / taps.sum()).to(device)


def smooth_zero_padded(
    images: torch.Tensor, sigma: float | torch.Tensor, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian blur of B×C×H×W images as TorchRay's ``imsmooth`` computes it: the
    wide_gaussian_kernel1d taps, the columns first, then the rows, zero padding.

    fill: a colour (C values, or B×C×1×1) that stands for "zero" around the image: the blur is
    fill + blur(images − fill). With fill = the model's normalisation mean, this is TorchRay's
    blur of the normalised image (zero padding there) expressed in pixel space.
    """
    taps = wide_gaussian_kernel1d(sigma, images.device).to(images.dtype)
    if taps.numel() == 1:
        return images
    channels = images.shape[1]
    offset = None if fill is None else torch.as_tensor(fill).to(images).reshape(-1, channels, 1, 1)
    x = images if offset is None else images - offset
    pad = taps.numel() // 2
    x = F.conv2d(
        x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(pad, 0), groups=channels
    )
    x = F.conv2d(
        x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, pad), groups=channels
    )
    return x if offset is None else x + offset


# ----------------------------------------------------------------------------- blur pyramid
def blur_pyramid(
    images: torch.Tensor,
    max_sigma: float = 20.0,
    levels: int = 8,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Progressively blurred copies of a batch: L×B×3×H×W (L = levels ≥ 2), no gradient.

    Level l is blurred with σ_l = max_sigma · l / (L − 1): level 0 is the image itself (an
    exact copy), level L − 1 the strongest blur (σ = max_sigma). TorchRay's ``Perturbation``
    holds the same levels in reverse order.

    fill None: borders reflected, kernels ±3σ (shrunk to fit small images); mpbatch's own
    mask-dependent blur for the meaningful-perturbation method.
    fill a colour (3 values or B×3×1×1, the model's normalisation mean): exactly TorchRay's
    pyramid, σ_l = (1 − linspace(0, 1, L)) · max_sigma in float32 and smooth_zero_padded around
    that colour (TorchRay blurs the normalised image with zero padding).
    """
    if levels < 2:
        raise ValueError(f"a blur pyramid needs at least 2 levels, got {levels}")
    if max_sigma <= 0:
        raise ValueError(f"max_sigma must be positive, got {max_sigma}")
    with torch.no_grad():
        if fill is None:
            sigmas = [max_sigma * level / (levels - 1) for level in range(levels)]
            stack = [gaussian_blur(images, s) for s in sigmas]
        else:
            sigmas = ((1 - torch.linspace(0, 1, levels)) * max_sigma).flip(0)
            stack = [smooth_zero_padded(images, s, fill) for s in sigmas]
        return torch.stack(stack).detach()


def apply_blur_pyramid(
    pyramid: torch.Tensor,
    masks: torch.Tensor,
    image_index: torch.Tensor | None = None,
    torchray_ends: bool = False,
) -> torch.Tensor:
    """Blur each pixel by an amount set by its mask value: N×3×H×W, differentiable in the masks.

    pyramid:     L×B×3×H×W from blur_pyramid.
    masks:       N×1×H×W or N×H×W in [0, 1]; 1 = the pixel as it is, 0 = the strongest blur.
    image_index: N long, which pyramid image each mask applies to (several masks per image
                 without copying the pyramid); None: N = B and mask n applies to image n.

    The mask value m picks the fractional level t = m(L − 1) of TorchRay's order (0 = the
    strongest blur, L − 1 = the image), and the output interpolates linearly between levels
    ⌊t⌋ and ⌊t⌋ + 1 with weight t − ⌊t⌋. m = 1 returns the image exactly, m = 0 the strongest
    level exactly.

    torchray_ends False (mpbatch's own use): the gradient at m = 1 is one-sided, towards the
    next level, so a mask that starts at 1 can move (the meaningful-perturbation method starts
    there). True: at m = 1 the upper level is clamped to the image, so the gradient is zero
    there, exactly TorchRay's ``Perturbation.apply`` (extremal perturbations).
    """
    levels, batch, channels, height, width = pyramid.shape
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be N×1×H×W or N×H×W, got {tuple(masks.shape)}")
        masks = masks[:, 0]
    count = masks.shape[0]
    if masks.shape[-2:] != (height, width):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {height}×{width}")
    if image_index is None:
        if count != batch:
            raise ValueError(f"{count} masks for {batch} images; pass image_index")
        image_index = torch.arange(batch, device=masks.device)
    position = masks * (levels - 1)
    lower = position.detach().floor().clamp_(0, levels - (1 if torchray_ends else 2))
    weight = (position - lower).unsqueeze(1)  # N×1×H×W in [0, 1]
    # TorchRay's level k is this pyramid's level L − 1 − k
    below_level = (levels - 1 - lower).long()
    above_level = (below_level - 1).clamp_(min=0)
    flat = pyramid.reshape(levels * batch, channels, height * width)

    def gather(level: torch.Tensor) -> torch.Tensor:
        base = (level * batch + image_index.view(-1, 1, 1)).view(count, 1, height * width)
        index = base.expand(count, channels, height * width)
        return flat.gather(0, index).view(count, channels, height, width)

    return (1 - weight) * gather(below_level) + weight * gather(above_level)
