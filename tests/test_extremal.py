"""Batched extremal perturbations: batch equivalence, the area constraint, the three variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import BrightRegionModel, TinyCNN

from pipeline.data.seeding import image_seed
from pipeline.methods.extremal.mask_generators import MaskGenerator, grid_shape, mask_kernel
from pipeline.methods.extremal.optimizer import (
    ExtremalSettings,
    area_loss,
    area_references,
    extremal_masks,
    extremal_saliency,
    render_masks,
    reward_scores,
)
from pipeline.models.speed import SpeedOptions

# Cheap settings for the equivalence tests: 3×3 taps per pixel, few iterations.
FAST = ExtremalSettings(
    areas=(0.05, 0.1, 0.2),
    iterations=20,
    lr=0.1,
    step=4,
    sigma=4.0,
    max_blur_sigma=3.0,
    pyramid_levels=4,
    mask_size=16,
)

# The published settings scaled from 224² to 32² images: step 7 → 2, σ 21 → 3, blur σ 20 → 3,
# area weight 300 × (32² / 224²) ≈ 6 (the penalty is a mean over pixels). 300 iterations, lr 0.1,
# the weight growing ×100 over the run (published: ×16 over 800 iterations, see the report).
SCALED = ExtremalSettings(
    areas=(0.05, 0.1, 0.2),
    iterations=300,
    lr=0.1,
    step=2,
    sigma=3.0,
    max_blur_sigma=3.0,
    area_weight=6.0,
    area_weight_growth=100 ** (1 / 300),
    mask_size=0,
)

# the fast path, in float32 and under bf16 autocast
FAST_PATHS = {"fast": SpeedOptions(), "fast-bf16": SpeedOptions(precision="bf16")}

REGION = (13, 13, 19, 19)  # 6×6 bright square, symmetric under the horizontal-flip jitter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a busy machine extra intra-op threads only spin (a 300-
    iteration run took 5 s with one thread and 220 s with two on the shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _seeds(n: int) -> list[int]:
    return [image_seed(0, f"img_{i}.png") for i in range(n)]


def _bright_square(n: int = 1) -> tuple[torch.nn.Module, torch.Tensor]:
    """BrightRegionModel on 32² images: dark 0.1 everywhere but a bright 0.9 square on its
    region, so blurring the square (and only that) lowers class 0's logit."""
    top, left, bottom, right = REGION
    images = torch.full((n, 3, 32, 32), 0.1)
    images[:, :, top:bottom, left:right] = 0.9
    return _frozen(BrightRegionModel(size=32, region=REGION)), images


# ----------------------------------------------------------------------------- mask generator
def test_grid_and_kernel() -> None:
    assert grid_shape((224, 224), 7) == (32, 32)
    assert grid_shape((227, 100), 7) == (33, 15)
    d = torch.tensor([0.0, 10.5, 21.0, 31.5])
    expected = torch.tensor([1.0, 1.0, math.exp(-0.5), math.exp(-2.0)])
    assert torch.allclose(mask_kernel(d, 21.0), expected)


def test_one_grid_point_makes_one_kernel_blob() -> None:
    generator = MaskGenerator((30, 30), step=3, sigma=4.0, temperature=0.0, device="cpu")
    assert generator.grid == (10, 10)
    # TorchRay's canvas: pad = 1 + ⌈(4 + 4)/3⌉ = 4, R = 1 + ⌈4/3⌉ = 3, 3·(10 + 8 − 6) − 2 = 34
    assert generator.extended == (34, 34) and generator.offset == 4
    params = torch.zeros(1, 10, 10)
    params[0, 4, 6] = 0.8
    extended = generator(params)
    mask = generator.crop(extended)[0]
    assert torch.equal(mask, extended[0, 4:34, 4:34])
    # grid point (i, j) sits at image pixel (3i, 3j)
    ys, xs = torch.meshgrid(torch.arange(30.0), torch.arange(30.0), indexing="ij")
    distance = torch.sqrt((ys - 12) ** 2 + (xs - 18) ** 2)
    blob = 0.8 * mask_kernel(distance, 4.0)
    near = distance <= 1.5 * 4.0  # every grid point this close is among a pixel's taps
    assert torch.allclose(mask[near], blob[near], atol=1e-6)
    assert (mask <= blob + 1e-6).all()  # farther taps can only be left out
    assert mask.max().item() == pytest.approx(0.8)


