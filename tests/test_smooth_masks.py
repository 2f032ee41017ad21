"""pipeline/methods/extremal/mask_generators.py: the fast generator makes the reference
generator's masks and gradients (equal to float32 rounding) on every geometry, and falls back
to it where its cell/offset decomposition does not hold. The reference itself is checked
against TorchRay in test_extremal_torchray.py and by hand in test_extremal.py."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.extremal.mask_generators import FastMaskGenerator, MaskGenerator

GEOMETRIES = [
    # size, step, sigma, temperature, margin
    ((24, 24), 3, 4.0, 0.05, None),
    ((30, 41), 3, 4.0, 0.05, None),  # not square, a partial last cell
    ((32, 32), 2, 3.0, 0.05, None),  # the published settings scaled to 32²
    ((32, 32), 4, 4.0, 0.01, 0.0),  # colder smooth max, no margin
    ((56, 48), 7, 21.0, 0.05, None),  # the published step and σ: 81 taps
]


def _params(count: int, grid: tuple[int, int], seed: int, spread: float = 1.0) -> torch.Tensor:
    values = torch.rand(count, *grid, generator=torch.Generator().manual_seed(seed))
    return (values - 0.5) * spread + 0.5


def _masks_and_gradient(generator, params: torch.Tensor, weights: torch.Tensor):
    params = params.clone().requires_grad_(True)
    masks = generator(params)
    (masks * weights).sum().backward()
    return masks.detach(), params.grad


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-step{g[1]}-T{g[3]}")
@pytest.mark.parametrize("spread", [1.0, 3.0], ids=["params-in-0-1", "params-beyond"])
def test_fast_generator_equals_the_reference(geometry, spread: float) -> None:
    size, step, sigma, temperature, margin = geometry
    reference = MaskGenerator(size, step, sigma, temperature, "cpu", margin)
    fast = FastMaskGenerator(size, step, sigma, temperature, "cpu", margin)
    assert fast._reference is None  # the decomposition itself is under test
    assert (fast.grid, fast.extended, fast.offset) == (
        reference.grid,
        reference.extended,
        reference.offset,
    )
    params = _params(3, reference.grid, seed=step, spread=spread)
    weights = torch.randn(3, *reference.extended, generator=torch.Generator().manual_seed(9))
    expected, expected_gradient = _masks_and_gradient(reference, params, weights)
    masks, gradient = _masks_and_gradient(fast, params, weights)
    assert masks.shape == expected.shape
    assert (masks - expected).abs().max().item() <= 1e-5
    scale = expected_gradient.abs().max().item()
    assert scale > 0
    assert (gradient - expected_gradient).abs().max().item() <= 1e-4 * scale
    assert torch.equal(
        fast.crop(masks),
        masks[:, fast.offset : fast.offset + size[0]][:, :, fast.offset : fast.offset + size[1]],
    )


def test_offsets_per_pass_only_changes_the_order() -> None:
    params = _params(2, (8, 8), seed=4)
    passes = [
        FastMaskGenerator((24, 24), 3, 4.0, 0.05, "cpu", offsets_per_pass=n) for n in (1, 4, 9)
    ]
    masks = [generator(params) for generator in passes]
    for other in masks[1:]:
        assert (other - masks[0]).abs().max().item() <= 1e-6


def test_a_hard_max_runs_the_reference() -> None:
    """T = 0 is a plain max, which the per-offset smooth max does not compute."""
    params = _params(2, (8, 8), seed=5)
    fast = FastMaskGenerator((24, 24), 3, 4.0, 0.0, "cpu")
    assert fast._reference is not None
    assert torch.equal(fast(params), MaskGenerator((24, 24), 3, 4.0, 0.0, "cpu")(params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_generator_on_cuda_equals_the_reference_on_cpu() -> None:
    size, step, sigma, temperature, margin = GEOMETRIES[-1]
    reference = MaskGenerator(size, step, sigma, temperature, "cpu", margin)
    fast = FastMaskGenerator(size, step, sigma, temperature, "cuda", margin)
    assert fast.offsets_per_pass == 7
    params = _params(4, reference.grid, seed=11)
    weights = torch.randn(4, *reference.extended, generator=torch.Generator().manual_seed(12))
    expected, expected_gradient = _masks_and_gradient(reference, params, weights)
    masks, gradient = _masks_and_gradient(fast, params.cuda(), weights.cuda())
    assert (masks.cpu() - expected).abs().max().item() <= 1e-5
    scale = expected_gradient.abs().max().item()
    assert (gradient.cpu() - expected_gradient).abs().max().item() <= 1e-4 * scale
