"""Sharding: every launcher's environment, a stable split by path, merged shards equal one
process, and a folder that changes between shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import TINY_OPTIONS

import pipeline.commands.shards as shards
from cli import main
from pipeline.commands.shards import resolve_shard
from pipeline.data.datasets import DatasetError
from pipeline.data.listing import shard_of, shard_positions
from pipeline.store.reader import read_columns

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    *TINY_OPTIONS,
    "--iterations",
    "3",
    "--mask-size",
    "8",
    "--batch-size",
    "2",
    "--step",
    "128",
    "--baselines",
    "center,random",
]


def _covered(n: int, shards) -> list[int]:
    paths = [f"img{i:03d}.png" for i in range(n)]
    covered = []
    for shard in shards:
        covered += shard_positions(paths, shard.rank, shard.world)
    return covered


@pytest.mark.parametrize("n", [0, 1, 5, 12, 13])
def test_every_launcher_environment_covers_each_image_once(n: int) -> None:
    cases = {
        "single": [{}],
        "--shard": [("2/3", {}), ("0/3", {}), ("1/3", {})],
        "torchrun": [
            {"RANK": str(r), "WORLD_SIZE": "4", "LOCAL_RANK": str(r % 2)} for r in range(4)
        ],
        "srun": [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "3"} for r in range(3)],
        "array": [
            {
                "SLURM_ARRAY_TASK_ID": str(t),
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
            }
            for t in (1, 2, 3)
        ],
        "array x torchrun": [
            {
                "SLURM_ARRAY_TASK_ID": str(t),
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
                "RANK": str(r),
                "WORLD_SIZE": "2",
            }
            for t in (0, 1)
            for r in (0, 1)
        ],
        "array x srun": [
            {
                "SLURM_ARRAY_TASK_ID": str(t),
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "4",
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": "3",
            }
            for t in (4, 5)
            for r in range(3)
        ],
    }
    for name, envs in cases.items():
        shards = [
            resolve_shard(e[0], e[1]) if isinstance(e, tuple) else resolve_shard(None, e)
            for e in envs
        ]
        worlds = {s.world for s in shards}
        assert len(worlds) == 1 and worlds.pop() == len(envs), name
        covered = _covered(n, shards)
        assert sorted(covered) == list(range(n)), name  # each image exactly once


def test_an_image_keeps_its_shard_whatever_the_listing() -> None:
    """The split is by a hash of the path alone: adding or removing other images moves no
    image to another shard, so two shards never both explain one image, nor none of them."""
    paths = [f"n{i:05d}/ILSVRC2012_val_{i:08d}.JPEG" for i in range(400)]
    for world in (2, 3, 16):
        before = {paths[i]: r for r in range(world) for i in shard_positions(paths, r, world)}
        changed = paths[50:] + ["new/a.JPEG", "new/b.JPEG"]  # 50 removed, 2 added
        after = {changed[i]: r for r in range(world) for i in shard_positions(changed, r, world)}
        assert all(after[p] == before[p] for p in paths[50:])
        assert all(after[p] == shard_of(p, world) for p in changed)
        sizes = [len(shard_positions(paths, r, world)) for r in range(world)]
        assert sum(sizes) == 400 and min(sizes) > 0.5 * 400 / world  # roughly even


def test_torchrun_local_rank_and_bad_specs() -> None:
    assert resolve_shard(None, {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}).local_rank == 1
    assert resolve_shard(None, {}).world == 1
    for spec in ("3/3", "a/b", "1"):
        with pytest.raises(DatasetError):
            resolve_shard(spec, {})
    with pytest.raises(DatasetError, match="outside"):
        resolve_shard(
            None,
            {
                "SLURM_ARRAY_TASK_ID": "7",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"im{i:02d}.png"
        )
    (folder / "im03_bad.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    result = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return read_columns(out / "masks.h5")[0]


def _assert_equal(columns: dict, reference: dict) -> None:
    """Same rows in the same order; numbers equal up to float rounding (shards batch the
    images differently, and a convolution's rounding can depend on the batch size)."""
    assert set(columns) == set(reference)
    for name, values in reference.items():
        if values.dtype.kind == "f":
            assert np.allclose(columns[name], values, atol=1e-5, equal_nan=True), name
        else:
            assert np.array_equal(columns[name], values), name


def test_shards_merged_equal_one_process(data, single, tmp_path) -> None:
    out = tmp_path / "out"
    for rank in (0, 2):  # not all shards yet: merge must refuse, naming the missing one
        args = ["run", str(data), "-o", str(out), "--shard", f"{rank}/3", *ARGS]
        assert CliRunner().invoke(main, args).exit_code == 0
    refused = CliRunner().invoke(main, ["merge", str(out)])
    assert refused.exit_code == 2 and "masks-00001-of-00003.h5" in refused.output
    assert not (out / "masks.h5").exists()

    args = ["run", str(data), "-o", str(out), "--shard", "1/3", *ARGS]
    assert CliRunner().invoke(main, args).exit_code == 0
    # the last shard to finish merged automatically; an explicit merge gives the same
    automatic = read_columns(out / "masks.h5")[0]
    _assert_equal(automatic, single)
    assert CliRunner().invoke(main, ["merge", str(out)]).exit_code == 0
    _assert_equal(read_columns(out / "masks.h5")[0], single)
    assert (out / "report.csv").exists() and (out / "summary.csv").exists()


def test_merge_refuses_shards_with_other_settings(data, tmp_path) -> None:
    out = tmp_path / "out"
    CliRunner().invoke(main, ["run", str(data), "-o", str(out), "--shard", "0/2", *ARGS])
    CliRunner().invoke(
        main, ["run", str(data), "-o", str(out), "--shard", "1/2", *ARGS, "--tv", "0.5"]
    )
    refused = CliRunner().invoke(main, ["merge", str(out)])
    assert refused.exit_code == 2 and "other settings" in refused.output


def test_torchrun_two_processes_equal_one_process(data, single, tmp_path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-port=0",
        str(ROOT / "cli.py"),
        "run",
        str(data),
        "-o",
        str(out),
        *ARGS,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "masks-00000-of-00002.h5").exists()
    assert (out / "masks-00001-of-00002.h5").exists()
    _assert_equal(read_columns(out / "masks.h5")[0], single)


def test_extremal_shards_merged_equal_one_process(data, tmp_path) -> None:
    extremal = [
        *TINY_OPTIONS,
        "--method",
        "extremal",
        "--iterations",
        "3",
        "--areas",
        "0.1,0.3",
        "--limit",
        "6",
        "--batch-size",
        "2",
        "--step",
        "256",
        "--baselines",
        "none",
    ]
    single = tmp_path / "single"
    assert CliRunner().invoke(main, ["run", str(data), "-o", str(single), *extremal]).exit_code == 0
    sharded = tmp_path / "sharded"
    for rank in (1, 0):
        args = ["run", str(data), "-o", str(sharded), "--shard", f"{rank}/2", *extremal]
        assert CliRunner().invoke(main, args).exit_code == 0
    merged = read_columns(sharded / "masks.h5")[0]
    reference = read_columns(single / "masks.h5")[0]
    assert merged["masks"].shape == reference["masks"].shape == (5, 2, 56, 56)
    _assert_equal(merged, reference)


def test_only_one_finishing_shard_merges(tmp_path, monkeypatch, caplog) -> None:
    from pipeline.store.lock import hold

    merged = []
    monkeypatch.setattr(shards, "merge", lambda out: merged.append(out) or out / "masks.h5")
    assert shards.merge_once(tmp_path) == tmp_path / "masks.h5"
    assert merged == [tmp_path]
    monkeypatch.undo()

    with hold(tmp_path / "masks.h5"):  # another process is merging (or writing masks.h5)
        assert shards.merge_once(tmp_path) is None
    assert "is in use" in caplog.text and not (tmp_path / "masks.h5").exists()


def _images(folder: Path, names: list[str], broken: tuple[str, ...] = ()) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in names:
        if name in broken:
            (folder / name).write_bytes(b"\xff\xd8\xff\xe0 truncated")
        else:
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_a_shard_without_images_completes_and_the_run_merges(tmp_path) -> None:
    """3 shards over 2 images: one shard has nothing to do; it used to stay incomplete, so
    the run never merged."""
    data = _images(tmp_path / "data", ["a.png", "b.png"])
    out = tmp_path / "out"
    for rank in range(3):
        args = ["run", str(data), "-o", str(out), *ARGS, "--shard", f"{rank}/3"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    assert shards.all_shards_complete(out, 3)
    merged, attrs = read_columns(out / "masks.h5")
    assert list(merged["path"]) == ["a.png", "b.png"] and attrs["complete"]
    empty = [r for r in range(3) if not shard_positions(["a.png", "b.png"], r, 3)]
    assert empty, "the case needs an empty shard"
    again = CliRunner().invoke(
        main, ["run", str(data), "-o", str(out), *ARGS, "--shard", f"{empty[0]}/3"]
    )
    assert again.exit_code == 0 and "already done" in again.output


def test_a_shard_whose_images_all_fail_completes_and_merges_the_union(tmp_path) -> None:
    """Its file has no columns at all; the merge used to keep only columns every shard has,
    i.e. none."""
    names = ["a.png", "b.png", "c.jpg", "e.jpg"]
    data = _images(tmp_path / "data", names, broken=("c.jpg", "e.jpg"))
    assert shard_positions(names, 0, 2) == [2, 3]  # shard 0 holds the broken images only
    out = tmp_path / "out"
    for rank in range(2):
        args = ["run", str(data), "-o", str(out), *ARGS, "--shard", f"{rank}/2"]
        assert CliRunner().invoke(main, args).exit_code == 0
    merged, attrs = read_columns(out / "masks.h5")
    assert list(merged["path"]) == ["a.png", "b.png"]
    assert merged["masks"].shape == (2, 8, 8) and "deletion_auc" in merged
    assert attrs["failures"] == 2
    assert (out / "failures.csv").read_text().count(".jpg") == 2


def test_a_folder_changed_between_shards_is_refused_then_caught_up(tmp_path) -> None:
    """Shard 0 runs, the folder changes (one image removed, two added), shard 1 runs: the
    merge refuses, naming the files; shard 0 rerun catches up; the merged run then holds
    every image of today's folder exactly once, and equals one process over it, bit for bit
    (one image a batch, so that every image is optimised alone in both)."""
    names = [f"im{i:02d}.png" for i in range(8)]
    one_a_batch = [*ARGS, "--batch-size", "1"]
    data = _images(tmp_path / "data", names)
    out = tmp_path / "out"
    shard = ["--shard", "0/2"]
    assert (
        CliRunner().invoke(main, ["run", str(data), "-o", str(out), *one_a_batch, *shard]).exit_code
        == 0
    )
    (data / "im02.png").unlink()
    Image.new("RGB", (30, 30), (200, 10, 10)).save(data / "im02a.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(data / "im09.png")
    last = CliRunner().invoke(
        main, ["run", str(data), "-o", str(out), *one_a_batch, "--shard", "1/2"]
    )
    assert last.exit_code == 2, last.output
    assert "another listing" in last.output and "removed (im02.png)" in last.output
    assert not (out / "masks.h5").exists()
    again = CliRunner().invoke(main, ["run", str(data), "-o", str(out), *one_a_batch, *shard])
    assert again.exit_code == 0, again.output
    merged = read_columns(out / "masks.h5")[0]
    today = sorted(p.name for p in data.iterdir())
    assert list(merged["path"]) == today  # each image once, in listing order
    assert list(merged["index"]) == list(range(len(today)))
    single = tmp_path / "single"
    assert (
        CliRunner().invoke(main, ["run", str(data), "-o", str(single), *one_a_batch]).exit_code == 0
    )
    for name, values in read_columns(single / "masks.h5")[0].items():
        assert np.array_equal(merged[name], values, equal_nan=values.dtype.kind == "f"), name
