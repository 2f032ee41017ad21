"""Never lose a night's work: killed runs resume to the same result; signals; damage repair.

Each run is a real `python -m cli run` subprocess on a tiny model, killed with SIGKILL at
chosen points (tests/crashing_cli.py's MPBATCH_KILL_AT stages, or whenever the journal has k
batches), then rerun without the fault; the result must equal an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny_models import TINY_OPTIONS

from pipeline.commands.stopping import EXIT_INTERRUPTED
from pipeline.store.reader import read_columns, read_failures
from pipeline.store.writer import journal_dir

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    *TINY_OPTIONS,
    "--iterations",
    "4",
    "--mask-size",
    "8",
    "--batch-size",
    "3",
    "--step",
    "128",
    "--baselines",
    "center",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(11):
        pixels = rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    (folder / "img05_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def mpbatch(*args: str, env: dict | None = None, wait: bool = True):
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    environment.update(env or {})
    # crashing_cli is `mpbatch` with the kill points of MPBATCH_KILL_AT (the test's own)
    command = [sys.executable, "-m", "crashing_cli", *args]
    if not wait:
        return subprocess.Popen(
            command,
            env=environment,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    return subprocess.run(
        command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = mpbatch("run", str(data), "-o", str(out), *ARGS)
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    got, got_attrs = read_columns(out / "masks.h5")
    want, _ = read_columns(reference / "masks.h5")
    assert set(got) == set(want)
    assert list(got["path"]) == list(want["path"])
    assert list(got["index"]) == list(want["index"])  # same rows, same order, no duplicates
    assert np.array_equal(got["masks"], want["masks"])  # bitwise on CPU
    for name in want:
        floats = want[name].dtype.kind == "f"
        assert np.array_equal(got[name], want[name], equal_nan=floats), name
    assert read_failures(out / "masks.h5") == read_failures(reference / "masks.h5")
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "report.csv"), pd.read_csv(reference / "report.csv")
    )
    assert got_attrs.get("complete") and not journal_dir(out / "masks.h5").exists()


@pytest.mark.parametrize("kill_at", ["main-write:2", "part-write:3", "after-commit:1"])
def test_killed_at_a_write_resumes_to_the_same_file(data, reference, tmp_path, kill_at):
    out = tmp_path / "out"
    killed = mpbatch("run", str(data), "-o", str(out), *ARGS, env={"MPBATCH_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL
    resumed = mpbatch("run", str(data), "-o", str(out), *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def _wait_for_parts(out: Path, count: int, process, timeout: float = 120) -> None:
    parts = journal_dir(out / "masks.h5")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read()}")
        if parts.is_dir() and len(list(parts.glob("part-*.h5"))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("the run never wrote the expected batches")


def test_killed_mid_batch_resumes(data, reference, tmp_path):
    out = tmp_path / "out"
    process = mpbatch("run", str(data), "-o", str(out), *ARGS, wait=False)
    _wait_for_parts(out, 2, process)
    process.kill()
    process.wait()
    resumed = mpbatch("run", str(data), "-o", str(out), *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def test_damaged_file_is_rebuilt_from_the_journal(data, reference, tmp_path):
    out = tmp_path / "out"
    killed = mpbatch(
        "run", str(data), "-o", str(out), *ARGS, env={"MPBATCH_KILL_AT": "after-commit:3"}
    )
    assert killed.returncode == -signal.SIGKILL
    masks = out / "masks.h5"
    raw = bytearray(masks.read_bytes())
    raw[: len(raw) // 2] = b"\0" * (len(raw) // 2)  # superblock and metadata gone
    masks.write_bytes(bytes(raw))
    resumed = mpbatch("run", str(data), "-o", str(out), *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert "damaged" in resumed.stderr
    assert (out / "masks.h5.damaged").exists()  # the damaged file is kept, not deleted
    assert_same_run(out, reference)


def test_sigterm_finishes_the_batch_and_exits_75(data, reference, tmp_path):
    out = tmp_path / "out"
    process = mpbatch("run", str(data), "-o", str(out), *ARGS, wait=False)
    _wait_for_parts(out, 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED == 75, stderr
    assert "SIGTERM" in stderr and "resume" in stderr
    columns, attrs = read_columns(out / "masks.h5")
    assert 0 < attrs["rows"] + attrs["failures"] < 12 and len(columns["path"]) == attrs["rows"]
    resumed = mpbatch("run", str(data), "-o", str(out), *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def test_finished_run_does_no_work_and_changed_settings_are_refused(data, reference, tmp_path):
    again = mpbatch("run", str(data), "-o", str(reference), *ARGS)
    assert again.returncode == 0 and "already done" in again.stderr
    assert "0 masks written" in again.stdout
    changed = mpbatch("run", str(data), "-o", str(reference), *ARGS, "--l1", "0.5")
    assert changed.returncode == 2 and "other settings" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    assert_same_run(reference, reference)  # untouched


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_stop_is_honoured_within_seconds_with_workers(data, tmp_path):
    """A batch that would optimise for minutes, DataLoader workers, and SIGTERM sent to the
    whole process group (as SLURM and a terminal do): the run stops within seconds instead
    of finishing the batch, drops it, and exits 75."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cli", "run", str(data), "-o", str(out), *ARGS]
    command += ["--iterations", "1000000", "--workers", "2"]  # the last value of an option wins
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    process = subprocess.Popen(
        command,
        env=environment,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while len(_children(process.pid)) < 2:  # the workers start inside the batch loop
        assert process.poll() is None and time.monotonic() < deadline, "no workers started"
        time.sleep(0.1)
    time.sleep(1.0)  # the first batch is being optimised
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    waited = time.monotonic() - signalled
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "stopped by SIGTERM after 0 of 12 images" in stderr
    assert waited < 30, f"the stop took {waited:.1f} s"
    columns, attrs = read_columns(out / "masks.h5")
    assert attrs["rows"] == attrs["failures"] == 0  # the unfinished batch dropped


# ------------------------------------------------------------------ a folder that changes
def _copy(data: Path, folder: Path) -> Path:
    folder.mkdir()
    for path in data.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _new_image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (36, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# One image a batch: a resumed run then optimises each image exactly as a run from scratch
# does (with more images a batch, the neighbours differ, and so does the rounding of the
# convolutions, which the optimisation and the deletion order can amplify).
ONE_A_BATCH = [*ARGS, "--batch-size", "1"]


def assert_matches_a_fresh_run(out: Path, data: Path, tmp_path: Path) -> None:
    """The resumed run holds every image of today's folder exactly once, in listing order,
    and equals, bit for bit, a run made from scratch over today's folder."""
    fresh = tmp_path / "fresh"
    result = mpbatch("run", str(data), "-o", str(fresh), *ONE_A_BATCH)
    assert result.returncode == 0, result.stderr
    got, attrs = read_columns(out / "masks.h5")
    want, _ = read_columns(fresh / "masks.h5")
    today = sorted(p.name for p in data.iterdir() if "broken" not in p.name)
    assert list(got["path"]) == today
    assert set(got) == set(want)
    for name, values in want.items():
        assert np.array_equal(got[name], values, equal_nan=values.dtype.kind == "f"), name
    assert read_failures(out / "masks.h5") == read_failures(fresh / "masks.h5")
    assert attrs["complete"] and not journal_dir(out / "masks.h5").exists()


def _killed_after_two_images(data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the data and a run over it killed (SIGKILL) once img00 and img01 are done."""
    folder = _copy(data, tmp_path / "data")
    out = tmp_path / "out"
    killed = mpbatch(
        "run", str(folder), "-o", str(out), *ONE_A_BATCH, env={"MPBATCH_KILL_AT": "after-commit:2"}
    )
    assert killed.returncode == -signal.SIGKILL
    return folder, out


def _resume(folder: Path, out: Path):
    resumed = mpbatch("run", str(folder), "-o", str(out), *ONE_A_BATCH)
    assert resumed.returncode == 0, resumed.stderr
    return resumed


def test_a_same_count_swap_resumes_by_path(data, tmp_path):
    """The issue's reproduction: kill after a first commit, remove one image and add
    another (the same count), rerun. Main kept positions, so one image came twice and the
    new one never."""
    folder, out = _killed_after_two_images(data, tmp_path)
    (folder / "img07.png").unlink()
    _new_image(folder / "img00a.png", 100)
    resumed = _resume(folder, out)
    assert "1 added (img00a.png), 1 removed (img07.png), 0 replaced" in resumed.stderr
    assert_matches_a_fresh_run(out, folder, tmp_path)


def test_added_files_are_explained(data, tmp_path):
    folder, out = _killed_after_two_images(data, tmp_path)
    _new_image(folder / "img00a.png", 101)  # before the images already done
    _new_image(folder / "img99.png", 102)
    resumed = _resume(folder, out)
    assert "2 added (img00a.png, img99.png)" in resumed.stderr
    assert "0 rows of removed or replaced images" in resumed.stderr
    assert_matches_a_fresh_run(out, folder, tmp_path)


def test_rows_of_removed_files_are_moved_out_not_lost(data, tmp_path):
    folder, out = _killed_after_two_images(data, tmp_path)
    (folder / "img01.png").unlink()  # done before the kill
    (folder / "img09.png").unlink()  # not yet done
    resumed = _resume(folder, out)
    assert "2 removed (img01.png, img09.png)" in resumed.stderr
    assert "1 rows of removed or replaced images moved to" in resumed.stderr
    (moved,) = (out / "dropped").glob("masks-*.h5")
    assert list(read_columns(moved)[0]["path"]) == ["img01.png"]
    assert_matches_a_fresh_run(out, folder, tmp_path)


def test_a_file_replaced_under_the_same_name_is_explained_again(data, tmp_path):
    folder, out = _killed_after_two_images(data, tmp_path)
    before = read_columns(out / "masks.h5")[0]
    assert "img01.png" in list(before["path"])
    _new_image(folder / "img01.png", 103)  # other pixels, same name
    resumed = _resume(folder, out)
    assert "1 replaced (img01.png)" in resumed.stderr
    after = read_columns(out / "masks.h5")[0]
    row = list(after["path"]).index("img01.png")
    assert not np.allclose(after["masks"][row], before["masks"][1])  # explained anew
    assert_matches_a_fresh_run(out, folder, tmp_path)


def test_a_finished_run_explains_images_added_since(data, tmp_path):
    """Main said "already done" and never explained the new image."""
    folder = _copy(data, tmp_path / "data")
    out = tmp_path / "out"
    assert mpbatch("run", str(folder), "-o", str(out), *ONE_A_BATCH).returncode == 0
    (folder / "img03.png").unlink()
    _new_image(folder / "img03b.png", 104)
    again = mpbatch("run", str(folder), "-o", str(out), *ONE_A_BATCH)
    assert again.returncode == 0, again.stderr
    assert "already done" not in again.stderr and "1 masks written" in again.stdout
    assert_matches_a_fresh_run(out, folder, tmp_path)
    unchanged = mpbatch("run", str(folder), "-o", str(out), *ONE_A_BATCH)
    assert "already done" in unchanged.stderr and "changed" not in unchanged.stderr


# ------------------------------------------------------------------ two processes, one OUT
def _wait_for_holder(out: Path, process, timeout: float = 120) -> str:
    lock = out / ".masks.h5.lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        text = lock.read_text() if lock.exists() else ""
        if text.startswith("pid"):
            return text.strip()
        time.sleep(0.05)
    raise AssertionError("the first run never took its lock")


def test_a_second_process_on_a_live_out_is_refused_even_with_overwrite(data, reference, tmp_path):
    out = tmp_path / "out"
    first = mpbatch("run", str(data), "-o", str(out), *ARGS, "--iterations", "1000000", wait=False)
    try:
        holder = _wait_for_holder(out, first)
        assert holder.startswith(f"pid {first.pid} on ")
        for extra in ([], ["--overwrite"]):
            second = mpbatch("run", str(data), "-o", str(out), *ARGS, *extra)
            assert second.returncode == 2
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "is in use" in lines[0] and holder in lines[0], lines
            assert "damaged" not in second.stderr
        scored = mpbatch("evaluate", str(out))
        assert scored.returncode == 2 and "is in use" in scored.stderr
        first.send_signal(signal.SIGTERM)  # the first run was not disturbed: it stops cleanly
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == EXIT_INTERRUPTED, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(data, reference, tmp_path):
    out = tmp_path / "out"
    first = mpbatch("run", str(data), "-o", str(out), *ARGS, wait=False)
    try:
        _wait_for_holder(out, first)
    finally:
        first.kill()
        first.wait()
    assert (out / ".masks.h5.lock").read_text().startswith("pid")  # stale text stays
    resumed = mpbatch("run", str(data), "-o", str(out), *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


# ------------------------------------------------------------------ unexpected errors
def test_an_unexpected_error_keeps_its_traceback_and_says_what_is_saved(data, reference, tmp_path):
    out = tmp_path / "out"
    failing = [
        a if a != "tiny_models:make_tiny_cnn" else "tiny_models:make_failing_cnn" for a in ARGS
    ]
    parts = journal_dir(out / "masks.h5")
    broken = mpbatch(
        "run", str(data), "-o", str(out), *failing, env={"MPBATCH_TEST_FAIL_WHEN": str(parts)}
    )
    assert broken.returncode == 1
    assert "Traceback (most recent call last)" in broken.stderr
    assert "RuntimeError: simulated fault inside the model's forward" in broken.stderr
    last = broken.stderr.strip().splitlines()[-1]
    assert last.startswith("mpbatch: unexpected error")
    assert "3 images and 0 failures are saved in" in last and "resume" in last
    resumed = mpbatch("run", str(data), "-o", str(out), *failing)
    assert resumed.returncode == 0, resumed.stderr
    got, _ = read_columns(out / "masks.h5")
    want, _ = read_columns(reference / "masks.h5")
    assert list(got["path"]) == list(want["path"])
    assert np.array_equal(got["masks"], want["masks"])  # the same network, bit for bit
