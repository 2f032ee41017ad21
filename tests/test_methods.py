"""pipeline/methods: the registry, parsing of method settings, and Grad-CAM against a
hand-written Grad-CAM (forward/backward hooks, the formula of the module docstring)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TinyCNN

from pipeline.methods import (
    comparison_names,
    get_method,
    method_for_preset,
    method_names,
    parse_overrides,
    preset_names,
    settings_from_config,
)
from pipeline.methods.gradcam import GradCamSettings, default_layer
from pipeline.models.registry import NormalizedClassifier


def test_registry_lists_every_method_and_its_presets() -> None:
    assert method_names() == ["meaningful", "extremal", "gradcam"]  # the default first
    assert preset_names() == ["seed", "paper", "torchray-voc", "torchray-coco", "gradcam"]
    assert method_for_preset(None) == "meaningful"
    assert method_for_preset("torchray-coco") == "extremal"
    assert comparison_names() == ["gradcam"]
    with pytest.raises(ValueError, match="unknown method 'occlusion'"):
        get_method("occlusion")
    with pytest.raises(ValueError, match="unknown preset"):
        method_for_preset("fast")


def test_overrides_are_typed_by_the_methods_settings() -> None:
    extremal = parse_overrides("extremal", {"areas": "0.1,0.2", "jitter": "false", "lr": None})
    assert extremal == {"areas": (0.1, 0.2), "jitter": False}
    meaningful = parse_overrides("meaningful", {"jitter": "3", "blur_sigma": "2", "seed": "7"})
    assert meaningful == {"jitter": 3, "blur_sigma": 2.0, "seed": 7}
    with pytest.raises(ValueError, match="--areas does not apply to --method meaningful"):
        parse_overrides("meaningful", {"areas": "0.1"})
    with pytest.raises(ValueError, match="--iterations 'many'"):
        parse_overrides("extremal", {"iterations": "many"})


def test_settings_round_trip_through_the_stored_json() -> None:
    for name in method_names():
        method = get_method(name)
        for settings in method.presets.values():
            stored = json.loads(json.dumps({"method": name, "mask": settings.to_dict()}))
            assert settings_from_config(stored) == settings
    old_extremal = {"method": "extremal", "mask": {"areas": [0.1], "smooth": 0.1}}
    assert settings_from_config(old_extremal).temperature == 0.1  # renamed field


def _tiny() -> NormalizedClassifier:
    network = TinyCNN().eval()
    return NormalizedClassifier(network, network.mean, network.std, name="tiny")


def _hand_grad_cam(model: NormalizedClassifier, layer: str, images, targets) -> torch.Tensor:
    """Grad-CAM by hand: L = ReLU(Σ_k mean_ij(∂y_c/∂A_k) · A_k), B×h×w."""
    module = model.model.get_submodule(layer)
    saved = {}
    module.register_forward_hook(lambda m, i, output: saved.update(a=output))
    logits = model(images)
    chosen = logits.gather(1, targets[:, None]).sum()
    (gradient,) = torch.autograd.grad(chosen, saved["a"])
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * saved["a"]).sum(1)).detach()


@pytest.mark.parametrize("batch", [1, 3])
def test_grad_cam_equals_the_formula(batch: int) -> None:
    model = _tiny()
    gradcam = get_method("gradcam")
    settings = gradcam.resolve_settings(GradCamSettings(), model)
    assert settings.layer == "features.5"  # the ReLU after the last Conv2d
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    targets = torch.arange(batch) % 10
    columns = gradcam.explain(model, images, targets, [0] * batch, settings)
    expected = _hand_grad_cam(_tiny(), "features.5", images, targets)
    assert columns["masks"].shape == (batch, 8, 8)
    torch.testing.assert_close(columns["masks"], expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().sum() > 0  # the check compares real maps, not zeros

    saliency = gradcam.saliency(columns, settings, (32, 32))
    upsampled = F.interpolate(expected[:, None], (32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(saliency, upsampled[:, 0], atol=1e-6, rtol=1e-5)


def test_grad_cam_default_layer_by_family() -> None:
    from pipeline.models.registry import load_model

    assert default_layer(load_model("efficientnet_lite0")) == "conv_head"
    network = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no Conv2d"):
        default_layer(NormalizedClassifier(network, name="mlp"))


def test_what_the_runner_reads_of_a_method_is_declared_on_it() -> None:
    """Areas, the seed and the probe's short settings are Method's to say: the runner, the
    batch loop, the comparisons and the sanity check read no settings field by name."""
    from pathlib import Path

    from pipeline.methods import get_method, method_names

    for name in method_names():
        method = get_method(name)
        settings = method.default_settings
        areas, seed = method.areas(settings), method.seed(settings)
        assert areas is None or (len(areas) > 0 and all(0 < a < 1 for a in areas)), name
        assert seed is None or isinstance(seed, int), name
        short = method.shortened(settings, 2)
        assert getattr(short, "iterations", 2) == 2, name
    assert get_method("extremal").areas(get_method("extremal").default_settings) == (
        0.025,
        0.05,
        0.1,
        0.2,
    )
    assert get_method("gradcam").seed(get_method("gradcam").default_settings) is None
    root = Path(__file__).resolve().parents[1] / "pipeline"
    for path in root.rglob("*.py"):
        if "methods" in path.relative_to(root).parts:
            continue
        text = path.read_text(encoding="utf-8")
        for field in ("areas", "seed", "iterations"):
            assert f'getattr(settings, "{field}"' not in text, (path, field)
            assert f'hasattr(settings, "{field}"' not in text, (path, field)
