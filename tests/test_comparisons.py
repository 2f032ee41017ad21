"""Comparisons as a registry: the built-in baselines, methods marked `comparison`, and what a
new comparison takes (one `register` call, no other file changed)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import TINY_OPTIONS, make_tiny_cnn

from cli import main
from pipeline.errors import SettingsError
from pipeline.metrics import comparisons
from pipeline.metrics.comparisons import (
    Comparison,
    MapRequest,
    comparison_maps,
    comparison_names,
    get_comparison,
    register,
)
from pipeline.metrics.deletion_insertion import center_saliency, random_saliency
from pipeline.metrics.pointing import center_points


def _request(batch: int = 2, size: int = 16) -> MapRequest:
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    keys = [f"img{i}.png" for i in range(batch)]
    targets = torch.zeros(batch, dtype=torch.long)
    return MapRequest(make_tiny_cnn().eval(), images, targets, keys, (4, 4), seed=3)


def test_builtin_comparisons_and_their_maps() -> None:
    assert comparison_names()[:2] == ("center", "random")
    assert "gradcam" in comparison_names()  # a method marked `comparison`
    request = _request()
    torch.testing.assert_close(comparison_maps("center", request), center_saliency(2, (4, 4)))
    torch.testing.assert_close(
        comparison_maps("random", request), random_saliency(request.keys, (4, 4), 3)
    )
    assert get_comparison("center").points is center_points
    assert get_comparison("center").optional and not get_comparison("gradcam").optional
    gradcam = comparison_maps("gradcam", request)
    assert gradcam.shape == (2, 16, 16) and bool((gradcam >= 0).all())
    with pytest.raises(SettingsError, match="unknown comparison 'nope'"):
        get_comparison("nope")
    with pytest.raises(ValueError, match="twice"):
        register(get_comparison("center"))


def input_gradient(request: MapRequest) -> torch.Tensor:
    """|∂ logit_target / ∂ pixel|, summed over colours: B×H×W."""
    with torch.enable_grad():
        images = request.images.detach().clone().requires_grad_(True)
        logits = request.model(images)
        picked = logits.gather(1, request.targets.view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(picked, images)
    return gradient.abs().sum(1)


@pytest.fixture
def input_gradient_comparison():
    register(Comparison("inputgrad", "input gradient", input_gradient))
    yield "inputgrad"
    comparisons._REGISTRY.pop("inputgrad")  # the registry has no removal: tests undo their own


@pytest.fixture
def photos(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(data / f"p{i}.png")
    return data


def test_a_new_comparison_reaches_report_summary_and_gallery(
    input_gradient_comparison, photos, tmp_path
) -> None:
    out = tmp_path / "out"
    args = ["run", str(photos), "-o", str(out), *TINY_OPTIONS, "--target", "predicted"]
    args += ["--iterations", "2", "--mask-size", "8", "--step", "128"]
    result = CliRunner().invoke(main, [*args, "--baselines", "center,inputgrad"])
    assert result.exit_code == 0, result.output

    report = pd.read_csv(out / "report.csv")
    assert {"inputgrad_deletion_auc", "inputgrad_insertion_auc"} <= set(report.columns)
    assert report["inputgrad_deletion_auc"].between(0, 1).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["method"]) == ["meaningful", "center", "inputgrad"]
    row = summary.set_index("method").loc["inputgrad"]
    assert row["deletion_auc"] == pytest.approx(report["inputgrad_deletion_auc"].mean())
    assert "| inputgrad | 3 |" in (out / "summary.md").read_text()

    gallery = tmp_path / "gallery"
    result = CliRunner().invoke(main, ["show", str(out), "-o", str(gallery), "--html"])
    assert result.exit_code == 0, result.output
    page = (gallery / "index.html").read_text(encoding="utf-8")
    start = page.index('id="gallery-data">') + len('id="gallery-data">')
    data = json.loads(page[start : page.index("</script>", start)])
    maps = {m["name"]: m for m in data["maps"]}
    assert maps["inputgrad"] == {"name": "inputgrad", "label": "input gradient", "optional": False}
    assert all((gallery / r["thumbs"]["map:inputgrad"]).is_file() for r in data["rows"])
    better = {m["name"]: m["better"] for m in data["metrics"]}
    assert better["inputgrad_deletion_auc"] == "lower"
    assert "diff:inputgrad:deletion_auc" in {d["name"] for d in data["differences"]}
