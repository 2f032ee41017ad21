"""Perturbation substrates against direct computations."""

from __future__ import annotations

import torch

from pipeline.perturbations import gaussian_blur, gaussian_kernel1d, make_substrate, median_blur


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
