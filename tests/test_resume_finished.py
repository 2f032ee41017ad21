"""The second night: a finished run resumed over a grown folder, or after `mpbatch evaluate`
rescored it, and killed (SIGKILL) at every stage of the store's commit protocol.

After each kill, a rerun must end with every image of today's folder exactly once, every
mask of the first night bitwise as it was (copied, never explained again), and the same
file as an uninterrupted second night. One image a batch, so that the images explained on
the second night are optimised exactly as in a run from scratch (see test_resume.py).
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from test_resume import ONE_A_BATCH, _new_image, mpbatch

from pipeline.commands.stopping import EXIT_INTERRUPTED
from pipeline.store.reader import read_columns
from pipeline.store.writer import journal_dir

FIRST = 4  # images of the first night (more than the new ones: re-explaining them would show)
GROWN = 6  # images after the folder grew
EVALUATE = ["--step", "64", "--baselines", "center", "--workers", "0", "--quiet"]
# ONE_A_BATCH with evaluate's scoring protocol (the last value of an option wins)
RESCORED = [*ONE_A_BATCH, "--step", "64"]


def _folder(path: Path, count: int) -> Path:
    path.mkdir(exist_ok=True)
    for i in range(count):
        if not (path / f"img{i:02d}.png").exists():
            _new_image(path / f"img{i:02d}.png", i)
    return path


def _written(result) -> int:
    """How many masks a run says it wrote."""
    found = re.search(r"(\d+) masks written", result.stdout)
    assert found, result.stdout + result.stderr
    return int(found.group(1))


@pytest.fixture(scope="module")
def grown_fresh(tmp_path_factory) -> Path:
    """An uninterrupted run from scratch over the grown folder."""
    root = tmp_path_factory.mktemp("fresh")
    out = root / "out"
    result = mpbatch("run", str(_folder(root / "data", GROWN)), "-o", str(out), *ONE_A_BATCH)
    assert result.returncode == 0, result.stderr
    return out


def _second_night(tmp_path: Path, rescore: bool = False) -> tuple[Path, Path, Path]:
    """A finished run over FIRST images (rescored by `mpbatch evaluate` with another step
    when `rescore`), then its folder grown to GROWN images: (data, OUT, a copy of the first
    night's mask file)."""
    data, out = _folder(tmp_path / "data", FIRST), tmp_path / "out"
    result = mpbatch("run", str(data), "-o", str(out), *ONE_A_BATCH)
    assert result.returncode == 0, result.stderr
    if rescore:
        result = mpbatch("evaluate", str(out), *EVALUATE)
        assert result.returncode == 0, result.stderr
    first = shutil.copy(out / "masks.h5", tmp_path / "first-night.h5")
    _folder(data, GROWN)
    return data, out, Path(first)


def _assert_first_night_kept(out: Path, first_night: Path) -> dict:
    """Every image of the grown folder once, in listing order, the first night's masks bitwise
    as they were; the file complete and its journal gone. Returns the columns."""
    got, attrs = read_columns(out / "masks.h5")
    first, _ = read_columns(first_night)
    assert list(got["path"]) == [f"img{i:02d}.png" for i in range(GROWN)]
    assert np.array_equal(got["masks"][:FIRST], first["masks"])
    assert attrs["complete"] and not journal_dir(out / "masks.h5").exists()
    return got


KILLS = ["base-write:1", "part-write:1", "main-write:1", "after-commit:1", "after-commit:2"]


@pytest.mark.parametrize("kill_at", KILLS)
def test_a_finished_run_grown_and_killed_keeps_every_row(grown_fresh, tmp_path, kill_at):
    data, out, first_night = _second_night(tmp_path)
    killed = mpbatch(
        "run", str(data), "-o", str(out), *ONE_A_BATCH, env={"MPBATCH_KILL_AT": kill_at}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = mpbatch("run", str(data), "-o", str(out), *ONE_A_BATCH)
    assert resumed.returncode == 0, resumed.stderr
    assert _written(resumed) <= GROWN - FIRST  # the first night is not explained again
    got = _assert_first_night_kept(out, first_night)
    want, _ = read_columns(grown_fresh / "masks.h5")
    assert set(got) == set(want)
    for name, values in want.items():  # the same file as an uninterrupted second night
        if name == "file_mtime_ns":  # the other run's copies of the images
            continue
        assert np.array_equal(got[name], values, equal_nan=values.dtype.kind == "f"), name


def test_a_resume_after_evaluate_with_the_runs_own_protocol_is_refused_in_one_line(tmp_path):
    data, out, _ = _second_night(tmp_path, rescore=True)
    before, before_attrs = read_columns(out / "masks.h5")
    for _ in range(2):  # and again: nothing was changed by the first refusal
        refused = mpbatch("run", str(data), "-o", str(out), *ONE_A_BATCH)
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "mpbatch evaluate" in lines[0], lines
        assert "'step': 64" in lines[0] and "'step': 128" in lines[0]
    after, after_attrs = read_columns(out / "masks.h5")  # untouched
    assert after_attrs == before_attrs and set(after) == set(before)
    for name, values in before.items():
        assert np.array_equal(after[name], values, equal_nan=values.dtype.kind == "f"), name
    assert not journal_dir(out / "masks.h5").exists()


@pytest.mark.parametrize("kill_at", ["base-write:1", "part-write:1", "after-commit:2"])
def test_a_rescored_run_resumes_with_evaluates_protocol_through_any_kill(tmp_path, kill_at):
    data, out, first_night = _second_night(tmp_path, rescore=True)
    rescored, _ = read_columns(first_night)
    killed = mpbatch("run", str(data), "-o", str(out), *RESCORED, env={"MPBATCH_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = mpbatch("run", str(data), "-o", str(out), *RESCORED)
    assert resumed.returncode == 0, resumed.stderr
    assert _written(resumed) <= GROWN - FIRST
    got = _assert_first_night_kept(out, first_night)
    curve = got["deletion_curve"]
    assert curve.shape == (GROWN, 17) and np.isfinite(curve).all()  # step 64 on 32×32
    assert np.array_equal(curve[:FIRST], rescored["deletion_curve"])  # evaluate's scores kept


def test_a_rescored_run_resumes_without_metrics_then_evaluate_scores_all(tmp_path):
    data, out, first_night = _second_night(tmp_path, rescore=True)
    unscored = mpbatch("run", str(data), "-o", str(out), *ONE_A_BATCH, "--no-metrics")
    assert unscored.returncode == 0, unscored.stderr
    got = _assert_first_night_kept(out, first_night)
    assert np.isnan(got["deletion_auc"][FIRST:]).all()  # not scored yet
    again = mpbatch("run", str(data), "-o", str(out), *ONE_A_BATCH, "--no-metrics")
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr
    scored = mpbatch("evaluate", str(out), *EVALUATE)
    assert scored.returncode == 0, scored.stderr
    assert np.isfinite(read_columns(out / "masks.h5")[0]["deletion_auc"]).all()


def test_a_stop_signal_while_the_reports_are_written_exits_75(tmp_path):
    data, out, first_night = _second_night(tmp_path)
    for report in ("report.csv", "summary.csv"):
        (out / report).unlink()
    stopped = mpbatch(
        "run",
        str(data),
        "-o",
        str(out),
        *ONE_A_BATCH,
        env={"MPBATCH_SIGNAL_AT_REPORTS": "SIGUSR1"},
    )
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert "while writing the reports" in stopped.stderr
    assert not (out / "summary.csv").exists()  # skipped: the rerun writes it
    rerun = mpbatch("run", str(data), "-o", str(out), *ONE_A_BATCH)
    assert rerun.returncode == 0 and "already done" in rerun.stderr, rerun.stderr
    assert (out / "report.csv").exists() and (out / "summary.csv").exists()
    _assert_first_night_kept(out, first_night)
