"""Metric summaries: bootstrap intervals, class-averaged accuracy, summary files, run comparison."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.reports.markdown import markdown_table
from pipeline.reports.tables import (
    METRICS,
    SUMMARY_COLUMNS,
    bootstrap_ci,
    compare_runs,
    macro_accuracy,
    summary_table,
)
from pipeline.reports.writer import write_summary
from pipeline.store.reader import RunFileError
from pipeline.store.writer import MaskStore

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ bootstrap_ci
def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(1).normal(0.4, 0.1, size=200)
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high


def test_bootstrap_interval_narrows_with_more_data() -> None:
    rng = np.random.default_rng(2)
    _, low_small, high_small = bootstrap_ci(rng.random(30))
    _, low_big, high_big = bootstrap_ci(rng.random(3000))
    assert (high_big - low_big) < 0.3 * (high_small - low_small)


def test_bootstrap_width_matches_the_normal_approximation() -> None:
    hits = (np.random.default_rng(3).random(400) < 0.7).astype(float)
    mean, low, high = bootstrap_ci(hits, n_resamples=4000)
    expected = 2 * 1.96 * math.sqrt(mean * (1 - mean) / hits.size)
    assert high - low == pytest.approx(expected, rel=0.15)


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    values = np.random.default_rng(4).random(50)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_bootstrap_ignores_nans() -> None:
    values = np.random.default_rng(5).random(40)
    with_nans = np.concatenate([values, [NAN, NAN]])
    assert bootstrap_ci(with_nans) == bootstrap_ci(values)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([NAN, NAN])))
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([])))
    assert bootstrap_ci(np.array([NAN, 0.25])) == (0.25, 0.25, 0.25)


def test_bootstrap_rejects_bad_confidence() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(3), confidence=1.0)


# ------------------------------------------------------------------ macro_accuracy
def test_macro_accuracy_by_hand() -> None:
    # Class A: hits 1, 0 -> 0.5; class B: 1, 1, 1 -> 1.0; NaN rows (no boxes) are ignored.
    hits = np.array([1.0, 0.0, NAN, 1.0, 1.0, 1.0, NAN])
    classes = np.array(["A", "A", "A", "B", "B", "B", "C"])
    assert macro_accuracy(hits, classes) == pytest.approx(0.75)
    assert np.nanmean(hits) == pytest.approx(0.8)  # micro accuracy differs
    assert math.isnan(macro_accuracy(np.array([NAN]), np.array([0])))


# ------------------------------------------------------------------ summary_table
def _columns() -> dict[str, np.ndarray]:
    """Four images; image 2 failed the curves and has no boxes."""
    return {
        "target": np.array([0, 1, 0, 1]),
        "small_object": np.array([1.0, 0.0, NAN, 1.0]),
        "deletion_auc": np.array([0.1, 0.3, NAN, 0.2]),
        "insertion_auc": np.array([0.5, 0.7, NAN, 0.6]),
        "pointing_hit": np.array([1.0, 0.0, NAN, 1.0]),
        "pointing_energy": np.array([0.5, 0.2, NAN, 0.8]),
        "center_deletion_auc": np.array([0.4, 0.4, NAN, 0.4]),
        "center_insertion_auc": np.array([0.2, 0.3, NAN, 0.4]),
        "center_pointing_hit": np.array([1.0, 0.0, NAN, 0.0]),
        "center_pointing_energy": np.array([0.3, 0.3, NAN, 0.3]),
        "deletion_curve": np.zeros((4, 5)),  # 2-D columns are ignored
    }


def test_summary_table_means_and_counts_by_hand() -> None:
    table = summary_table(_columns(), n_resamples=200).set_index("method")
    assert list(table.index) == ["method", "center"]  # no random_* columns: no row
    ours, center = table.loc["method"], table.loc["center"]
    assert ours["images"] == 3 and ours["pointing_images"] == 3 and ours["small_images"] == 2
    assert ours["deletion_auc"] == pytest.approx(0.2)
    assert ours["insertion_auc"] == pytest.approx(0.6)
    assert ours["pointing_acc"] == pytest.approx(2 / 3)
    assert ours["pointing_acc_macro"] == pytest.approx(0.75)  # class 0: 1/1, class 1: 1/2
    assert ours["pointing_acc_small"] == pytest.approx(1.0)
    assert ours["pointing_energy"] == pytest.approx(0.5)
    assert center["deletion_auc"] == pytest.approx(0.4)
    assert center["insertion_auc"] == pytest.approx(0.3)
    assert center["pointing_acc"] == pytest.approx(1 / 3)
    assert center["pointing_acc_macro"] == pytest.approx(0.5)  # class 0: 1/1, class 1: 0/2
    assert center["pointing_acc_small"] == pytest.approx(0.5)
    for name in ("deletion_auc", "pointing_acc", "pointing_energy"):
        assert ours[f"{name}_low"] <= ours[name] <= ours[f"{name}_high"]
    assert center["deletion_auc_low"] == center["deletion_auc_high"] == pytest.approx(0.4)


def test_summary_table_columns_and_missing_metrics() -> None:
    columns = {"deletion_auc": np.array([0.2, 0.4]), "random_pointing_hit": np.array([0.0, 1.0])}
    table = summary_table(columns, n_resamples=50)
    assert list(table.columns) == SUMMARY_COLUMNS
    assert list(table["method"]) == ["method", "random"]
    ours, random = table.iloc[0], table.iloc[1]
    assert ours["images"] == 2 and ours["pointing_images"] == 0
    assert math.isnan(ours["pointing_acc"]) and math.isnan(ours["insertion_auc"])
    assert random["images"] == 0 and random["pointing_acc"] == pytest.approx(0.5)
    assert summary_table({"index": np.arange(3)}).empty


# ------------------------------------------------------------------ files
PROTOCOL = {
    "step": 224,
    "blur_kernel": 11,
    "blur_sigma": 5.0,
    "tolerance": 15.0,
    "deletion_substrate": "normalisation mean colour",
    "insertion_substrate": "11x11 Gaussian blur, sigma 5, normalised space, zero padding",
}


def _write_run(folder: Path, model: str, preset: str, shift: float = 0.0) -> Path:
    """A small masks.h5 with the method's and both baselines' metrics and curves."""
    rng = np.random.default_rng(0)
    n, steps = 6, 8
    columns: dict[str, np.ndarray | list] = {
        "masks": rng.random((n, 4, 4)).astype(np.float32),
        "path": [f"img_{i}.jpg" for i in range(n)],
        "index": np.arange(n),
        "target": np.array([0, 0, 1, 1, 2, 2]),
        "small_object": np.array([1.0, 0.0, 1.0, 0.0, NAN, 0.0]),
    }
    decreasing = np.linspace(1.0, 0.0, steps + 1)
    for prefix, level in (("", 0.2), ("center_", 0.5), ("random_", 0.6)):
        columns[f"{prefix}deletion_curve"] = np.tile(decreasing * level, (n, 1)).astype(np.float32)
        columns[f"{prefix}insertion_curve"] = np.tile(1 - decreasing, (n, 1)).astype(np.float32)
        columns[f"{prefix}deletion_auc"] = np.full(n, level / 2 + shift)
        columns[f"{prefix}insertion_auc"] = np.full(n, 0.5)
        columns[f"{prefix}pointing_hit"] = np.array([1.0, 1.0, 0.0, 1.0, NAN, 1.0])
        columns[f"{prefix}pointing_energy"] = np.array([0.6, 0.5, 0.1, 0.4, NAN, 0.9])
    config = {"model": model, "preset": preset, "mask": {"iterations": 3}}
    with MaskStore.open(folder / "masks.h5", config, {"torch": "x"}) as store:
        store.append(columns, [(6, "broken.jpg", "truncated")])
        timings = {"load": 1.0, "optimize": 6.0, "evaluate": 2.0, "write": 1.0, "total": 10.0}
        store.set_attrs(
            protocol=PROTOCOL, class_names=["a", "b", "c"], timings=timings | {"images_per_s": 0.6}
        )
    return folder / "masks.h5"


def test_write_summary_writes_csv_markdown_and_curves(tmp_path) -> None:
    masks = _write_run(tmp_path / "run", "resnet50", "seed")
    table = write_summary(masks, tmp_path / "run", skipped=2, name="demo", n_resamples=100)
    assert list(table["method"]) == ["method", "center", "random"]
    assert table.loc[0, "deletion_auc"] == pytest.approx(0.1)
    assert table.loc[0, "pointing_acc"] == pytest.approx(0.8)

    saved = pd.read_csv(tmp_path / "run" / "summary.csv")
    pd.testing.assert_frame_equal(saved, table, check_dtype=False)

    md = (tmp_path / "run" / "summary.md").read_text(encoding="utf-8")
    assert md.startswith("# Saliency evaluation: demo")
    for text in (
        "model: resnet50",
        "preset: seed",
        "images evaluated: 6",
        "images skipped: 2",
        "unreadable images recorded in masks.h5: 1",
        "step: 224",
        "blur_kernel: 11",
        "blur_sigma: 5.0",
        "tolerance: 15.0",
        "insertion_substrate: 11x11 Gaussian blur",
        "waiting for data 1.0 s (10.0%), optimising 6.0 s (60.0%), evaluating 2.0 s (20.0%), "
        "writing 1.0 s (10.0%), total 10.0 s, 0.6 images/s",
    ):
        assert text in md, text
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 3  # header, rule, one row per method
    assert table_lines[2].startswith("| method | 6 | 0.100 [0.100, 0.100] |")

    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_markdown_table_marks_missing_values() -> None:
    table = summary_table({"deletion_auc": np.array([0.25, 0.25])}, n_resamples=10)
    lines = markdown_table(table).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| method | 2 | 0.250 [0.250, 0.250] | n/a |" in lines[2]


def test_write_summary_without_protocol_or_curves(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, {"model": "tiny"}, {}) as store:
        store.append({m: np.array([0.5, 1.0]) for m in METRICS}, [])
    table = write_summary(path, tmp_path / "out", n_resamples=10)
    assert list(table["method"]) == ["method"]
    md = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "not recorded in masks.h5" in md and "preset: unknown" in md
    assert "## Time" not in md  # no timings attribute: no section
    assert (tmp_path / "out" / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_compare_runs_stacks_runs(tmp_path) -> None:
    for name, model, preset, shift in (
        ("run_a", "resnet50", "seed", 0.0),
        ("run_b", "vgg16", "fast", 0.05),
    ):
        write_summary(
            _write_run(tmp_path / name, model, preset, shift), tmp_path / name, n_resamples=20
        )
    both = compare_runs([tmp_path / "run_a", tmp_path / "run_b" / "summary.csv"])
    assert len(both) == 6
    assert list(both.columns[:4]) == ["run", "model", "preset", "method"]
    assert list(both["run"]) == ["run_a"] * 3 + ["run_b"] * 3
    assert list(both["model"]) == ["resnet50"] * 3 + ["vgg16"] * 3
    assert list(both["preset"]) == ["seed"] * 3 + ["fast"] * 3
    ours = both[both["method"] == "method"].set_index("run")["deletion_auc"]
    assert ours["run_b"] - ours["run_a"] == pytest.approx(0.05)


def test_compare_runs_without_mask_file_or_summary(tmp_path) -> None:
    folder = tmp_path / "copied"
    folder.mkdir()
    summary_table({"deletion_auc": np.array([0.1])}).to_csv(folder / "summary.csv", index=False)
    table = compare_runs([folder])
    assert list(table["run"]) == ["copied"] and table.loc[0, "model"] == ""
    with pytest.raises(RunFileError, match="missing: no such file"):  # one line, exit 2
        compare_runs([tmp_path / "missing"])


def test_localization_error_by_hand() -> None:
    from pipeline.metrics.localization import ALPHA_GRID
    from pipeline.reports.tables import localization_curves

    energy = np.array([1.0, 0.0, 1.0, np.nan])  # 3 images with boxes, 2 hits
    curve = np.zeros((4, len(ALPHA_GRID["energy"])))
    curve[:, 3] = [1.0, 1.0, 1.0, np.nan]
    curve[3] = np.nan
    columns = {
        "deletion_auc": np.array([0.1, 0.2, 0.3, 0.4]),
        "loc_hit_energy": energy,
        "loc_hit_value": np.array([0.0, 0.0, 1.0, np.nan]),
        "loc_hit_mean": np.array([1.0, 1.0, 1.0, np.nan]),
        "loc_curve_energy": curve,
        "center_deletion_auc": np.array([0.1, 0.2, 0.3, 0.4]),
        "center_loc_hit_energy": np.array([0.0, 0.0, 0.0, np.nan]),
    }
    table = summary_table(columns, n_resamples=100, label="extremal").set_index("method")
    assert table.loc["extremal", "loc_error"] == pytest.approx(1 / 3)
    assert table.loc["extremal", "loc_error_value"] == pytest.approx(2 / 3)
    assert table.loc["extremal", "loc_error_mean"] == pytest.approx(0.0)
    assert table.loc["center", "loc_error"] == pytest.approx(1.0)
    errors = localization_curves(columns, label="extremal")
    assert set(errors["method"]) == {"extremal"} and set(errors["rule"]) == {"energy"}
    assert list(errors["images"].unique()) == [3]
    by_alpha = errors.set_index("alpha")["loc_error"]
    assert by_alpha[ALPHA_GRID["energy"][3]] == pytest.approx(0.0)
    assert by_alpha[ALPHA_GRID["energy"][0]] == pytest.approx(1.0)
