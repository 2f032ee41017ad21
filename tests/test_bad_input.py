"""Bad input never stops the night: every broken file is skipped and reported, every good
file gets its mask; set-up errors are one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_models import TINY_OPTIONS

from cli import main
from pipeline.commands.batching import halve_on_oom
from pipeline.store.reader import read_columns

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    *TINY_OPTIONS,
    "--iterations",
    "2",
    "--mask-size",
    "8",
    "--batch-size",
    "4",
    "--step",
    "256",
    "--baselines",
    "none",
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A folder with good images of every awkward kind and every kind of broken file."""
    data = tmp_path_factory.mktemp("zoo")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    good = {
        "good.jpg": lambda p: Image.fromarray(rgb).save(p, quality=90),
        "grey.png": lambda p: Image.fromarray(rgb[..., 0]).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p),
        "deep16.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(p),
        "tiny1x1.png": lambda p: Image.fromarray(rgb[:1, :1]).save(p),
        "huge.jpg": lambda p: Image.new("RGB", (12000, 9000), (90, 120, 150)).save(p, quality=50),
    }
    for name, write in good.items():
        write(data / name)
    good_jpeg = (data / "good.jpg").read_bytes()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 3],
        "corrupt.jpg": good_jpeg[:20] + bytes(rng.integers(0, 255, 400, dtype=np.uint8)),
        "text.png": b"this is not an image\n",
    }
    for name, content in bad.items():
        (data / name).write_bytes(content)
    os.symlink(data / "nowhere.jpg", data / "dangling.jpg")
    bad_names = sorted([*bad, "dangling.jpg"])
    if os.geteuid() != 0:  # root reads files whatever their permissions
        (data / "locked.png").write_bytes((data / "grey.png").read_bytes())
        os.chmod(data / "locked.png", 0)
        bad_names = sorted([*bad_names, "locked.png"])
    return data, sorted(good), bad_names


def test_bad_files_are_skipped_and_listed(zoo, tmp_path) -> None:
    data, good, bad = zoo
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["path"]) == bad
    assert failures["reason"].str.len().min() > 3
    columns, _ = read_columns(out / "masks.h5")
    assert sorted(columns["path"]) == good
    assert np.isfinite(columns["masks"]).all() and np.isfinite(columns["deletion_auc"]).all()
    huge = list(columns["path"]).index("huge.jpg")
    assert (columns["width"][huge], columns["height"][huge]) == (12000, 9000)


def test_on_error_fail_stops_with_the_file_name(zoo, tmp_path) -> None:
    data, _, bad = zoo
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", str(data), "-o", str(out), *ARGS, "--on-error", "fail"]
    )
    assert result.exit_code == 2
    assert any(name in result.output for name in bad) and "--on-error fail" in result.output


def test_setup_errors_are_one_line(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "missing", tmp_path / "o1", "missing"),
        (empty, tmp_path / "o2", "no images"),
    ]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (empty.parent / "ok").mkdir()
    Image.new("RGB", (8, 8)).save(empty.parent / "ok" / "a.png")
    cases.append((empty.parent / "ok", blocker / "out", "file"))  # OUT under a regular file
    for data, out, word in cases:
        result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], lines


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    calls = []

    def work(lo: int, hi: int) -> dict:
        calls.append((lo, hi))
        if hi - lo > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"masks": np.arange(lo, hi), "path": [f"p{i}" for i in range(lo, hi)]}

    columns = halve_on_oom(work, 7)
    assert list(columns["masks"]) == list(range(7))
    assert columns["path"] == [f"p{i}" for i in range(7)]
    assert calls[0] == (0, 7) and all(hi - lo <= 7 for lo, hi in calls)

    def never_fits(lo: int, hi: int) -> dict:
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        halve_on_oom(never_fits, 4)


def test_auto_batch_size_keeps_a_margin_below_the_largest_that_fits() -> None:
    from pipeline.commands.batching import CPU_BATCH_SIZE, auto_batch_size

    tried = []

    def probe(batch: int) -> None:
        tried.append(batch)
        if batch > 40:
            raise torch.OutOfMemoryError("simulated")

    cuda = torch.device("cuda")
    chosen = auto_batch_size(probe, 224, cuda)
    assert tried == [1, 2, 4, 8, 16, 32, 64] and chosen == 24  # 0.75 × 32
    capped = auto_batch_size(lambda b: None, 224, cuda, limit=16)
    assert capped == 16  # the limit itself fitted: memory is not what stops it
    uneven = auto_batch_size(lambda b: None, 224, cuda, limit=24)
    assert uneven == 12  # 0.75 × 16: 32 was never tried, so 16 is the largest known to fit
    assert auto_batch_size(probe, 224, torch.device("cpu")) == CPU_BATCH_SIZE
    result = CliRunner().invoke(main, ["run", ".", "-o", "x", "--batch-size", "zero"])
    assert result.exit_code == 2 and "batch-size" in result.output


