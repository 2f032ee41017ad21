"""pipeline/commands/batching.py: padding a short batch to the compiled shape, and the batch-size
probe, which must never compile (one compiled shape per run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TinyCNN

from pipeline.commands.batching import batch_probe, explain_padded, padded_size, probe_speed
from pipeline.methods import get_method
from pipeline.methods.meaningful import MeaningfulPerturbation
from pipeline.methods.meaningful.optimizer import MaskSettings
from pipeline.models.registry import NormalizedClassifier
from pipeline.models.speed import SpeedOptions

SETTINGS = MaskSettings(iterations=6, mask_size=8, blur_kernel=5, blur_sigma=2.0)


def _tiny() -> NormalizedClassifier:
    network = TinyCNN().eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return NormalizedClassifier(network, network.mean, network.std, name="tiny")


class _Recording(MeaningfulPerturbation):
    """The meaningful method, remembering the batch sizes it was asked to explain."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def explain(self, model, images, targets, seeds, settings, **options):
        self.seen.append((images.shape[0], len(targets), len(seeds)))
        return super().explain(model, images, targets, seeds, settings, **options)


def test_padding_a_short_batch_leaves_its_masks_unchanged() -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 7, 4])
    keys = ["a.png", "b.png", "c.png"]
    method = _Recording()
    plain = explain_padded(method, _tiny(), images, targets, keys, SETTINGS)
    padded = explain_padded(method, _tiny(), images, targets, keys, SETTINGS, pad_to=8)
    assert method.seen == [(3, 3, 3), (8, 8, 8)]
    assert set(padded) == set(plain)
    for name, values in plain.items():
        assert len(padded[name]) == 3, name
        np.testing.assert_allclose(padded[name], values, atol=1e-5, err_msg=name)
    explain_padded(method, _tiny(), images, targets, keys, SETTINGS, pad_to=2)
    assert method.seen[-1] == (3, 3, 3)  # never cut: pad_to only adds


@pytest.mark.parametrize(
    ("compiled", "whole", "expected"),
    [
        (True, True, 8),  # the compiled shape is the batch size
        (True, False, 3),  # halves after an out-of-memory error are not padded back up
        (False, True, 3),  # eager: shapes may change freely
    ],
)
def test_only_whole_compiled_batches_are_padded(compiled, whole, expected) -> None:
    assert padded_size(SpeedOptions(compile=compiled), 8, 3, whole) == expected


def test_the_batch_size_probe_never_compiles(monkeypatch) -> None:
    """--compile with --batch-size auto: probing compiled shapes would compile every probed
    size (and hit dynamo's recompile limit); the probe runs eager, the run compiles once."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(a) or a[0])
    speed = SpeedOptions(compile=True)
    assert probe_speed(speed) == SpeedOptions(compile=False)
    probe = batch_probe(_tiny(), get_method("meaningful"), SETTINGS, 32, speed, torch.device("cpu"))
    for batch in (1, 2, 4):
        probe(batch)
    assert compiled == []
    extremal = get_method("extremal")
    settings = extremal.default_settings.replace(areas=(0.1,))
    batch_probe(_tiny(), extremal, settings, 32, speed, torch.device("cpu"))(2)
    assert compiled == []
