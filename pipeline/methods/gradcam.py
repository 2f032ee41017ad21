"""Grad-CAM (Selvaraju et al., ICCV 2017) as a plug-in method, through captum's LayerGradCam.

For a layer with activations A (K×h×w) and the target logit y_c:

    w_k = mean over (i, j) of ∂y_c/∂A_k[i, j],    L = ReLU(Σ_k w_k · A_k)      (h×w)

The stored "masks" are L at the layer's resolution; the map the metrics score is L resized
bilinearly (align_corners=False) to the model's input size. One forward and one backward
pass per batch, so it also runs beside every run as a comparison row (`comparison`).

Why captum: it is maintained with PyTorch, needs nothing beyond torch and numpy, and its
LayerGradCam takes any module of the model; the `grad-cam` package pulls in OpenCV and
scikit-learn. Which layer: `layer` names a module of the wrapped network
(`model.model.get_submodule(layer)`); None picks a default by model family (DEFAULT_LAYERS),
else the last Conv2d (the ReLU right after it, when there is one, as Grad-CAM's rectified
feature maps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError
from . import Method, register

# model-name prefix -> the layer Grad-CAM reads (the last convolutional block's output)
DEFAULT_LAYERS = {
    "efficientnet": "conv_head",
    "timm:efficientnet": "conv_head",
    "mobilenetv3": "conv_head",
    "timm:mobilenetv3": "conv_head",
    "resnet": "layer4",
    "resnext": "layer4",
    "wide_resnet": "layer4",
    "timm:resnet": "layer4",
    "densenet": "features",
}


@dataclass(frozen=True)
class GradCamSettings:
    """layer: module name in the wrapped network (None: by model family, then the last
    Conv2d); relu: rectify the map (Grad-CAM's definition)."""

    layer: str | None = None
    relu: bool = True

    def replace(self, **changes) -> GradCamSettings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _network(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def default_layer(model: nn.Module) -> str:
    """The layer Grad-CAM reads for this model: by family name, else the last Conv2d."""
    name = getattr(model, "name", "")
    network = _network(model)
    modules = dict(network.named_modules())
    for prefix, layer in DEFAULT_LAYERS.items():
        if name.startswith(prefix) and layer in modules:
            return layer
    names = list(modules)
    convolutions = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise SettingsError(f"model {name!r} has no Conv2d layer for Grad-CAM; give --layer")
    last = convolutions[-1]
    following = names.index(last) + 1
    if following < len(names) and isinstance(modules[names[following]], nn.ReLU):
        return names[following]
    return last


@register
class GradCam(Method):
    name = "gradcam"
    label = "Grad-CAM"
    summary = "Grad-CAM (Selvaraju et al. 2017), captum's LayerGradCam"
    settings_class = GradCamSettings
    presets = {"gradcam": GradCamSettings()}
    comparison = True
    scored_map = "the Grad-CAM map resized bilinearly to the model's input size"
    option_help = {"layer": "Grad-CAM: the layer to read (default: by model family)."}

    def resolve_settings(self, settings: GradCamSettings, model: nn.Module) -> GradCamSettings:
        """The default layer filled in; SettingsError when --layer names no module."""
        if not settings.layer:
            return settings.replace(layer=default_layer(model))
        modules = dict(_network(model).named_modules())
        if settings.layer not in modules:
            convolutions = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            hint = f"; its last Conv2d is {convolutions[-1]!r}" if convolutions else ""
            name = getattr(model, "name", "the model")
            raise SettingsError(f"--layer {settings.layer!r} is not a module of {name}{hint}")
        return settings

    def explain(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        seeds: list[int],
        settings: GradCamSettings,
        *,
        speed=None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        on_iteration: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """masks B×h×w: the Grad-CAM map at the layer's resolution (≥ 0 with relu)."""
        from captum.attr import LayerGradCam

        settings = self.resolve_settings(settings, model)
        layer = _network(model).get_submodule(settings.layer)
        with torch.enable_grad():
            cam = LayerGradCam(model, layer).attribute(
                images.float(), target=targets, relu_attributions=settings.relu
            )
        return {"masks": cam.detach()[:, 0].float()}

    def saliency(
        self,
        columns: dict[str, torch.Tensor],
        settings: GradCamSettings,
        size: tuple[int, int],
        area: int | None = None,
    ) -> torch.Tensor:
        cam = columns["masks"].float()[:, None]
        return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]

    def perturbed(self, image, columns, settings, mean, key, original_size):
        saliency = self.saliency(columns, settings, tuple(image.shape[-2:]))
        peak = saliency.flatten(1).amax(1).clamp_min(1e-12)
        return image * (saliency / peak)[:, None], "image × map / max"
