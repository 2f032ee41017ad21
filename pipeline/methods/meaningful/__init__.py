"""Meaningful perturbations (Fong & Vedaldi, ICCV 2017) as a plug-in method.

The optimisation itself is `pipeline.methods.meaningful.optimizer.optimize_masks` (its
module docstring gives the objective); this module adapts it to the registry. A mask m (h×w,
1 = pixel kept) is applied as m↑ = optimizer.applied_masks(m) at the input size, and the map
the metrics score is 1 − m↑ for the deletion game (what was deleted is salient) and m↑ for
the preservation game.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...data.seeding import image_seed
from ...reports.schema import Column
from .. import Method, register
from ..perturbations import apply_blur_pyramid, blur_pyramid
from .optimizer import (
    GAMES,
    PERTURBATIONS,
    PRESETS,
    MaskSettings,
    SpeedOptions,
    applied_masks,
    make_batch_substrate,
    optimize_masks,
)


@register
class MeaningfulPerturbation(Method):
    name = "meaningful"
    label = "meaningful perturbation"
    columns = (
        Column("prob_masked", "p(class), masked image"),
        Column("loss", "final loss", "lower"),
        Column("mask_area", "mask area (deleted fraction)", "lower"),
    )
    summary = "meaningful perturbations (Fong & Vedaldi 2017)"
    settings_class = MaskSettings
    presets = PRESETS
    uses_speed_options = True
    auto_bf16 = True  # benchmarks/results/fidelity_lite0_cuda.csv
    scored_map = (
        "1 - the mask as applied (optimize.applied_masks: its upsampling and mask blur) at "
        "the model's input size; the mask itself for the preservation game"
    )
    option_help = {
        "iterations": "Optimisation steps per mask.",
        "lr": "Learning rate.",
        "l1": "Weight of the area term |1 - m|.",
        "tv": "Weight of the total-variation term.",
        "tv_beta": "Exponent β of the total-variation term.",
        "mask_size": "Mask resolution (square).",
        "noise": "Std of the noise added each step (normalised space).",
        "perturbation": "Perturbation substrate.",
        "blur_sigma": "Sigma of the Gaussian blur (blur-pyramid: of its strongest level).",
        "game": "delete (default): the smallest region whose removal drops the score; "
        "preserve: the smallest region that alone keeps it.",
        "jitter": "Random shift of the perturbed image, in pixels (extremal: true/false).",
        "mask_blur_sigma": "Blur of the upsampled mask.",
        "seed": "Run seed; each image's noise is seeded by it and its path.",
    }
    choices = {"perturbation": PERTURBATIONS, "game": GAMES}

    def seed(self, settings) -> int:
        return settings.seed

    def shortened(self, settings, iterations: int):
        return settings.replace(iterations=iterations)

    def explain(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        seeds: list[int],
        settings: MaskSettings,
        *,
        speed: SpeedOptions | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        on_iteration: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """masks B×h×w (1 = kept), prob_masked, loss and mask_area (deleted fraction) B."""
        result = optimize_masks(
            model,
            images,
            targets,
            seeds,
            settings,
            speed=speed,
            on_iteration=on_iteration,
            original_sizes=original_sizes,
        )
        masks = result.masks[:, 0].float()
        return {
            "masks": masks,
            "prob_masked": result.prob_masked.float(),
            "loss": result.loss.float(),
            "mask_area": (1.0 - masks).flatten(1).mean(1),
        }

    def saliency(
        self,
        columns: dict[str, torch.Tensor],
        settings: MaskSettings,
        size: tuple[int, int],
        area: int | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            applied = applied_masks(columns["masks"].float(), size, settings)
        return applied if settings.game == "preserve" else 1.0 - applied

    def perturbed(self, image, columns, settings, mean, key, original_size):
        size = tuple(image.shape[-2:])
        with torch.no_grad():
            kept = applied_masks(columns["masks"].float(), size, settings)[:, None]
        if settings.perturbation == "blur-pyramid":
            pyramid = blur_pyramid(image, settings.blur_sigma, settings.pyramid_levels)
            perturbed = apply_blur_pyramid(pyramid, kept)
        else:
            seeds = [image_seed(settings.seed, key)]
            substrate = make_batch_substrate(image, settings, seeds, mean, [original_size])
            perturbed = image * kept + substrate * (1 - kept)
        caption = f"p(perturbed) {float(columns['prob_masked'][0]):.3f}"
        return perturbed, caption
