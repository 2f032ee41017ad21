"""benchmarks/quality.py on the tiny model: a sweep of two settings over a subset, resumed,
tabulated with the paired differences against the centre baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tiny_models import TINY

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = f"--model {TINY} --size 32 --step 256 --workers 0 --quiet"  # the seed preset: 500 steps


def _quality():
    return importlib.import_module("benchmarks.quality")


def test_sweep_tabulates_settings_against_the_centre(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (data / wnid).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (30, 34, 3), dtype=np.uint8)).save(
                data / wnid / f"{i}.png"
            )
    quality = _quality()
    argv = [str(data), "--out-root", str(tmp_path / "sweep"), "--start", "1", "--stop", "5"]
    argv += ["--settings", "baselines,seed", "--run-args", RUN_ARGS, "--tag", "t"]
    argv += ["--results", str(tmp_path / "results")]
    table = quality.main(argv)

    linked = sorted(
        p.relative_to(tmp_path / "sweep" / "data-1-5").as_posix()
        for p in (tmp_path / "sweep" / "data-1-5").rglob("*.png")
    )
    assert linked == ["n01440764/1.png", "n01440764/2.png", "n01443537/0.png", "n01443537/1.png"]
    assert list(zip(table["setting"], table["row"], strict=True)) == [
        ("baselines", "gradcam"),
        ("baselines", "center"),
        ("baselines", "random"),
        ("seed", "meaningful"),
    ]
    assert (table["images"] == 4).all()
    seed = table.set_index("setting").loc["seed"]
    # the paired difference, recomputed by hand from the two runs' files
    from pipeline.store.reader import read_columns

    mine, _ = read_columns(tmp_path / "sweep" / "t-seed" / "masks.h5")
    theirs, _ = read_columns(tmp_path / "sweep" / "t-baselines" / "masks.h5")
    assert list(mine["path"]) == list(theirs["path"])
    # in float64, as quality.py pairs them (a float32 mean differs by its rounding, ~1e-9,
    # and which way depends on the CPU's kernels: seen with ATEN_CPU_CAPABILITY=default)
    expected = np.mean(np.float64(mine["deletion_auc"]) - theirs["center_deletion_auc"])
    assert abs(seed["d_deletion_auc"] - expected) < 1e-9
    # and against Grad-CAM, the baselines run's own method (its unprefixed columns)
    expected = np.mean(np.float64(mine["insertion_auc"]) - theirs["insertion_auc"])
    assert abs(seed["d_gradcam_insertion_auc"] - expected) < 1e-9
    assert np.isnan(table.set_index("row").loc["gradcam", "d_gradcam_deletion_auc"])
    assert seed["s_per_image_map"] > 0 and table.loc[1, "s_per_image_map"] == 0.0
    assert seed["prob_masked_median"] == float(np.median(mine["prob_masked"]))
    assert np.isnan(table.set_index("row").loc["center", "prob_masked_median"])  # no mask
    expected_beats = seed["d_deletion_auc"] < 0 and seed["d_insertion_auc"] > 0
    assert bool(seed["beats_centre"]) == bool(
        expected_beats and seed["d_pointing_small_smooth"] > 0
    )
    saved = pd.read_csv(tmp_path / "results" / "quality_t.csv")
    assert len(saved) == 4
    md = (tmp_path / "results" / "quality_t.md").read_text()
    assert md.startswith("<!-- command: python -m benchmarks.quality") and "| seed |" in md

    again = quality.main(argv)  # finished runs are resumed with nothing to do
    pd.testing.assert_frame_equal(again, table)

    quality.main(argv + ["--table-only", "--per-image"])
    per_image = pd.read_csv(tmp_path / "results" / "quality_t_per_image.csv").set_index("path")
    assert sorted(per_image.index) == sorted(mine["path"])
    rows = list(mine["path"])
    np.testing.assert_allclose(per_image.loc[rows, "seed:deletion_auc"], mine["deletion_auc"], 1e-5)
    np.testing.assert_allclose(
        per_image.loc[rows, "baselines:center_insertion_auc"], theirs["center_insertion_auc"], 1e-5
    )
    assert "seed:deletion_curve" not in per_image  # curves and masks stay in the mask files


def test_small_only_links_the_images_whose_label_boxes_cover_under_a_quarter(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (20, 10), (90, 90, 90)).save(data / "val" / f"{name}.JPEG")
    tench = "n01440764"  # class 0
    rows = {
        "a": f"{tench} 0 0 3 3",  # 4×4 of 20×10 pixels (pointing's inclusive convention): 8%
        "b": f"{tench} 0 0 9 9",  # 10×10: 50%
        "c": f"{tench} 0 0 9 4",  # 10×5: exactly 25%, not small
        "d": "",  # no boxes: never small
    }
    (data / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{k},{v}\n" for k, v in rows.items())
    )
    folder = _quality().subset_folder(data, tmp_path / "sweep", 0, 4, small_only=True)
    assert folder.name == "data-0-4-small"
    assert sorted(p.name for p in (folder / "val").iterdir()) == ["a.JPEG"]
    assert (folder / "LOC_val_solution.csv").exists()


def test_sigterm_to_the_sweep_stops_its_run_and_starts_no_other_setting(tmp_path) -> None:
    """`timeout` signals the sweep alone (benchmarks/gpu_quality.sh): the signal goes on to
    the running `mpbatch run`, which stops resumably, and no further setting starts."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data" / "n01440764"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (34, 30), (40 * i, 90, 90)).save(data / f"{i}.png")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "benchmarks.quality", str(data.parent)]
    command += ["--out-root", str(sweep), "--settings", "seed,paper", "--tag", "t"]
    command += ["--run-args", RUN_ARGS + " --iterations 1000000", "--results", str(tmp_path)]
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    process = subprocess.Popen(
        command, env=environment, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (sweep / "t-seed" / "masks.h5").exists():  # the seed run is optimising
        assert process.poll() is None and time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert "stopped by SIGTERM after 0 of 2 images" in stderr  # the run's own resumable stop
    assert "seed: mpbatch exited 75; rerun to resume" in stderr
    assert not (sweep / "t-paper").exists()
    # nothing finished: the table says so rather than printing an empty header
    assert f"no setting has a finished image under {sweep}" in stderr
    assert "No setting has a finished image yet." in (tmp_path / "quality_t.md").read_text()


def test_an_unmerged_sharded_run_is_tabulated_from_its_finished_shards(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    data = tmp_path / "data" / "n01440764"
    data.mkdir(parents=True)
    for i in (2, 3, 4, 5):  # shards split by a hash of the path: 4 and 5 are shard 1's
        Image.new("RGB", (34, 30), (60 * i, 90, 90)).save(data / f"{i}.png")
    quality = _quality()
    argv = [str(data.parent), "--out-root", str(tmp_path / "sweep"), "--stop", "4"]
    argv += ["--settings", "seed", "--tag", "t", "--results", str(tmp_path / "results")]
    table = quality.main(argv + ["--run-args", RUN_ARGS + " --iterations 5 --shard 1/2"])
    out = tmp_path / "sweep" / "t-seed"
    assert not (out / "masks.h5").exists()  # shard 0 never ran: nothing merged
    from pipeline.store.reader import read_columns

    shard, _ = read_columns(out / "masks-00001-of-00002.h5")
    assert list(shard["path"]) == ["n01440764/4.png", "n01440764/5.png"]
    # shard 0 being written by another process cannot be opened (HDF5's lock): left out
    (out / "masks-00000-of-00002.h5").write_bytes(b"not yet an HDF5 file")
    again = quality.main(argv + ["--table-only"])
    assert again["images"].tolist() == [2]
    assert "masks-00000-of-00002.h5: cannot be read now, left out" in capsys.readouterr().err
    assert table["images"].tolist() == [2]
    assert abs(table.loc[0, "deletion_auc"] - float(np.mean(shard["deletion_auc"]))) < 1e-6
    assert "| seed | meaningful | 2 |" in (tmp_path / "results" / "quality_t.md").read_text()


def test_small_object_pointing_counts_only_small_objects_with_a_value() -> None:
    quality = _quality()
    columns = {
        "small_object": np.array([1.0, 1.0, 0.0, 1.0, np.nan]),
        "gradcam_pointing_hit_smooth": np.array([1.0, 0.0, 1.0, np.nan, 1.0]),
    }
    # small and scored: images 0 and 1 (image 3 has no value, image 4 no boxes) → 1/2
    assert quality.small_object_mean(columns, "gradcam_pointing_hit_smooth") == 0.5
    assert np.isnan(quality.small_object_mean(columns, "pointing_hit_smooth"))
    assert np.isnan(
        quality.small_object_mean(
            {**columns, "small_object": np.zeros(5)}, "gradcam_pointing_hit_smooth"
        )
    )