def _six_images(folder: Path) -> Path:
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 20, 200)).save(folder / f"{i}.png")
    return folder


def test_disk_full_is_one_line_and_a_rerun_loses_nothing(tmp_path, monkeypatch) -> None:
    """The disk fills up before the second of three batches: the OS refuses the space the
    batch reserves (posix_fallocate, as on a full disk or quota: ENOSPC). One line names the
    file and the OS error; the first batch stays readable; the rerun ends with the same
    rows as an uninterrupted run, none twice."""
    import errno

    data = _six_images(tmp_path / "data")
    out, reference = tmp_path / "out", tmp_path / "reference"
    args = [*ARGS, "--batch-size", "2"]
    assert CliRunner().invoke(main, ["run", str(data), "-o", str(reference), *args]).exit_code == 0
    allocate, calls = os.posix_fallocate, []

    def full_from_the_second_batch(descriptor, offset, length):
        calls.append(length)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return allocate(descriptor, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full_from_the_second_batch)
    result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert f"{out / 'masks.h5'}: cannot write" in lines[0]
    columns, _ = read_columns(out / "masks.h5")  # readable, with the first batch
    assert list(columns["path"]) == ["0.png", "1.png"]
    monkeypatch.setattr(os, "posix_fallocate", allocate)  # space is free again
    assert CliRunner().invoke(main, ["run", str(data), "-o", str(out), *args]).exit_code == 0
    columns, _ = read_columns(out / "masks.h5")
    want, _ = read_columns(reference / "masks.h5")
    assert list(columns["path"]) == [f"{i}.png" for i in range(6)]
    assert np.array_equal(columns["masks"], want["masks"])  # same batches, same machine


def test_a_real_failing_write_is_one_line_and_the_rerun_completes(tmp_path) -> None:
    """A real refusal by the OS: the process may write no file larger than 64 kB
    (RLIMIT_FSIZE, so every larger write fails with EFBIG, "File too large"). The run stops
    with one line naming the mask file (no HDF5 traceback, no crash at exit); without the
    limit the same command completes."""
    import resource

    data = _six_images(tmp_path / "data")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cli", "run", str(data), "-o", str(out), *ARGS]
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    limited = subprocess.run(
        command,
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert limited.returncode == 2, limited.stderr
    lines = limited.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0], lines[-3:]
    assert "masks.h5" in lines[0]
    again = subprocess.run(
        command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    columns, _ = read_columns(out / "masks.h5")
    assert list(columns["path"]) == [f"{i}.png" for i in range(6)]


def test_output_folder_problems_are_one_line(tmp_path, monkeypatch) -> None:
    data = _six_images(tmp_path / "data")

    def one_line(out: Path, *more: str) -> str:
        result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS, *more])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    line = one_line(tmp_path / "no" / "such" / "out")
    assert "parent folder" in line and "does not exist" in line
    assert not (tmp_path / "no").exists()  # a mistyped path makes no tree
    # Root may write anywhere, so a read-only folder and file are simulated where the CLI
    # asks the OS (os.access); as another user they are real (chmod).
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS]).exit_code == 0
    readonly = {out} if os.geteuid() == 0 else set()
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode: not (Path(p) in readonly and mode & os.W_OK) and access(p, mode),
        )
    else:
        os.chmod(out, 0o555)
    assert "the folder is not writable" in one_line(out, "--overwrite")
    if os.geteuid() == 0:
        readonly = {out / "masks.h5"}
    else:
        os.chmod(out, 0o755)
        os.chmod(out / "masks.h5", 0o444)
    assert "masks.h5: the file is not writable" in one_line(out)
    columns, _ = read_columns(out / "masks.h5")  # what was there is untouched
    assert len(columns["path"]) == 6


