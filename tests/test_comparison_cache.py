"""pipeline.metrics.comparison_cache through scoring.evaluate_batch: reused scores equal fresh ones,
and anything that could change a score misses the cache."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from tiny_models import TinyCNN

from pipeline.commands.configuration import EvalOptions
from pipeline.data.datasets import Box, Sample
from pipeline.metrics import scoring
from pipeline.metrics.scoring import evaluate_batch
from pipeline.models.registry import NormalizedClassifier

NAMES = ("center", "random", "gradcam")


def _tiny(seed: int = 0) -> NormalizedClassifier:
    network = TinyCNN(seed=seed).eval()
    return NormalizedClassifier(network, network.mean, network.std, name="tiny")


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    saliency = torch.rand(3, 8, 8, generator=generator)
    samples = [
        Sample("a.png", 1, boxes=(Box(1, 2, 2, 20, 20),)),
        Sample("b.png", 2),
        Sample("c.png", 3),
    ]
    return images, saliency, torch.tensor([1, 2, 3]), samples, [(40, 36), (32, 32), (50, 30)]


@pytest.fixture
def counted(monkeypatch):
    """How many images each comparison was scored for (not read from the cache)."""
    calls: list[tuple[str, int]] = []
    real = scoring._scores

    def counting(name, batch):
        calls.append((name, len(batch.request.keys)))
        return real(name, batch)

    monkeypatch.setattr(scoring, "_scores", counting)
    return calls


def _score(model, batch, **options) -> dict:
    """evaluate_batch with ROAD and every comparison (unless `baselines` says otherwise)."""
    evaluation = EvalOptions(**{"step": 128, "baselines": NAMES, "road": True, **options})
    return evaluate_batch(model, *batch, evaluation)


def _same(first: dict, second: dict, atol: float = 0.0) -> None:
    assert set(first) == set(second)
    for key in first:
        if isinstance(first[key], np.ndarray) and first[key].dtype.kind == "f":
            np.testing.assert_allclose(first[key], second[key], atol=atol, rtol=0, err_msg=key)
        else:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_a_second_run_reads_every_comparison_and_gets_the_same_columns(
    batch, counted, tmp_path
) -> None:
    model = _tiny()
    fresh = _score(model, batch)
    counted.clear()
    first = _score(model, batch, comparison_cache=tmp_path)
    assert sorted(counted) == sorted((n, 3) for n in NAMES)  # all scored, then stored
    assert len(list(tmp_path.rglob("*.npz"))) == 3 * len(NAMES)
    _same(first, fresh)
    counted.clear()
    other_maps = (batch[0], torch.rand(3, 8, 8), *batch[2:])  # another method's maps
    second = _score(model, other_maps, comparison_cache=tmp_path)
    assert counted == []  # nothing scored again
    for name in NAMES:
        for key in (f"{name}_deletion_auc", f"{name}_road_gap", f"{name}_pointing_hit"):
            np.testing.assert_array_equal(second[key], fresh[key])
    assert not np.array_equal(second["deletion_auc"], fresh["deletion_auc"])


def test_anything_that_changes_a_score_misses(batch, counted, tmp_path) -> None:
    model = _tiny()
    _score(model, batch, comparison_cache=tmp_path)
    counted.clear()
    _score(model, batch, comparison_cache=tmp_path, step=64)  # another protocol
    assert sorted(counted) == sorted((n, 3) for n in NAMES)
    counted.clear()
    _score(_tiny(seed=1), batch, comparison_cache=tmp_path)  # other weights
    assert sorted(counted) == sorted((n, 3) for n in NAMES)
    counted.clear()
    with torch.no_grad():  # the same model object, its weights written in place
        model.model.head.bias.add_(0.5)
    changed = _score(model, batch, comparison_cache=tmp_path)
    assert sorted(counted) == sorted((n, 3) for n in NAMES)
    _same(changed, _score(model, batch))

    counted.clear()
    images, saliency, targets, samples, sizes = batch
    edited = images.clone()
    edited[1, :, :4, :4] = 0.0  # one image's pixels
    retargeted = targets.clone()
    retargeted[2] = 5  # another image's explained class
    changed_batch = (edited, saliency, retargeted, samples, sizes)
    names = ("center", "random")  # maps that do not move with the batch's make-up
    partial = _score(model, changed_batch, comparison_cache=tmp_path, baselines=names)
    assert sorted(counted) == sorted((n, 2) for n in names)  # those two only; the first hit
    _same(partial, _score(model, changed_batch, baselines=names), atol=1e-6)


def test_an_unreadable_entry_is_scored_again(batch, counted, tmp_path, caplog) -> None:
    # centre and random: maps that do not depend on the batch's make-up (Grad-CAM's can move
    # by rounding with it, which may reorder tied pixels, as between two batch sizes)
    model, names = _tiny(), ("center", "random")
    fresh = _score(model, batch, comparison_cache=tmp_path, baselines=names)
    entry = sorted(tmp_path.rglob("*.npz"))[0]
    entry.write_bytes(b"not a zip")
    counted.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics.comparison_cache"):
        again = _score(model, batch, comparison_cache=tmp_path, baselines=names)
    assert "unreadable" in caplog.text and sum(n for _, n in counted) == 1
    _same(again, fresh, atol=1e-6)
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary file is left behind
    assert dataclasses.replace(EvalOptions(), comparison_cache=tmp_path).settings() == (
        EvalOptions().settings()
    )  # the cache never changes what a run records as its protocol


def test_the_model_digest_covers_every_tensor_and_follows_in_place_writes() -> None:
    import torchvision

    from pipeline.metrics.comparison_cache import model_digest

    model = torchvision.models.resnet18(num_classes=4).eval()  # 0-d BatchNorm counters too
    before = model_digest(model)
    assert model_digest(model) == before
    with torch.no_grad():
        model.layer4[1].bn2.running_var.mul_(2.0)  # a buffer, not a parameter
    assert model_digest(model) != before
    assert model_digest(torchvision.models.resnet18(num_classes=4)) != model_digest(model)


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated
        lambda raw: b"PK\x03\x04" + b"\x00garbage" * 8,  # a zip header, then garbage
        lambda raw: _flip(raw, len(raw) // 2),  # a flipped byte: its CRC fails
    ],
    ids=["truncated", "garbage-after-header", "flipped-byte"],
)
def test_a_damaged_entry_is_a_miss_with_one_warning(batch, counted, tmp_path, caplog, damage):
    model, names = _tiny(), ("center",)
    fresh = _score(model, batch, comparison_cache=tmp_path, baselines=names)
    entry = sorted(tmp_path.rglob("*.npz"))[0]
    entry.write_bytes(damage(entry.read_bytes()))
    counted.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics.comparison_cache"):
        again = _score(model, batch, comparison_cache=tmp_path, baselines=names)
    assert caplog.text.count("unreadable") == 1 and sum(n for _, n in counted) == 1
    _same(again, fresh, atol=1e-6)


def test_a_comparison_whose_code_changed_misses(batch, counted, tmp_path) -> None:
    """A stand-in for an edit of the code that makes a comparison's map: the same name, other
    code. The cache must not serve the old code's scores."""
    from pipeline.metrics import comparisons

    model = _tiny()
    original = comparisons.get_comparison("center")
    comparisons.register(dataclasses.replace(original, name="edited"))
    try:
        first = _score(model, batch, comparison_cache=tmp_path, baselines=("edited",))
        comparisons._REGISTRY.pop("edited")
        comparisons.register(
            dataclasses.replace(original, name="edited", maps=lambda r: 1 - original.maps(r))
        )
        counted.clear()
        second = _score(model, batch, comparison_cache=tmp_path, baselines=("edited",))
        assert counted == [("edited", 3)]  # a miss for every image
        fresh = _score(model, batch, baselines=("edited",))
        _same(second, fresh)
        assert not np.array_equal(first["edited_deletion_auc"], second["edited_deletion_auc"])
    finally:
        comparisons._REGISTRY.pop("edited", None)


def test_the_key_follows_the_package_source(monkeypatch, tmp_path) -> None:
    """Every module of `pipeline` is in the key: an edit of scoring code changes it."""
    from pipeline.metrics import comparison_cache

    before = comparison_cache.ComparisonCache(tmp_path, {}).context
    comparison_cache.package_digest.cache_clear()
    monkeypatch.setattr(comparison_cache.Path, "read_bytes", lambda self: b"edited source")
    after = comparison_cache.ComparisonCache(tmp_path, {}).context
    comparison_cache.package_digest.cache_clear()
    assert before != after