def test_smooth_max_is_below_the_max_and_tends_to_it() -> None:
    params = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    hard = MaskGenerator((24, 24), 3, 4.0, 0.0, "cpu")(params)
    soft = MaskGenerator((24, 24), 3, 4.0, 0.05, "cpu")(params)
    sharp = MaskGenerator((24, 24), 3, 4.0, 1e-4, "cpu")(params)
    assert (soft <= hard + 1e-6).all() and (soft >= 0).all()
    assert (hard - soft).abs().max() < 0.2
    assert torch.allclose(sharp, hard, atol=1e-3)
    generator = MaskGenerator((24, 24), 3, 4.0, 0.0, "cpu")
    full = generator.crop(generator(torch.ones(1, 8, 8)))
    # grid points at pixels 0, 3, ..., 21 (TorchRay's uncentred grid): every pixel up to 22 is
    # within σ/2 of one, where the kernel is flat; pixel 23 is not
    assert torch.equal(full[:, :23, :23], torch.ones(1, 23, 23))
    assert full[0, 23, 23] < 1


# ----------------------------------------------------------------------------- losses
def test_area_penalty_by_hand() -> None:
    references = area_references([0.25, 0.5], 4)
    assert references.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 1.0], [0.0, 0.0]]])
    # mask 0 has exactly the area; mask 1 sorted is 0, 0, 0.5, 1 against 0, 0, 1, 1
    assert area_loss(masks, references).tolist() == pytest.approx([0.0, 0.25 / 4])


def test_rewards_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    targets = torch.tensor([2, 0])
    assert reward_scores(logits, targets, "simple").tolist() == [2.0, 5.0]
    assert reward_scores(logits, targets, "contrastive").tolist() == [-1.0, 5.0]


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="variant"):
        ExtremalSettings(variant="both")
    with pytest.raises(ValueError, match="reward"):
        ExtremalSettings(reward="softmax")
    with pytest.raises(ValueError, match="areas"):
        ExtremalSettings(areas=(0.0, 0.1))
    assert ExtremalSettings().replace(areas=[0.1], lr=None).areas == (0.1,)
    published = ExtremalSettings()
    assert (published.iterations, published.lr, published.momentum) == (800, 0.01, 0.9)
    assert (published.step, published.sigma, published.area_weight) == (7, 21.0, 300.0)


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize(
    "settings",
    [FAST, FAST.replace(variant="delete", reward="contrastive"), FAST.replace(variant="dual")],
    ids=["preserve", "delete-contrastive", "dual"],
)
def test_masks_do_not_depend_on_the_batch(settings: ExtremalSettings) -> None:
    model = _frozen(TinyCNN())
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = model(images).argmax(1)
    seeds = _seeds(3)
    together = extremal_masks(model, images, targets, seeds, settings)
    assert together.masks.shape == (3, 3, 16, 16)
    assert together.params.shape == (3, 3, 8, 8)
    assert (together.params < 0.99).any()  # the masks moved
    for i in range(3):
        alone = extremal_masks(
            model, images[i : i + 1], targets[i : i + 1], seeds[i : i + 1], settings
        )
        assert (alone.params[0] - together.params[i]).abs().max().item() <= 1e-5
        assert (alone.masks[0] - together.masks[i]).abs().max().item() <= 1e-5
        assert (alone.rewards[0] - together.rewards[i]).abs().max().item() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # TF32 convolutions would make the comparison meaningless
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator().manual_seed(3)
    # the building blocks are plain float arithmetic: equal up to rounding
    generator = {d: MaskGenerator((32, 32), 4, 4.0, 0.05, d) for d in ("cpu", "cuda")}
    params = torch.rand(4, *generator["cpu"].grid, generator=g)
    extended = {d: generator[d](params.to(d)) for d in generator}
    assert (extended["cuda"].cpu() - extended["cpu"]).abs().max().item() <= 1e-5
    references = area_references((0.05, 0.1, 0.2, 0.4), extended["cpu"][0].numel())
    loss_cpu = area_loss(extended["cpu"], references)
    loss_gpu = area_loss(extended["cuda"], references.cuda()).cpu()
    assert torch.allclose(loss_gpu, loss_cpu, rtol=1e-5, atol=1e-7)

    # A whole run is not bitwise portable: the area loss sorts the mask, so rounding-level
    # differences between the devices reorder near-equal pixels and move their gradient.
    # On an H200 (2026-12-04) FAST's 20 iterations ended with parameters 3.4e-3 apart (an
    # element-wise 1e-4 bound failed there); 1e-2 still catches a device-specific bug, which
    # moves them by a whole step (lr 0.1).
    model = _frozen(TinyCNN())
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # as measured
    targets = model(images).argmax(1)
    cpu = extremal_masks(model, images, targets, _seeds(3), FAST)
    gpu_model = _frozen(TinyCNN()).cuda()
    gpu = extremal_masks(gpu_model, images.cuda(), targets.cuda(), _seeds(3), FAST)
    assert gpu.masks.is_cuda
    assert (cpu.params < 0.99).any()  # the masks moved
    assert (gpu.params.cpu() - cpu.params).abs().max().item() <= 1e-2


