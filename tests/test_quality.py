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
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    from pipeline.store import read_columns

    mine, _ = read_columns(tmp_path / "sweep" / "t-seed" / "masks.h5")
    theirs, _ = read_columns(tmp_path / "sweep" / "t-baselines" / "masks.h5")
    assert list(mine["path"]) == list(theirs["path"])
    expected = np.mean(mine["deletion_auc"] - theirs["center_deletion_auc"])
    assert abs(seed["d_deletion_auc"] - expected) < 1e-9
    assert seed["s_per_image_map"] > 0 and table.loc[1, "s_per_image_map"] == 0.0
    expected_beats = seed["d_deletion_auc"] < 0 and seed["d_insertion_auc"] > 0
    assert bool(seed["beats_centre"]) == bool(
        expected_beats and seed["d_pointing_small_smooth"] > 0
    )
    saved = pd.read_csv(tmp_path / "results" / "quality_t.csv")
    assert len(saved) == 4
    md = (tmp_path / "results" / "quality_t.md").read_text()
    assert md.startswith("<!-- command: python benchmarks/quality.py") and "| seed |" in md

    again = quality.main(argv)  # finished runs are resumed with nothing to do
    pd.testing.assert_frame_equal(again, table)
