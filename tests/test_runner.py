"""pipeline/runner.py: how a batch is optimised (padding for compiled shapes, speed options).

End-to-end runs, resuming and sharding are in test_cli.py, test_resume.py and test_shard.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TinyCNN

import pipeline.runner as runner
from pipeline.optimize import MaskSettings, SpeedOptions
from pipeline.runner import RunOptions, explain_batch, speed_options

SETTINGS = MaskSettings(iterations=6, mask_size=8, blur_kernel=5, blur_sigma=2.0)


def _frozen_tiny() -> TinyCNN:
    model = TinyCNN().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_padding_a_short_batch_leaves_its_masks_unchanged(monkeypatch) -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, -1, 4])
    keys = ["a.png", "b.png", "c.png"]
    plain = explain_batch(_frozen_tiny(), images, labels, keys, SETTINGS, "label")

    seen = []
    optimize = runner.optimize_masks

    def recording(model, batch, targets, seeds, *args, **kwargs):
        seen.append((batch.shape[0], len(targets), len(seeds)))
        return optimize(model, batch, targets, seeds, *args, **kwargs)

    monkeypatch.setattr(runner, "optimize_masks", recording)
    padded = explain_batch(_frozen_tiny(), images, labels, keys, SETTINGS, "label", pad_to=8)
    assert seen == [(8, 8, 8)]
    assert set(padded) == set(plain)
    for name, values in plain.items():
        assert len(padded[name]) == 3, name
        np.testing.assert_allclose(padded[name], values, atol=1e-5, err_msg=name)

    seen.clear()
    explain_batch(_frozen_tiny(), images, labels, keys, SETTINGS, "label", pad_to=2)
    assert seen == [(3, 3, 3)]  # never cut: pad_to only adds


@pytest.mark.parametrize(
    ("compiled", "whole", "expected"),
    [
        (True, True, 8),  # the compiled shape is the batch size
        (True, False, None),  # halves after an out-of-memory error are not padded back up
        (False, True, None),  # eager: shapes may change freely
    ],
)
def test_only_whole_compiled_batches_are_padded(monkeypatch, compiled, whole, expected) -> None:
    asked = []

    def fake_explain(*args, pad_to=None, **kwargs):
        asked.append(pad_to)
        return {"masks": np.ones((1, 8, 8), np.float32), "target": np.array([0])}

    monkeypatch.setattr(runner, "explain_batch", fake_explain)
    options = RunOptions(data=".", out=".", batch_size=8, evaluation=None)
    speed = SpeedOptions(compile=compiled)
    images = torch.rand(1, 3, 32, 32)
    sample = runner.Sample(path="a.png", label=0)
    runner._mask_and_score(
        None,
        images,
        [sample],
        [(32, 32)],
        SETTINGS,
        options,
        {"optimize": 0.0},
        speed,
        whole_batch=whole,
    )
    assert asked == [expected]


def test_cuda_speed_options_follow_the_h100_measurements(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert SpeedOptions.recommended(cuda, "vgg19") == SpeedOptions("bf16", channels_last=True)
    assert SpeedOptions.recommended(cuda, "resnet50") == SpeedOptions("bf16")
    assert SpeedOptions.recommended(cuda, "efficientnet_lite0") == SpeedOptions("bf16")

    options = RunOptions(data=".", out=".", model="vgg19", compile=True, cuda_graphs=True)
    assert speed_options(options, cuda) == SpeedOptions(
        "bf16", channels_last=True, compile=True, cuda_graphs=True
    )
    explicit = RunOptions(data=".", out=".", model="resnet50", precision="bf16")
    assert speed_options(explicit, cuda) == SpeedOptions("bf16")
    cpu_bf16 = RunOptions(data=".", out=".", model="efficientnet_lite0", precision="bf16")
    assert speed_options(cpu_bf16, torch.device("cpu")) == SpeedOptions("bf16", channels_last=True)
    fp32 = RunOptions(data=".", out=".", precision="fp32", cuda_graphs=True)
    assert speed_options(fp32, cuda) == SpeedOptions()  # graphs only ever with compile


@pytest.mark.parametrize(("given", "expected"), [(None, runner.CPU_EVAL_BATCH_SIZE), (3, 3)])
def test_scoring_batch_defaults_to_the_device(monkeypatch, given, expected) -> None:
    asked = []

    def fake_score(model, images, saliency, targets, boxes, sizes, **options):
        asked.append(options["eval_batch_size"])
        return {"deletion_auc": torch.zeros(len(images))}

    monkeypatch.setattr(runner, "score_saliency", fake_score)
    sample = runner.Sample(path="a.png", label=0)
    evaluation = runner.EvalOptions(baselines=(), eval_batch_size=given)
    images = torch.rand(1, 3, 32, 32)
    runner.evaluate_batch(
        _frozen_tiny(),
        images,
        torch.rand(1, 8, 8),
        torch.tensor([0]),
        [sample],
        [(32, 32)],
        evaluation,
    )
    assert asked == [expected]
    assert runner.eval_batch_size_for(torch.device("cuda")) == runner.CUDA_EVAL_BATCH_SIZE
