"""Extremal perturbations side by side with TorchRay's own `extremal_perturbation`.

TorchRay (PyPI `torchray`, a test-only dependency installed with --no-deps) is the reference
implementation. Its model sees normalised images; ours sees pixels and normalises itself, so
TorchRay gets `z ↦ tiny(z·std + mean)` and the normalised image, and both must return the same
masks: the same extended canvas and area loss, grid and taps, pyramid, SGD, jitter and reward.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyCNN

from pipeline.methods.extremal.mask_generators import MaskGenerator
from pipeline.methods.extremal.optimizer import ExtremalSettings, extremal_masks, render_masks
from pipeline.methods.perturbations import apply_blur_pyramid, blur_pyramid

torchray_ep = pytest.importorskip("torchray.attribution.extremal_perturbation")

MEAN = torch.tensor([0.5, 0.45, 0.4]).view(1, 3, 1, 1)
STD = torch.tensor([0.25, 0.3, 0.2]).view(1, 3, 1, 1)


class PixelModel(torch.nn.Module):
    """TinyCNN behind a normalisation: pixels in [0, 1] -> logits (what mpbatch calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(num_classes=5, seed=3)
        self.mean = tuple(MEAN.flatten().tolist())
        self.std = tuple(STD.flatten().tolist())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - MEAN) / STD)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models():
    model = PixelModel().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, model.net


def _image(seed: int, size: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")


# step 4, σ 8 on 40² images: 10×10 parameters, a 56×56 extended canvas, 7×7 taps per pixel
SMALL = dict(iterations=30, step=4, sigma=8.0, max_blur_sigma=6.0)


def _torchray(net, image, target, settings: ExtremalSettings) -> torch.Tensor:
    reward = {"simple": torchray_ep.simple_reward, "contrastive": torchray_ep.contrastive_reward}
    masks, _ = torchray_ep.extremal_perturbation(
        net,
        (image - MEAN) / STD,
        target,
        areas=list(settings.areas),
        max_iter=settings.iterations,
        num_levels=settings.pyramid_levels,
        step=settings.step,
        sigma=settings.sigma,
        jitter=settings.jitter,
        variant=settings.variant,
        reward_func=reward[settings.reward],
    )
    # TorchRay's max_blur keeps its default of 20 unless passed through Perturbation
    return masks[:, 0]


@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
@pytest.mark.parametrize("reward", ["simple", "contrastive"])
def test_masks_equal_torchray(variant: str, reward: str, monkeypatch) -> None:
    model, net = _models()
    settings = ExtremalSettings(areas=(0.1, 0.3), variant=variant, reward=reward, **SMALL)
    # TorchRay builds its pyramid with max_blur 20 fixed; give it ours
    original = torchray_ep.Perturbation.__init__
    monkeypatch.setattr(
        torchray_ep.Perturbation,
        "__init__",
        lambda self, x, num_levels=8, max_blur=20, type="blur": original(
            self, x, num_levels, settings.max_blur_sigma, type
        ),
    )
    images = torch.cat([_image(0), _image(1)])
    targets = torch.tensor([2, 4])
    ours = extremal_masks(model, images, targets, [0, 1], settings)
    for b in range(2):
        theirs = _torchray(net, images[b : b + 1], int(targets[b]), settings)
        assert ours.full_masks[b].shape == theirs.shape
        assert (ours.full_masks[b] - theirs).abs().max() <= 1e-4
        # the masks must have moved, or the comparison would prove little
        assert (theirs < 0.99).float().mean() > 0.05
        rebuilt = render_masks(ours.params[b], (40, 40), settings)
        assert torch.allclose(rebuilt, ours.full_masks[b], atol=1e-6)


def test_generator_equals_torchray_on_random_parameters() -> None:
    params = torch.rand(3, 1, 8, 11, generator=torch.Generator().manual_seed(5))
    for step, sigma in [(7, 21.0), (4, 8.0), (3, 5.0)]:
        size = (8 * step - 2, 11 * step)
        theirs_gen = torchray_ep.MaskGenerator(size, step, sigma)
        cropped, extended = theirs_gen.generate(params)
        ours_gen = MaskGenerator(size, step, sigma, 0.05, "cpu")
        ours_extended = ours_gen(params[:, 0])
        assert ours_gen.extended == tuple(theirs_gen.shape_out)
        assert torch.allclose(ours_extended, extended[:, 0], atol=1e-6)
        assert torch.allclose(ours_gen.crop(ours_extended), cropped[:, 0], atol=1e-6)


def test_pyramid_equals_torchray() -> None:
    image = _image(2)
    pyramid = blur_pyramid(image, 20.0, 8, fill=MEAN.flatten())
    theirs = torchray_ep.Perturbation((image - MEAN) / STD, num_levels=8, max_blur=20)
    # TorchRay's level k is our level L − 1 − k, in normalised space
    ours_normalised = (pyramid[:, 0] - MEAN) / STD
    assert torch.allclose(ours_normalised.flip(0), theirs.pyramid, atol=1e-5)
    masks = torch.rand(4, 40, 40, generator=torch.Generator().manual_seed(0))
    ours_applied = apply_blur_pyramid(pyramid, masks, torch.zeros(4, dtype=torch.long)) - MEAN
    assert torch.allclose(ours_applied / STD, theirs.apply(masks[:, None]), atol=1e-5)
