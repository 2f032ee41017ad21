"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019) as a plug-in method.

The optimisation is `pipeline.methods.extremal.optimizer.extremal_masks` (TorchRay's algorithm;
its module docstring gives the objective). Each image gets one mask per target area a (1 = salient).
The stored grid parameters rebuild the masks exactly as applied (`render_masks`); the map the
metrics score is their sum over areas, as TorchRay's benchmark scores them, or the mask of
one area (`--area`). Pointing smooths the map with σ = 0.09·min(H, W), as that benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ...metrics.pointing import TORCHRAY_POINTING_SMOOTH
from ...reports.schema import Column
from .. import Method, register
from ..perturbations import apply_blur_pyramid, blur_pyramid
from .optimizer import (
    EXTREMAL_PRESETS,
    ExtremalSettings,
    extremal_masks,
    extremal_saliency,
    render_masks,
)


@register
class ExtremalPerturbation(Method):
    name = "extremal"
    label = "extremal perturbation"
    columns = (
        Column("params", "mask parameters"),
        Column("reward", "reward per area", "higher"),
        Column("mask_area", "mask area per area (preserved fraction)"),
    )
    summary = "extremal perturbations (Fong, Patrick & Vedaldi 2019; TorchRay's algorithm)"
    settings_class = ExtremalSettings
    presets = EXTREMAL_PRESETS
    pointing_smooth = TORCHRAY_POINTING_SMOOTH  # TorchRay's benchmark: σ·min(H, W), argmax
    # the fast path (smooth_masks.FastMaskGenerator, bf16, compile, CUDA graphs) unless
    # --reference; --precision auto stays float32, as extremal's bf16 fidelity is unmeasured
    uses_speed_options = True
    scored_map = (
        "the masks as applied, rebuilt from their grid parameters at the model's input size, "
        "summed over the areas (TorchRay's benchmark) unless --area picks one"
    )
    option_help = {
        "areas": "Target areas, comma-separated (default 0.025,0.05,0.1,0.2).",
        "variant": "Which game (default preserve).",
        "reward": "Logit of the target, or target minus the best other class.",
        "temperature": "Temperature of the mask's smooth max (0.05 = TorchRay's coldness 20).",
        "iterations": "Optimisation steps per mask.",
        "lr": "Learning rate.",
        "jitter": "Flip the image every other iteration (true/false).",
    }
    choices = {"variant": ("preserve", "delete", "dual"), "reward": ("simple", "contrastive")}

    def settings_from_dict(self, stored: dict) -> ExtremalSettings:
        stored = dict(stored)
        if "smooth" in stored:  # files from before the rename to temperature
            stored["temperature"] = stored.pop("smooth")
        return super().settings_from_dict(stored)

    def areas(self, settings) -> tuple[float, ...]:
        return tuple(settings.areas)

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
        settings: ExtremalSettings,
        *,
        speed=None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        on_iteration: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """masks B×A×s×s (1 = salient), params B×A×h×w, reward and mask_area B×A."""
        result = extremal_masks(
            model, images, targets, seeds, settings, speed=speed, on_iteration=on_iteration
        )
        masks = result.masks.float()
        return {
            "masks": masks,
            "params": result.params.float(),
            "reward": result.rewards.float(),
            "mask_area": masks.flatten(2).mean(2),
        }

    def saliency(
        self,
        columns: dict[str, torch.Tensor],
        settings: ExtremalSettings,
        size: tuple[int, int],
        area: int | None = None,
    ) -> torch.Tensor:
        return extremal_saliency(self._full_masks(columns, settings, size), area)

    def _full_masks(self, columns, settings, size) -> torch.Tensor:
        """B×A×H×W masks as applied; files from before params were stored: resized masks."""
        if "params" in columns:
            return render_masks(columns["params"].float(), size, settings)
        return F.interpolate(columns["masks"].float(), size=size, mode="bilinear")

    def perturbed(self, image, columns, settings, mean, key, original_size):
        size = tuple(image.shape[-2:])
        middle = columns["masks"].shape[1] // 2  # show the middle area's preserved image
        keep = self._full_masks(columns, settings, size)[:, middle : middle + 1]
        pyramid = blur_pyramid(image, settings.max_blur_sigma, settings.pyramid_levels, mean)
        perturbed = apply_blur_pyramid(pyramid, keep, torchray_ends=True)
        return perturbed, f"middle: area {settings.areas[middle]:g} preserved"
