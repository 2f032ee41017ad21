"""Perturbation substrates against direct computations."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.perturbations import (
    SUBSTRATES,
    apply_blur_pyramid,
    blur_pyramid,
    gaussian_blur,
    gaussian_kernel1d,
    make_substrate,
    median_blur,
    noise_substrate,
)


def test_gaussian_kernel_sums_to_one_and_is_symmetric() -> None:
    taps = gaussian_kernel1d(11, 5.0)
    assert taps.sum().item() == torch.tensor(1.0).item() or abs(taps.sum().item() - 1) < 1e-6
    assert torch.allclose(taps, taps.flip(0))
    assert taps.argmax().item() == 5


def test_gaussian_blur_matches_direct_2d_convolution() -> None:
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(images, 1.5, 5, padding_mode="zeros")
    taps = gaussian_kernel1d(5, 1.5)
    kernel2d = torch.outer(taps, taps)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    expected = torch.zeros_like(images)
    for dy in range(5):
        for dx in range(5):
            expected += kernel2d[dy, dx] * padded[:, :, dy : dy + 12, dx : dx + 12]
    assert torch.allclose(blurred, expected, atol=1e-6)


def test_constant_image_is_unchanged_by_blurs() -> None:
    images = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(images, 5.0, 11), images, atol=1e-6)
    assert torch.allclose(median_blur(images, 11), images)


def test_median_blur_by_hand() -> None:
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 2] = 1.0  # a lone bright pixel is removed by a 3×3 median
    image[0, 0, 0:3, 4] = 1.0
    out = median_blur(image.expand(1, 3, 5, 5).contiguous(), 3)
    assert out[0, 0, 2, 2].item() == 0.0
    # pixel (1, 4): window rows 0..2, cols 3..4 plus the replicated col 4: five ones of nine
    assert out[0, 0, 1, 4].item() == 1.0


def test_substrates() -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    both = make_substrate(images, "blur-median", blur_sigma=2.0, blur_kernel=5)
    expected = 0.5 * (gaussian_blur(images, 2.0, 5) + median_blur(images, 5))
    assert torch.allclose(both, expected)
    constant = make_substrate(images, "constant", mean_colour=(0.1, 0.2, 0.3))
    assert torch.allclose(constant[1, :, 4, 7], torch.tensor([0.1, 0.2, 0.3]))


# ----------------------------------------------------------------------------- noise substrate
def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_noise_substrate_is_per_image_and_reproducible() -> None:
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    together = make_substrate(images, "noise", noise_sigma=0.1, generators=_generators([5, 6, 7]))
    alone = make_substrate(images[1:2], "noise", noise_sigma=0.1, generators=_generators([6]))
    assert torch.equal(together[1:2], alone)
    # image b's noise is exactly randn(3, H, W) from its own generator, around grey 0.5
    expected = 0.5 + 0.1 * torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(together[2], expected.clamp(0, 1))
    # the image content is discarded: another image with the same seed gets the same noise
    other = make_substrate(1 - images[1:2], "noise", noise_sigma=0.1, generators=_generators([6]))
    assert torch.equal(other, alone)
    assert "noise" in SUBSTRATES


def test_noise_substrate_statistics_and_range() -> None:
    images = torch.zeros(2, 3, 64, 64)
    colour = (0.2, 0.5, 0.8)
    noise = noise_substrate(images, (0.05, 0.1, 0.05), colour, _generators([1, 2]))
    assert noise.shape == images.shape and 0.0 <= noise.min() and noise.max() <= 1.0
    assert torch.allclose(noise.mean((0, 2, 3)), torch.tensor(colour), atol=0.01)
    assert torch.allclose(noise.std((0, 2, 3)), torch.tensor([0.05, 0.1, 0.05]), atol=0.01)
    clipped = noise_substrate(images, 2.0, None, _generators([1, 2]))
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    with pytest.raises(ValueError, match="one generator per image"):
        noise_substrate(images, 0.1, None, _generators([1]))


# ----------------------------------------------------------------------------- blur pyramid
def _pyramid_inputs(dtype: torch.dtype = torch.float32):
    images = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return images, blur_pyramid(images, max_sigma=4.0, levels=5)


def test_blur_pyramid_levels() -> None:
    images, pyramid = _pyramid_inputs()
    assert pyramid.shape == (5, 2, 3, 20, 20) and not pyramid.requires_grad
    assert torch.equal(pyramid[0], images)
    for level in range(1, 5):
        assert torch.allclose(pyramid[level], gaussian_blur(images, 4.0 * level / 4))
    # blur only ever removes detail: total variation falls level by level
    tv = [(p[..., 1:] - p[..., :-1]).abs().sum().item() for p in pyramid]
    assert tv == sorted(tv, reverse=True)
    with pytest.raises(ValueError, match="2 levels"):
        blur_pyramid(images, levels=1)


def test_apply_blur_pyramid_ends_and_interpolation() -> None:
    images, pyramid = _pyramid_inputs()
    ones = torch.ones(2, 1, 20, 20)
    assert torch.equal(apply_blur_pyramid(pyramid, ones), images)
    assert torch.equal(apply_blur_pyramid(pyramid, torch.zeros(2, 20, 20)), pyramid[-1])
    # m = 1 − l/(L − 1) lands on level l; m = 0.5 with 5 levels is halfway between levels 1, 2
    for level in range(5):
        out = apply_blur_pyramid(pyramid, ones * (1 - level / 4))
        assert torch.allclose(out, pyramid[level], atol=1e-6)
    half = apply_blur_pyramid(pyramid, ones * 0.625)
    assert torch.allclose(half, 0.5 * (pyramid[1] + pyramid[2]), atol=1e-6)
    # a per-pixel mask mixes levels pixel by pixel
    mask = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    position = (1 - mask) * 4
    lower = position.floor().clamp(max=3).long()
    frac = position - lower
    stack = pyramid.permute(1, 0, 2, 3, 4)  # B×L×3×H×W
    pick = lower.unsqueeze(1).expand(2, 1, 3, 20, 20)
    expected = (1 - frac) * stack.gather(1, pick)[:, 0] + frac * stack.gather(1, pick + 1)[:, 0]
    assert torch.allclose(apply_blur_pyramid(pyramid, mask), expected, atol=1e-6)


def test_apply_blur_pyramid_several_masks_per_image() -> None:
    images, pyramid = _pyramid_inputs()
    masks = torch.rand(5, 1, 20, 20, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 0, 1, 1, 1])
    out = apply_blur_pyramid(pyramid, masks, index)
    expected = apply_blur_pyramid(pyramid[:, index], masks)
    assert out.shape == (5, 3, 20, 20) and torch.equal(out, expected)
    with pytest.raises(ValueError, match="image_index"):
        apply_blur_pyramid(pyramid, masks)


def test_apply_blur_pyramid_is_differentiable() -> None:
    images, pyramid = _pyramid_inputs(torch.float64)
    masks = torch.rand(
        2, 1, 20, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    masks = (0.02 + 0.96 * masks).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: apply_blur_pyramid(pyramid, m), (masks,))
    # the gradient does not vanish at the ends (one-sided there): m = 1 and m = 0 can move
    for value in (0.0, 1.0):
        ends = torch.full((2, 1, 20, 20), value, dtype=torch.float64, requires_grad=True)
        (apply_blur_pyramid(pyramid, ends) * images).sum().backward()
        assert ends.grad.abs().sum() > 0
    # TorchRay's arithmetic: the upper level is clamped to the image, so m = 1 has no gradient
    ones = torch.ones(2, 1, 20, 20, dtype=torch.float64, requires_grad=True)
    (apply_blur_pyramid(pyramid, ones, torchray_ends=True) * images).sum().backward()
    assert torch.equal(ones.grad, torch.zeros_like(ones))
