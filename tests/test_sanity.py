"""`mpbatch sanity` end to end on a tiny model: the stages' runs, the tables recomputed from
the stored maps, resuming, repeatability and its errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import TINY_OPTIONS

from cli import main
from pipeline.methods import get_method
from pipeline.metrics.similarity import similarities
from pipeline.models.randomisation import network_of, randomisation_stages, randomise, stages_upto
from pipeline.models.registry import load_model
from pipeline.store.reader import RunFile

MASKS = ["--iterations", "3", "--mask-size", "8"]


@pytest.fixture
def photos(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (data / wnid).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / wnid / f"img{i}.png")
    (data / "n01443537" / "broken.jpg").write_bytes(b"not an image")
    return data


def _sanity(data, out, *extra):
    args = ["sanity", str(data), "-o", str(out), *TINY_OPTIONS, *extra]
    return CliRunner().invoke(main, args)


def test_stages_are_runs_whose_maps_the_table_compares(photos, tmp_path) -> None:
    out = tmp_path / "out"
    result = _sanity(photos, out, "--method", "gradcam", "--layer", "features.4")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "sanity.csv")
    names = ["head", "features.4", "features.2", "features.0"]
    assert list(dict.fromkeys(table["layer"])) == names
    assert len(table) == 4 * len(names)  # the broken file is in no table
    assert table[["spearman", "ssim", "hog"]].abs().max().max() <= 1.0

    original = RunFile.open(out / "original")
    assert original.config["randomised"] is None
    assert [f[1] for f in original.failures()] == ["n01443537/broken.jpg"]
    stages = randomisation_stages(network_of(load_model(TINY_OPTIONS[1])))
    for number, stage in enumerate(stages, start=1):
        run = RunFile.open(out / "stages" / f"{number:02d}-{stage.name}")
        assert run.config["randomised"]["modules"] == list(stages_upto(stages, number))
        # the stored maps are the method's maps of a model randomised directly
        model = load_model(TINY_OPTIONS[1])
        randomise(network_of(model), stages_upto(stages, number), seed=42)
        images = torch.from_numpy(np.stack([_pixels(photos / p) for p in run.columns["path"]]))
        targets = torch.from_numpy(run.columns["target"].astype(np.int64))
        method = get_method("gradcam")
        settings = method.resolve_settings(
            method.default_settings.replace(layer="features.4"), model
        )
        expected = method.saliency(
            method.explain(model, images, targets, [], settings), settings, (32, 32)
        )
        torch.testing.assert_close(
            run.maps(list(range(4)), (32, 32)), expected, atol=1e-5, rtol=1e-4
        )
        # the table's numbers are the similarities of the stored maps
        measured = similarities(original.maps(list(range(4)), (32, 32)), expected)
        rows = table[table["stage"] == number].set_index("path").loc[list(run.columns["path"])]
        for measure in ("spearman", "ssim", "hog"):
            np.testing.assert_allclose(rows[measure], measured[measure], atol=1e-4)
    summary = pd.read_csv(out / "sanity_summary.csv")
    assert list(summary["layer"]) == names and (summary["images"] == 4).all()
    counts = table.groupby("stage")["spearman"].count().to_numpy()
    np.testing.assert_array_equal(summary["spearman_count"], counts)
    np.testing.assert_allclose(summary["spearman"], table.groupby("stage")["spearman"].mean())
    assert (summary["spearman_low"] <= summary["spearman"]).all()
    assert (out / "sanity.png").stat().st_size > 5000


def _pixels(path) -> np.ndarray:
    from pipeline.data.images import decode_image, resize_image

    return resize_image(decode_image(path)[0], 32).numpy()


def test_a_killed_or_partial_check_resumes_and_keeps_what_is_done(photos, tmp_path) -> None:
    out = tmp_path / "out"
    result = _sanity(photos, out, *MASKS, "--layers", "features.4")
    assert result.exit_code == 0, result.output
    done = sorted((out / "stages").iterdir())
    assert [d.name for d in done] == ["01-head", "02-features.4"]
    folders = [out / "original", *done]
    masks = {f.name: RunFile.open(f).columns["masks"] for f in folders}
    assert len(pd.read_csv(out / "sanity.csv")) == 2 * 4

    result = _sanity(photos, out, *MASKS)
    assert result.exit_code == 0, result.output
    for folder in folders:  # what was made is kept, not made again
        again = RunFile.open(folder)
        assert again.attrs["timings_total"]["images"] == 4, folder
        np.testing.assert_array_equal(again.columns["masks"], masks[folder.name])
    assert len(pd.read_csv(out / "sanity.csv")) == 4 * 4


def test_repeatability_reads_one_for_gradcam_and_less_for_noisy_masks(photos, tmp_path) -> None:
    result = _sanity(
        photos,
        tmp_path / "g",
        "--method",
        "gradcam",
        "--no-stages",
        "--repeat",
        "2",
        "--step",
        "256",
    )
    assert result.exit_code == 0, result.output
    per_image = pd.read_csv(tmp_path / "g" / "repeatability.csv")
    assert len(per_image) == 4 and np.allclose(per_image["pearson_r"], 1.0)
    assert np.allclose(per_image["deletion_auc_sd"], 0.0)

    out = tmp_path / "m"
    result = _sanity(
        photos, out, "--no-stages", "--repeat", "3", "--step", "256", *MASKS, "--noise", "0.5"
    )
    assert result.exit_code == 0, result.output
    seeds = sorted(d.name for d in (out / "repeats").iterdir())
    assert seeds == ["seed-0", "seed-1", "seed-2"]
    runs = [RunFile.open(out / "repeats" / s) for s in seeds]
    assert [r.config["mask"]["seed"] for r in runs] == [0, 1, 2]
    assert not any("center_deletion_auc" in r.columns for r in runs)  # the method's maps only
    per_image = pd.read_csv(out / "repeatability.csv")
    assert (per_image["pearson_r"] < 0.999).any()
    # the spread is the SD over the seeds of each image's stored AUC
    aucs = np.stack([r.columns["deletion_auc"] for r in runs])
    np.testing.assert_allclose(per_image["deletion_auc_sd"], aucs.std(axis=0, ddof=1), atol=1e-9)
    summary = pd.read_csv(out / "repeatability_summary.csv").set_index("quantity")
    assert summary.loc["deletion_auc", "sd_of_dataset_mean"] == pytest.approx(
        aucs.mean(axis=1).std(ddof=1)
    )


def test_bad_sanity_options_are_one_line_errors(photos, tmp_path) -> None:
    result = _sanity(photos, tmp_path / "a", *MASKS, "--layers", "features.9")
    assert result.exit_code == 2
    assert result.output == "mpbatch: error: layer 'features.9' is not a module of the model\n"
    result = _sanity(photos, tmp_path / "a", *MASKS, "--layers", "features.3")  # a ReLU
    assert result.exit_code == 2 and "'features.3' is not a blocks stage" in result.output
    result = _sanity(photos, tmp_path / "b", *MASKS, "--layers", "features")
    assert result.exit_code == 2 and "is not a blocks stage" in result.output
    assert "head, features.4" in result.output
    result = _sanity(photos, tmp_path / "c", "--repeat", "1")
    assert result.exit_code == 2 and "--repeat 1" in result.output
    result = _sanity(photos, tmp_path / "d", "--method", "gradcam", "--layer", "nope")
    assert result.exit_code == 2 and "--layer 'nope' is not a module" in result.output
    assert "features.4" in result.output  # the hint: the last Conv2d


def test_a_launchers_shard_variables_do_not_split_the_check(photos, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    result = _sanity(photos, out, "--method", "gradcam", "--layers", "head")
    assert result.exit_code == 0, result.output
    assert RunFile.open(out / "original").rows == 4  # every image, in masks.h5
    assert len(pd.read_csv(out / "sanity.csv")) == 4
