"""pipeline.api: a notebook's explain, score and read_run give what `mpbatch run` stores and
writes for the same images, settings and model (the CLI run is the reference)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import TINY, TINY_OPTIONS

from cli import main
from pipeline.api import explain, load_model, read_run, score
from pipeline.data.images import decode_image, resize_image
from pipeline.store.reader import read_columns

SETTINGS = ["--iterations", "5", "--mask-size", "8", "--step", "128", "--baselines", "none"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A CLI run over three images (one batch), and the same images as the run decodes them."""
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(3)
    for i in range(3):
        pixels = rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"img{i}.png")
    out = tmp_path_factory.mktemp("out") / "run"
    args = ["run", str(data), "-o", str(out), *TINY_OPTIONS, *SETTINGS, "--batch-size", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    images = torch.stack(
        [resize_image(decode_image(data / f"img{i}.png")[0], 32) for i in range(3)]
    )
    return out, images


def test_explain_equals_the_runs_masks(run) -> None:
    out, images = run
    stored, _ = read_columns(out / "masks.h5")
    model = load_model(TINY)
    targets = torch.as_tensor(stored["target"])
    columns = explain(model, images, targets, keys=list(stored["path"]), iterations=5, mask_size=8)
    assert columns["masks"].shape == (3, 8, 8) and columns["saliency"].shape == (3, 32, 32)
    np.testing.assert_allclose(columns["masks"].numpy(), stored["masks"], atol=1e-6, rtol=0)
    other = explain(model, images, targets, iterations=5, mask_size=8)  # other keys, other noise
    assert not torch.equal(other["masks"], columns["masks"])


def test_score_equals_the_runs_metrics(run) -> None:
    out, images = run
    stored, _ = read_columns(out / "masks.h5")
    model = load_model(TINY)
    columns = explain(
        model, images, stored["target"], keys=list(stored["path"]), iterations=5, mask_size=8
    )
    table = score(model, images, columns["saliency"], stored["target"], step=128)
    assert len(table) == 3 and list(table["key"]) == ["0", "1", "2"]
    for name in ("deletion_auc", "insertion_auc"):
        np.testing.assert_allclose(table[name], stored[name], atol=1e-5, rtol=0, err_msg=name)
    assert np.stack(table["deletion_curve"]).shape == (3, 9)  # 1024 pixels, 128 a step
    assert table["pointing_hit"].isna().all()  # no boxes given


def test_score_points_at_the_given_boxes() -> None:
    model = load_model(TINY)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    saliency = torch.zeros(2, 32, 32)
    saliency[:, 4, 4] = 1.0  # the argmax: pixel (4, 4) of a 32×32 original
    boxes = [[(0, 0, 8, 8)], [(25, 25, 31, 31)]]  # 15 px tolerance: a hit, then a miss
    table = score(model, images, saliency, [1, 2], boxes=boxes, step=512)
    assert list(table["pointing_hit"]) == [1.0, 0.0]


def test_read_run_gives_the_runs_tables(run) -> None:
    out, _ = run
    tables = read_run(out)
    report = pd.read_csv(out / "report.csv")
    assert list(tables.report.columns) == list(report.columns)
    np.testing.assert_allclose(tables.report["deletion_auc"], report["deletion_auc"], rtol=1e-6)
    summary = pd.read_csv(out / "summary.csv")
    assert list(tables.summary["method"]) == list(summary["method"])
    np.testing.assert_allclose(tables.summary["deletion_auc"], summary["deletion_auc"], rtol=1e-6)
    curve = tables.curves.query("curve == 'deletion'")
    assert len(curve) == 9 and curve["fraction"].iloc[-1] == 1.0
    assert tables.config["method"] == "meaningful"
