"""pipeline/metrics/scoring.py: a batch's columns: every map gets curves, pointing (raw and
smoothed) and localization, the comparison rows prefixed; checked against the metric functions."""

from __future__ import annotations

import numpy as np
import torch
from tiny_models import TinyCNN

from pipeline.commands.configuration import CPU_EVAL_BATCH_SIZE, EvalOptions, eval_batch_size_for
from pipeline.data.datasets import Box, Sample
from pipeline.metrics.localization import RULES, localization_hit
from pipeline.metrics.pointing import TORCHRAY_POINTING_SMOOTH, pointing_hits, pointing_points
from pipeline.metrics.scoring import evaluate_batch
from pipeline.models.registry import NormalizedClassifier


def _tiny() -> NormalizedClassifier:
    network = TinyCNN().eval()
    return NormalizedClassifier(network, network.mean, network.std, name="tiny")


def test_every_map_gets_curves_pointing_and_localization() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    saliency = torch.rand(3, 32, 32, generator=generator) * 0.001  # faint background
    saliency[0, 4:12, 20:30] += 1.0  # a clear object for the first image
    sizes = [(64, 48), (40, 40), (50, 60)]
    samples = [
        Sample("a.png", 1, boxes=(Box(1, 40, 6, 59, 17), Box(2, 0, 0, 5, 5))),
        Sample("b.png", 2, boxes=(Box(2, 0, 0, 39, 39),)),
        Sample("c.png", 3),  # no boxes
    ]
    targets = torch.tensor([1, 2, 3])
    evaluation = EvalOptions(step=128, baselines=("center", "gradcam"), smooth=0.0)
    columns = evaluate_batch(_tiny(), images, saliency, targets, samples, sizes, evaluation)

    boxes = [torch.tensor([[40.0, 6.0, 59.0, 17.0]]), torch.tensor([[0.0, 0.0, 39.0, 39.0]]), None]
    for rule, alpha in RULES.items():
        expected = [
            localization_hit(saliency[i], boxes[i], rule, alpha, original_size=sizes[i])
            if boxes[i] is not None
            else np.nan
            for i in range(3)
        ]
        np.testing.assert_array_equal(columns[f"loc_hit_{rule}"], expected)
        assert columns[f"loc_curve_{rule}"].shape[0] == 3
    np.testing.assert_array_equal(columns["loc_hit"], columns["loc_hit_energy"])
    assert columns["loc_hit_energy"][0] == 1.0  # the blob is the box of class 1
    for suffix, smooth in (("raw", 0.0), ("smooth", TORCHRAY_POINTING_SMOOTH)):
        points = pointing_points(saliency, sizes, smooth)
        expected = pointing_hits(points, boxes, tolerance=15.0).numpy()
        np.testing.assert_array_equal(columns[f"pointing_hit_{suffix}"], expected)
    np.testing.assert_array_equal(columns["pointing_hit"], columns["pointing_hit_raw"])
    for prefix in ("center_", "gradcam_"):
        for name in ("deletion_auc", "pointing_hit_smooth", "loc_hit", "loc_curve_mean"):
            assert f"{prefix}{name}" in columns, prefix + name
    assert "random_deletion_auc" not in columns  # only the rows asked for


def test_scoring_batch_defaults_to_the_device() -> None:
    assert eval_batch_size_for(torch.device("cpu")) == CPU_EVAL_BATCH_SIZE == 1
    assert eval_batch_size_for(torch.device("cuda")) == 128


def test_eval_precision_bf16_scores_through_autocast_and_auto_needs_both_gates(
    monkeypatch,
) -> None:
    from pipeline.errors import SettingsError
    from pipeline.metrics.deletion_insertion import auc, perturbation_curves
    from pipeline.models import speed
    from pipeline.models.speed import Bf16Forward, resolve_eval_precision

    generator = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    saliency = torch.rand(2, 32, 32, generator=generator)
    targets = torch.tensor([1, 2])
    samples = [Sample("a.png", 1), Sample("b.png", 2)]
    sizes = [(32, 32)] * 2
    scored = {
        p: evaluate_batch(
            _tiny(),
            images,
            saliency,
            targets,
            samples,
            sizes,
            EvalOptions(step=64, baselines=(), precision=p),
        )
        for p in ("fp32", "bf16")
    }
    # bf16 is the curves of the model under autocast, computed here directly
    model = Bf16Forward(_tiny())
    for mode in ("deletion", "insertion"):
        curves = perturbation_curves(
            model, images, saliency, targets, mode=mode, protocol=EvalOptions(step=64).protocol()
        )
        np.testing.assert_allclose(scored["bf16"][f"{mode}_auc"], auc(curves), atol=1e-6)
    difference = np.abs(scored["bf16"]["deletion_curve"] - scored["fp32"]["deletion_curve"])
    assert 0 < difference.max() < 0.05  # rounding, not another protocol
    assert EvalOptions(precision="bf16").settings()["precision"] == "bf16"
    assert "precision" not in EvalOptions(precision="fp32").settings()  # old runs resume

    assert resolve_eval_precision("bf16", "cpu", "tiny") == "bf16"
    assert resolve_eval_precision("auto", "cpu", "efficientnet_lite0") in ("fp32", "bf16")
    monkeypatch.setattr(speed, "EVAL_BF16_FAMILIES", ("tiny",))
    monkeypatch.setattr(speed, "resolve_precision", lambda device, name: "fp32")
    assert resolve_eval_precision("auto", "cpu", "tiny") == "fp32"  # bf16 not native here
    monkeypatch.setattr(speed, "resolve_precision", lambda device, name: "bf16")
    assert resolve_eval_precision("auto", "cpu", "tiny") == "bf16"
    assert resolve_eval_precision("auto", "cpu", "resnet50") == "fp32"  # family unmeasured
    with np.testing.assert_raises(SettingsError):
        EvalOptions(precision="fp16")
