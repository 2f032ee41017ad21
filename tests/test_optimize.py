"""The batched optimiser: batch equivalence (the project's central test) and a real signal."""

from __future__ import annotations

import pytest
import torch
from tiny_models import BrightRegionModel, TinyCNN

from pipeline.optimize import (
    PRESETS,
    MaskSettings,
    image_seed,
    jitter_images,
    optimize_masks,
    total_variation,
)

FAST = MaskSettings(iterations=12, mask_size=8, blur_kernel=5, blur_sigma=2.0)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _seeds(n: int, run_seed: int = 0) -> list[int]:
    return [image_seed(run_seed, f"img_{i}.png") for i in range(n)]


@pytest.mark.parametrize(
    "settings",
    [
        FAST,
        FAST.replace(perturbation="blur", jitter=2, mask_blur_sigma=1.0, noise=0.1),
        FAST.replace(perturbation="constant", l1_reduction="sum", noise=0.0),
    ],
    ids=["seed-like", "paper-like", "constant"],
)
def test_masks_do_not_depend_on_batch_size_or_order(settings: MaskSettings) -> None:
    torch.manual_seed(0)
    model = _frozen(TinyCNN())
    images = _images(8)
    targets = model(images).argmax(1)
    seeds = _seeds(8)

    together = optimize_masks(model, images, targets, seeds, settings).masks
    alone = torch.cat(
        [
            optimize_masks(
                model, images[i : i + 1], targets[i : i + 1], seeds[i : i + 1], settings
            ).masks
            for i in range(8)
        ]
    )
    assert together.shape == (8, 1, 8, 8)
    # the masks actually moved away from their initial value of 1
    assert (together < 0.999).any()
    assert (together - alone).abs().max().item() <= 1e-5

    for batch_size in (3,):
        chunks = [
            optimize_masks(
                model,
                images[i : i + batch_size],
                targets[i : i + batch_size],
                seeds[i : i + batch_size],
                settings,
            ).masks
            for i in range(0, 8, batch_size)
        ]
        assert (torch.cat(chunks) - together).abs().max().item() <= 1e-5

    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    shuffled = optimize_masks(
        model, images[order], targets[order], [seeds[i] for i in order], settings
    ).masks
    assert (shuffled - together[order]).abs().max().item() <= 1e-5


def test_different_image_keys_give_different_noise() -> None:
    model = _frozen(TinyCNN())
    images = _images(1).repeat(2, 1, 1, 1)
    targets = torch.zeros(2, dtype=torch.long)
    result = optimize_masks(model, images, targets, [image_seed(0, "a"), image_seed(0, "b")], FAST)
    assert (result.masks[0] - result.masks[1]).abs().max() > 1e-4


def test_mask_finds_the_region_that_drives_the_score() -> None:
    model = _frozen(BrightRegionModel(size=32, region=(8, 8, 20, 20)))
    images = torch.full((2, 3, 32, 32), 0.9)
    targets = torch.zeros(2, dtype=torch.long)
    settings = MaskSettings(
        iterations=60, mask_size=16, perturbation="constant", noise=0.0, l1=0.05, tv=0.2
    )
    clean = model(images).softmax(1)[:, 0]
    result = optimize_masks(model, images, targets, _seeds(2), settings)
    assert (result.prob_masked < clean).all()
    assert (result.prob_masked < 0.5).all()

    # the mask is 16×16 for a 32×32 image: the region is mask cells 4..9 (inclusive)
    masks = result.masks[:, 0]
    inside = masks[:, 4:10, 4:10].mean()
    outside_cells = torch.ones(16, 16, dtype=torch.bool)
    outside_cells[3:11, 3:11] = False
    outside = masks[:, outside_cells].mean()
    assert inside < 0.5 < outside


def test_loss_falls() -> None:
    model = _frozen(BrightRegionModel())
    images = torch.full((1, 3, 32, 32), 0.9)
    targets = torch.zeros(1, dtype=torch.long)
    base = MaskSettings(mask_size=16, perturbation="constant", noise=0.0, l1=0.05)
    short = optimize_masks(model, images, targets, _seeds(1), base.replace(iterations=2))
    long = optimize_masks(model, images, targets, _seeds(1), base.replace(iterations=60))
    assert long.loss.item() < short.loss.item()


def test_total_variation_by_hand() -> None:
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    # rows: |1-0|^3, |1-1|^3 -> mean 0.5; cols: |1-0|^3, |1-1|^3 -> mean 0.5
    assert total_variation(mask, 3.0).item() == pytest.approx(1.0)
    assert total_variation(mask * 0.5, 2.0).item() == pytest.approx(0.25)


def test_jitter_shifts_each_image_its_own_way() -> None:
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    shifted = jitter_images(images, torch.tensor([[0, 0], [1, -1]]), 2)
    assert torch.equal(shifted[0], images[0])
    # image 1 moved: output pixel (y, x) reads input (y + 1, x − 1), borders replicated
    assert shifted[1, 0, 0, 1].item() == images[1, 0, 1, 0].item()
    assert shifted[1, 0, 0, 0].item() == images[1, 0, 1, 0].item()


def test_presets_match_design() -> None:
    seed, paper = PRESETS["seed"], PRESETS["paper"]
    assert (seed.iterations, seed.l1, seed.tv, seed.tv_beta, seed.noise) == (500, 0.01, 0.2, 3, 0.2)
    assert seed.perturbation == "blur-median" and seed.lr == 0.1 and seed.mask_size == 28
    assert (paper.iterations, paper.l1, paper.l1_reduction, paper.tv) == (300, 1e-4, "sum", 1e-2)
    assert (paper.blur_sigma, paper.jitter, paper.mask_blur_sigma) == (10.0, 4, 5.0)
    assert seed.replace(iterations=None, lr=0.5).lr == 0.5