# ------------------------------------------------------------------ the second night's edges
def test_out_inside_data_is_never_listed(tmp_path) -> None:
    """OUT inside DATA: its figures were listed as images, counted as replaced on every
    resume and their rows moved out; a folder holding another run's output is skipped too."""
    data = _six_images(tmp_path / "data")
    out = data / "out"
    for _ in range(2):
        result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS])
        assert result.exit_code == 0, result.output
        shown = CliRunner().invoke(main, ["show", str(out), "-o", str(out / "figures")])
        assert shown.exit_code == 0, shown.output
    other = data / "elsewhere"  # another run's OUT, figures included, moved into DATA
    shutil.copytree(out, other)
    again = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS])
    assert again.exit_code == 0 and "already done" in again.output, again.output
    columns, _ = read_columns(out / "masks.h5")
    assert sorted(columns["path"]) == [f"{i}.png" for i in range(6)]
    assert not (out / "dropped").exists()
    itself = CliRunner().invoke(main, ["run", str(data), "-o", str(data), *ARGS])
    assert itself.exit_code == 2 and "must not be DATA itself" in itself.output


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")
def test_a_name_that_is_not_utf8_is_one_failure_and_the_run_goes_on(tmp_path) -> None:
    data = _six_images(tmp_path / "data")
    shutil.copy(data / "0.png", os.fsencode(data) + b"/bad\xff\xfe.png")
    out = tmp_path / "out"
    for _ in range(2):  # and a rerun has nothing left to do
        result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS])
        assert result.exit_code == 0, result.output
    assert "already done" in result.output
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["path"]) == ["bad\\xff\\xfe.png"]
    assert "not valid UTF-8" in failures["reason"][0]
    assert sorted(read_columns(out / "masks.h5")[0]["path"]) == [f"{i}.png" for i in range(6)]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused(tmp_path, limit) -> None:
    data = _six_images(tmp_path / "data")
    result = CliRunner().invoke(
        main, ["run", str(data), "-o", str(tmp_path / "out"), *ARGS, "--limit", limit]
    )
    assert result.exit_code == 2 and f"--limit {limit}" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_show_and_report_of_a_run_still_being_written_are_one_line(tmp_path) -> None:
    data = _six_images(tmp_path / "data")
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS]).exit_code == 0
    (out / "summary.csv").unlink()  # as a run in progress, or shards not merged, leave it
    report = CliRunner().invoke(main, ["report", str(out), "-o", str(tmp_path / "c.csv")])
    assert report.exit_code == 2 and "summary.csv: no such file" in report.output
    assert len(report.output.strip().splitlines()) == 1, report.output
    # a writer holds the file open, as a live run does (HDF5's file lock)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+');"
            "print('open', flush=True); time.sleep(60)",
            str(out / "masks.h5"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "open"
        shown = CliRunner().invoke(main, ["show", str(out), "-o", str(tmp_path / "figures")])
        assert shown.exit_code == 2 and "is being written by a live run" in shown.output
        assert len(shown.output.strip().splitlines()) == 1, shown.output
    finally:
        writer.kill()
        writer.wait()


def test_evaluate_refuses_a_path_listed_twice_and_reads_fixed_length_paths(tmp_path) -> None:
    import h5py

    data = _six_images(tmp_path / "data")
    rng = np.random.default_rng(0)
    twice, fixed = tmp_path / "twice.h5", tmp_path / "fixed.h5"
    with h5py.File(twice, "w") as file:
        file["path"] = np.array(["1.png", "2.png", "1.png"], dtype=object).astype(
            h5py.string_dtype()
        )
        file["saliency"] = rng.random((3, 8, 8)).astype(np.float32)
    with h5py.File(fixed, "w") as file:
        file["path"] = np.array(["1.png", "2.png"], dtype="S")  # fixed-length bytes
        file["saliency"] = rng.random((2, 8, 8)).astype(np.float32)
    options = ["--data", str(data), *TINY_OPTIONS, "--step", "256", "--baselines", "none"]
    refused = CliRunner().invoke(
        main, ["evaluate", str(twice), "-o", str(tmp_path / "a"), *options]
    )
    assert refused.exit_code == 2 and "1.png is listed twice (rows 0 and 2)" in refused.output
    scored = CliRunner().invoke(main, ["evaluate", str(fixed), "-o", str(tmp_path / "b"), *options])
    assert scored.exit_code == 0, scored.output
    assert list(pd.read_csv(tmp_path / "b" / "report.csv")["path"]) == ["1.png", "2.png"]
