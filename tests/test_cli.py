"""`mpbatch` end to end through click's CliRunner on a tiny model and tiny images."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import TINY, TINY_OPTIONS

from cli import main

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


def test_extremal_preset_run_scores_full_masks_and_reruns(class_folders, tmp_path) -> None:
    """--preset torchray-voc implies extremal; its areas (a tuple) survive the JSON round trip
    of a rerun; the stored grid parameters rebuild the masks the metrics scored."""
    out = tmp_path / "extremal"
    small = ["--iterations", "3", "--step", "64", "--baselines", "none", "--limit", "2"]
    base = ["run", str(class_folders), "-o", str(out), *TINY_OPTIONS, "--preset", "torchray-voc"]
    first = CliRunner().invoke(main, [*base, *small, "--batch-size", "2"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, [*base, *small, "--batch-size", "2"])
    assert again.exit_code == 0 and "0 masks written" in again.output, again.output
    # which area is scored decides the metrics: a resume must not mix two
    other = CliRunner().invoke(main, [*base, *small, "--batch-size", "2", "--area", "1"])
    assert other.exit_code == 2 and "(area: None -> 1)" in other.output, other.output
    with h5py.File(out / "masks.h5", "r") as file:
        config = json.loads(file.attrs["config"])
        assert config["method"] == "extremal" and config["preset"] == "torchray-voc"
        assert config["mask"]["areas"] == [0.025, 0.05, 0.1, 0.2]
        assert config["evaluation"]["smooth"] == 0.09
        assert file["params"].shape == (2, 4, 5, 5)  # ⌈32 / 7⌉ grid points per side
        assert file["masks"].shape == (2, 4, 56, 56)
        assert config["speed"]["reference"] is False  # the fast path, float32 on the CPU
        assert config["speed"]["precision"] == "fp32"
    # the reference path's masks are not the fast path's: not resumed into one file
    reference = CliRunner().invoke(main, [*base, *small, "--batch-size", "2", "--reference"])
    assert reference.exit_code == 2 and "'reference': True" in reference.output
    assert "other settings (speed:" in reference.output
    elsewhere = tmp_path / "reference"
    base[base.index(str(out))] = str(elsewhere)
    made = CliRunner().invoke(main, [*base, *small, "--batch-size", "2", "--reference"])
    assert made.exit_code == 0, made.output
    with h5py.File(elsewhere / "masks.h5", "r") as file:
        assert json.loads(file.attrs["config"])["speed"]["reference"] is True


def test_rerun_does_no_work_and_changed_settings_are_refused(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    base = ["run", str(class_folders), "-o", str(out), "--model", TINY, *FAST]
    assert CliRunner().invoke(main, base).exit_code == 0
    again = CliRunner().invoke(main, base)
    assert again.exit_code == 0 and "0 masks written" in again.output
    changed = CliRunner().invoke(main, [*base, "--iterations", "4"])
    assert changed.exit_code == 2 and "other settings" in changed.output

    # a run begun on a GPU is not resumed on the CPU: its noise came from CUDA generators
    with h5py.File(out / "masks.h5", "r+") as file:
        config = json.loads(file.attrs["config"])
        assert config["speed"]["device"] == "cpu"
        config["speed"]["device"] = "cuda"
        file.attrs["config"] = json.dumps(config)
    moved = CliRunner().invoke(main, base)
    assert moved.exit_code == 2 and "other settings (speed:" in moved.output

    # a file from before the device type and CUDA graphs were recorded still resumes
    with h5py.File(out / "masks.h5", "r+") as file:
        config = json.loads(file.attrs["config"])
        del config["speed"]["device"], config["speed"]["cuda_graphs"]
        file.attrs["config"] = json.dumps(config)
    older = CliRunner().invoke(main, base)
    assert older.exit_code == 0 and "0 masks written" in older.output


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


def test_show_html_writes_a_gallery_of_the_worst_images(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["run", str(class_folders), "-o", str(out), "--model", TINY, *FAST, *METRIC_ARGS]
    assert CliRunner().invoke(main, [*args, "--baselines", "center"]).exit_code == 0
    gallery = tmp_path / "gallery"
    result = CliRunner().invoke(
        main, ["show", str(out), "-o", str(gallery), "--html", "--limit", "3"]
    )
    assert result.exit_code == 0, result.output
    page = (gallery / "index.html").read_text(encoding="utf-8")
    start = page.index('id="gallery-data">') + len('id="gallery-data">')
    data = json.loads(page[start : page.index("</script>", start)])
    report = pd.read_csv(out / "report.csv")
    worst = report.sort_values("deletion_auc", ascending=False, kind="stable").head(3)
    assert [r["path"] for r in data["rows"]] == list(worst["path"])
    # image, perturbed, and the method's and the centre's map over the image, per row
    kinds = {"image", "perturbed", "map-method", "map-center"}
    rows = [r["row"] for r in data["rows"]]
    assert {p.name for p in (gallery / "thumbs").glob("*")} == {
        f"{row}-{kind}.jpg" for row in rows for kind in kinds
    }
    assert [m["name"] for m in data["maps"]] == ["method", "center"]
    bad = CliRunner().invoke(main, ["show", str(out), "-o", str(gallery), "--html", "--sort", "x"])
    assert bad.exit_code == 2 and "no column 'x'" in bad.output


def test_missing_data_is_one_line_error(tmp_path) -> None:
    result = CliRunner().invoke(
        main, ["run", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--model", TINY, *FAST]
    )
    assert result.exit_code == 2
    assert "nope" in result.output and len(result.output.strip().splitlines()) == 1


METRIC_ARGS = ["--step", "64", "--eval-batch-size", "64"]


def _evaluate_args(data) -> list[str]:
    """`evaluate` options for the tiny model on `data`, without baselines."""
    return [
        "--data",
        str(data),
        *TINY_OPTIONS,
        "--baselines",
        "none",
        *METRIC_ARGS,
    ]


def _columns(path):
    from pipeline.store.reader import read_columns

    return read_columns(path)[0]


def test_run_scores_masks_and_baselines(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["run", str(class_folders), "-o", str(out), "--model", TINY, *FAST, *METRIC_ARGS]
    assert CliRunner().invoke(main, args).exit_code == 0
    columns = _columns(out / "masks.h5")
    # 32×32 images, 64 pixels per step: 16 steps, 17 scores
    for prefix in ("", "center_", "random_"):
        assert columns[f"{prefix}deletion_curve"].shape == (6, 17)
        assert columns[f"{prefix}insertion_curve"].shape == (6, 17)
        curves = columns[f"{prefix}deletion_curve"]
        expected = (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / 16
        assert np.allclose(columns[f"{prefix}deletion_auc"], expected, atol=1e-6)
        # no boxes in this folder: pointing is undefined, not a miss
        assert np.isnan(columns[f"{prefix}pointing_hit"]).all()
    report = pd.read_csv(out / "report.csv")
    for column in ("deletion_auc", "insertion_auc", "pointing_hit", "small_object"):
        assert column in report


def test_evaluate_foreign_maps_equals_run(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = [
        "run",
        str(class_folders),
        "-o",
        str(out),
        "--model",
        TINY,
        *FAST,
        *METRIC_ARGS,
        "--baselines",
        "none",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    from pipeline.methods import get_method, settings_from_config
    from pipeline.store.reader import read_columns

    run_columns, attrs = read_columns(out / "masks.h5")
    # what the run scored: 1 − the mask as the optimiser applied it, at the input size
    settings = settings_from_config(attrs["config"])
    masks = {"masks": torch.from_numpy(run_columns["masks"])}
    saliency = get_method("meaningful").saliency(masks, settings, (32, 32)).numpy()
    assert saliency.shape[-2:] == (32, 32)  # the input size, not the 8×8 mask

    foreign = tmp_path / "gradcam.h5"
    with h5py.File(foreign, "w") as file:
        file["saliency"] = saliency
        file["path"] = np.array(list(run_columns["path"]), dtype=h5py.string_dtype())
    npy = tmp_path / "maps.npy"
    np.save(npy, saliency)
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(run_columns["path"]) + "\n")

    common = _evaluate_args(class_folders)
    for name, source, extra in (("h5", foreign, []), ("npy", npy, ["--paths", str(listing)])):
        result = CliRunner().invoke(
            main, ["evaluate", str(source), "-o", str(tmp_path / name), *common, *extra]
        )
        assert result.exit_code == 0, result.output
        scored = _columns(tmp_path / name / "scores.h5")
        assert list(scored["path"]) == list(run_columns["path"])
        for column in ("deletion_auc", "insertion_auc", "deletion_curve"):
            assert np.allclose(scored[column], run_columns[column], atol=1e-6), column
        # the file is finished: marked complete, its journal gone
        with h5py.File(tmp_path / name / "scores.h5", "r") as file:
            assert file.attrs["complete"]
        assert not (tmp_path / name / ".scores.parts").exists()

    # named maps: their row in the summary and in `mpbatch report` says what they are
    named = tmp_path / "named"
    args = ["evaluate", str(foreign), "-o", str(named), *common, "--name", "gradcam-ext"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert list(pd.read_csv(named / "summary.csv")["method"]) == ["gradcam-ext"]
    report = CliRunner().invoke(main, ["report", str(named), "-o", str(tmp_path / "r.csv")])
    assert report.exit_code == 0, report.output
    row = pd.read_csv(tmp_path / "r.csv").iloc[0]
    assert row["method"] == "gradcam-ext" and row["model"] == TINY

    # recomputing the run's own metrics in place gives the same numbers again
    before = run_columns["insertion_auc"].copy()
    result = CliRunner().invoke(main, ["evaluate", str(out), *common])
    assert result.exit_code == 0, result.output
    assert np.allclose(_columns(out / "masks.h5")["insertion_auc"], before, atol=1e-6)
    # rescored at another size: the file records what scored it, and so does the summary
    result = CliRunner().invoke(main, ["evaluate", str(out), *common, "--size", "48"])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "masks.h5", "r") as file:
        scored_by = json.loads(file.attrs["evaluated"])
        assert json.loads(file.attrs["config"])["size"] == 32  # the masks' own record
    assert scored_by["size"] == 48 and scored_by["model"] == TINY
    assert "at size 48" in (out / "summary.md").read_text(encoding="utf-8")


def test_evaluate_baseline_and_bad_sources(class_folders, tmp_path) -> None:
    common = _evaluate_args(class_folders)
    result = CliRunner().invoke(
        main, ["evaluate", "--baseline", "center", "-o", str(tmp_path / "c"), *common]
    )
    assert result.exit_code == 0, result.output
    assert len(_columns(tmp_path / "c" / "scores.h5")["deletion_auc"]) == 6

    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as file:
        file["something"] = np.zeros(3)
    result = CliRunner().invoke(main, ["evaluate", str(bad), "-o", str(tmp_path / "b"), *common])
    assert result.exit_code == 2 and "bad.h5" in result.output and "saliency" in result.output

    # a map with NaN is bad input: one line naming the file and the image, not a traceback
    paths = sorted(str(p.relative_to(class_folders)) for p in class_folders.rglob("*.png"))
    maps = np.random.default_rng(0).random((len(paths), 8, 8))
    maps[2, 3, 3] = np.nan
    np.save(tmp_path / "maps.npy", maps)
    (tmp_path / "paths.txt").write_text("\n".join(paths))
    args = [str(tmp_path / "maps.npy"), "--paths", str(tmp_path / "paths.txt")]
    result = CliRunner().invoke(main, ["evaluate", *args, "-o", str(tmp_path / "n"), *common])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "maps.npy" in lines[0] and paths[2] in lines[0], lines

    # a map whose shape fits neither its image (40×48) nor the model input (32×32) would be
    # stretched over it: one line naming the file, the image and both shapes
    np.save(tmp_path / "wide.npy", np.random.default_rng(1).random((len(paths), 8, 24)))
    args = [str(tmp_path / "wide.npy"), "--paths", str(tmp_path / "paths.txt")]
    result = CliRunner().invoke(main, ["evaluate", *args, "-o", str(tmp_path / "w"), *common])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "wide.npy" in lines[0] and paths[0] in lines[0], lines
    assert "8×24" in lines[0] and "40×48" in lines[0] and "32×32" in lines[0], lines
    # a map at the image's own aspect ratio (10×12 for 40×48) is taken
    np.save(tmp_path / "own.npy", np.random.default_rng(1).random((len(paths), 10, 12)))
    args = [str(tmp_path / "own.npy"), "--paths", str(tmp_path / "paths.txt")]
    result = CliRunner().invoke(main, ["evaluate", *args, "-o", str(tmp_path / "o"), *common])
    assert result.exit_code == 0, result.output


def test_extremal_method_end_to_end(class_folders, tmp_path) -> None:
    out = tmp_path / "out"
    args = [
        "run",
        str(class_folders),
        "-o",
        str(out),
        *TINY_OPTIONS,
        "--method",
        "extremal",
        "--iterations",
        "3",
        "--areas",
        "0.1,0.3",
        "--limit",
        "3",
        *METRIC_ARGS,
        "--baselines",
        "none",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    columns = _columns(out / "masks.h5")
    assert columns["masks"].shape[:2] == (3, 2)  # the area axis is kept
    assert columns["deletion_curve"].shape == (3, 17)
    figures = CliRunner().invoke(main, ["show", str(out), "-o", str(tmp_path / "fig")])
    assert figures.exit_code == 0, figures.output
    refused = CliRunner().invoke(main, [*args, "--tv", "0.3"])
    assert refused.exit_code == 2 and "--tv" in refused.output
    for area in ("2", "-1"):  # two areas: indices 0 and 1 only; one line, before any work
        refused = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "x"), "--area", area])
        assert refused.exit_code == 2 and "makes 2 areas" in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1
    meaningful = [
        "run",
        str(class_folders),
        "-o",
        str(tmp_path / "y"),
        *TINY_OPTIONS,
        "--area",
        "0",
    ]
    refused = CliRunner().invoke(main, meaningful)
    assert refused.exit_code == 2 and "makes one mask" in refused.output, refused.output


def test_report_compares_runs_side_by_side(class_folders, tmp_path) -> None:
    runs = []
    for name, l1 in (("weak", "0.01"), ("strong", "0.5")):
        out = tmp_path / name
        args = [
            "run",
            str(class_folders),
            "-o",
            str(out),
            "--model",
            TINY,
            "--l1",
            l1,
            "--limit",
            "2",
            *FAST,
            *METRIC_ARGS,
            "--baselines",
            "center",
        ]
        assert CliRunner().invoke(main, args).exit_code == 0
        runs.append(str(out))
    output = tmp_path / "cmp.csv"
    result = CliRunner().invoke(main, ["report", *runs, "-o", str(output)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(output)
    assert list(table["run"]) == ["weak", "weak", "strong", "strong"]
    assert list(table["method"]) == ["meaningful", "center"] * 2  # the run's method labels it
    assert "| weak |" in result.output and "| strong |" in result.output
    assert output.with_suffix(".md").read_text().count("| strong |") == 2

    named = ["report", *runs, "-o", str(output), "--name", "l1=0.001", "--name", "l1=1"]
    assert CliRunner().invoke(main, named).exit_code == 0
    assert list(pd.read_csv(output)["run"]) == ["l1=0.001"] * 2 + ["l1=1"] * 2
    result = CliRunner().invoke(main, ["report", *runs, "-o", str(output), "--name", "one"])
    assert result.exit_code == 2 and "1 names for 2 runs" in result.output
