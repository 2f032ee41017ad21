"""`mpbatch` end to end through click's CliRunner on a tiny model and tiny images."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main

TINY = "tiny_models:make_tiny_cnn"
FAST = ["--size", "32", "--iterations", "3", "--mask-size", "8", "--workers", "0", "--quiet"]
WNIDS = ("n01440764", "n01443537")  # ImageNet classes 0 and 1


@pytest.fixture
def class_folders(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (data / wnid).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / wnid / f"img{i}.png")
    (data / WNIDS[1] / "broken.jpg").write_bytes(b"not an image")
    return data


def test_version_and_help() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "mpbatch" in result.output and "0." in result.output
    for command in ([], ["run"], ["show"]):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_run_writes_masks_report_and_failures(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["run", str(class_folders), "-o", str(out), "--model", TINY, "--batch-size", "4"]
    result = CliRunner().invoke(main, args + FAST)
    assert result.exit_code == 0, result.output

    with h5py.File(out / "masks.h5", "r") as file:
        for name in ("masks", "path", "label", "target", "pred", "prob_clean", "prob_masked"):
            assert file[name].shape[0] == 6, name
        assert file["masks"].shape == (6, 8, 8) and file["masks"].dtype == np.float32
        assert file["masks"][:].min() >= 0 and file["masks"][:].max() <= 1
        assert "config" in file.attrs and "versions" in file.attrs
        paths = [p.decode() for p in file["path"][:]]
        labels = file["label"][:]
        targets = file["target"][:]
    assert paths[0] == f"{WNIDS[0]}/img0.png"
    assert list(labels) == [0, 0, 0, 1, 1, 1]
    assert list(targets) == list(labels)  # --target label explains the ground truth

    report = pd.read_csv(out / "report.csv")
    assert len(report) == 6
    for column in (
        "path",
        "label",
        "target",
        "pred",
        "prob_clean",
        "prob_masked",
        "mask_area",
        "label_name",
        "target_name",
        "pred_name",
    ):
        assert column in report, column
    masks = h5py.File(out / "masks.h5", "r")["masks"][:]
    assert np.allclose(report["mask_area"], (1 - masks).mean(axis=(1, 2)), atol=1e-6)

    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["path"]) == [f"{WNIDS[1]}/broken.jpg"]
    assert failures["reason"].str.len().min() > 0


def test_rerun_does_no_work_and_changed_settings_are_refused(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    base = ["run", str(class_folders), "-o", str(out), "--model", TINY, *FAST]
    assert CliRunner().invoke(main, base).exit_code == 0
    again = CliRunner().invoke(main, base)
    assert again.exit_code == 0 and "0 masks written" in again.output
    changed = CliRunner().invoke(main, [*base, "--iterations", "4"])
    assert changed.exit_code == 2 and "other settings" in changed.output


def test_predicted_target_and_limit(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = [
        "run",
        str(class_folders),
        "-o",
        str(out),
        "--model",
        TINY,
        "--target",
        "predicted",
        "--limit",
        "2",
        *FAST,
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    report = pd.read_csv(out / "report.csv")
    assert len(report) == 2 and (report["target"] == report["pred"]).all()


def test_show_draws_one_png_per_image(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["run", str(class_folders), "-o", str(out), "--model", TINY, "--limit", "2", *FAST]
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, ["show", str(out), "-o", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "fig").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_missing_data_is_one_line_error(tmp_path) -> None:
    result = CliRunner().invoke(
        main, ["run", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--model", TINY, *FAST]
    )
    assert result.exit_code == 2
    assert "nope" in result.output and len(result.output.strip().splitlines()) == 1