def test_model_weights_get_no_gradients() -> None:
    model = TinyCNN()  # requires_grad left on
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    extremal_masks(model, images, torch.tensor([0, 1]), _seeds(2), FAST.replace(iterations=2))
    assert all(p.grad is None for p in model.parameters())


def test_reference_speed_is_the_default_path() -> None:
    model = _frozen(TinyCNN())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = model(images).argmax(1)
    settings = FAST.replace(lr=0.01, iterations=6)
    default = extremal_masks(model, images, targets, _seeds(2), settings)
    asked = extremal_masks(
        model, images, targets, _seeds(2), settings, speed=SpeedOptions(reference=True)
    )
    assert torch.equal(default.params, asked.params)
    assert torch.equal(default.masks, asked.masks)


def test_fast_path_starts_from_the_reference_masks() -> None:
    """The first iteration's masks are the reference's to rounding (the generators agree,
    test_smooth_masks.py). Later iterations drift apart: at the start the mask has large
    groups of tied values, and the area loss's sort breaks those ties by rounding, which
    decides which pixels are pulled to 0 (on this batch 8% of the first gradient's largest
    entry). benchmarks/results/fidelity_extremal_fast.csv measures the drift on real images."""
    model = _frozen(TinyCNN())
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = model(images).argmax(1)
    settings = FAST.replace(lr=0.01, iterations=1)
    reference = extremal_masks(model, images, targets, _seeds(3), settings)
    fast = extremal_masks(model, images, targets, _seeds(3), settings, speed=SpeedOptions())
    assert (fast.full_masks - reference.full_masks).abs().max().item() <= 1e-5
    assert torch.allclose(fast.rewards, reference.rewards, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast.area_loss, reference.area_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("speed", FAST_PATHS.values(), ids=FAST_PATHS.keys())
def test_fast_path_masks_do_not_depend_on_the_batch(speed: SpeedOptions) -> None:
    model = _frozen(TinyCNN())
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = model(images).argmax(1)
    settings = FAST.replace(lr=0.01, iterations=10)
    together = extremal_masks(model, images, targets, _seeds(3), settings, speed=speed)
    assert (together.params < 0.99).any() and (together.params > 0.01).any()
    for i in range(3):
        one = slice(i, i + 1)
        alone = extremal_masks(
            model, images[one], targets[one], _seeds(3)[one], settings, speed=speed
        )
        assert (alone.params[0] - together.params[i]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- the game
# the reference path for each variant; the fast path, in float32 and bf16, for preserve
SOLVED = ["preserve", "delete", "dual", "preserve-fast", "preserve-fast-bf16"]


@pytest.fixture(scope="module")
def solved() -> dict[str, tuple]:
    """Each case of SOLVED run once on the bright-square image with the scaled published
    settings."""
    model, images = _bright_square()
    targets = torch.zeros(1, dtype=torch.long)
    runs = {}
    for case in SOLVED:
        variant, _, path = case.partition("-")
        settings = SCALED.replace(variant=variant)
        speed = FAST_PATHS.get(path)
        runs[case] = (
            settings,
            extremal_masks(model, images, targets, _seeds(1), settings, speed=speed),
        )
    return runs


@pytest.mark.parametrize("case", SOLVED)
def test_masks_reach_their_areas(solved, case: str) -> None:
    settings, result = solved[case]
    masks = render_masks(result.params, (32, 32), settings)
    assert torch.allclose(masks, result.masks)  # mask_size 0: stored at image resolution
    generator = MaskGenerator((32, 32), settings.step, settings.sigma, settings.temperature, "cpu")
    extended = generator(result.params[0])  # the area loss counts the whole canvas
    fraction = (extended > 0.5).float().mean((-2, -1))
    target = torch.tensor(settings.areas)
    assert (fraction - target).abs().max().item() <= 0.02, fraction.tolist()


@pytest.mark.parametrize("case", SOLVED)
def test_masks_cover_the_square(solved, case: str) -> None:
    model, images = _bright_square()
    clean = model(images)[0, 0].item()  # 12 · (0.9 − 0.5) = 4.8
    fully_blurred = model(F.avg_pool2d(images, 31, 1, 15, count_include_pad=False))[0, 0]
    assert fully_blurred.item() < 0
    settings, result = solved[case]
    masks = result.masks[0]
    top, left, bottom, right = REGION
    inside = masks[:, top:bottom, left:right].mean((-2, -1))
    outside = (masks.sum((-2, -1)) - inside * 36) / (32 * 32 - 36)
    assert (inside > 0.9).all() and (inside > 4 * outside).all()
    # preserve half: keeping the mask keeps the score; delete half: deleting it kills the score
    assert (result.preserved[0] > clean - 0.5).all()
    assert (result.deleted[0] < clean - 5.0).all()
    expected = {
        "preserve": result.preserved,
        "delete": -result.deleted,
        "dual": result.preserved - result.deleted,
    }[settings.variant]
    assert torch.equal(result.rewards, expected)


def test_stored_masks_are_area_averages() -> None:
    model, images = _bright_square(2)
    settings = FAST.replace(mask_size=8, step=2, sigma=3.0)
    result = extremal_masks(model, images, torch.zeros(2, dtype=torch.long), _seeds(2), settings)
    full = render_masks(result.params, (32, 32), settings)
    pooled = F.avg_pool2d(full.flatten(0, 1)[:, None], 4)[:, 0].view(2, 3, 8, 8)
    assert torch.allclose(result.masks, pooled, atol=1e-6)
    assert 0.0 <= result.masks.min() and result.masks.max() <= 1.0


def test_saliency_sums_areas_or_picks_one() -> None:
    masks = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(extremal_saliency(masks), masks.sum(1))
    assert torch.equal(extremal_saliency(masks, area_index=1), masks[:, 1])
    smooth = extremal_saliency(masks, smooth=0.1)
    assert smooth.shape == (2, 8, 8) and smooth.std() < masks.sum(1).std()
