"""A run's listing: file stamps, what changed between two listings, and the split by path."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.data.listing import UNKNOWN, Listing, compare, same_stamp, shard_of, shard_positions


def test_stamps_are_size_and_mtime_and_a_dangling_link_is_unknown(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"12345")
    os.utime(tmp_path / "a.png", ns=(1_000, 2_000_000_123))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"1")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    listing = Listing.of(tmp_path, ["a.png", "gone.png", "sub/b.png"])
    assert listing.stamps()["a.png"] == (5, 2_000_000_123)
    assert listing.stamps()["gone.png"] == (UNKNOWN, UNKNOWN)
    assert listing.stamps()["sub/b.png"][0] == 1
    assert same_stamp((UNKNOWN, UNKNOWN), (5, 1)) and not same_stamp((5, 1), (5, 2))


def test_a_file_replaced_under_the_same_name_changes_the_listing(tmp_path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x" * 10)
    before = Listing.of(tmp_path, ["a.png", "b.png", "c.png"])
    assert Listing.of(tmp_path, ["a.png", "b.png", "c.png"]).digest() == before.digest()
    (tmp_path / "b.png").write_bytes(b"y" * 11)  # replaced: another size
    (tmp_path / "c.png").unlink()
    (tmp_path / "d.png").write_bytes(b"z")
    after = Listing.of(tmp_path, ["a.png", "b.png", "d.png"])
    assert after.digest() != before.digest()
    change = compare(before, after)
    assert (change.added, change.removed, change.replaced) == (("d.png",), ("c.png",), ("b.png",))
    assert change.describe() == "1 added (d.png), 1 removed (c.png), 1 replaced (b.png)"
    assert not compare(before, before)


def test_describe_names_the_first_few() -> None:
    before = Listing((), np.zeros(0, np.int64), np.zeros(0, np.int64))
    paths = tuple(f"{i}.png" for i in range(5))
    after = Listing(paths, np.ones(5, np.int64), np.ones(5, np.int64))
    assert compare(before, after).describe(examples=2).startswith("5 added (0.png, 1.png, ...)")


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8, 16])
def test_shards_cover_each_image_once_in_listing_order(n: int, world: int) -> None:
    paths = [f"val/ILSVRC2012_val_{i:08d}.JPEG" for i in range(n)]
    shards = [shard_positions(paths, rank, world) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert all(shard == sorted(shard) for shard in shards)
    for rank, shard in enumerate(shards):
        assert all(shard_of(paths[i], world) == rank for i in shard)


def test_shard_arguments_are_checked() -> None:
    for rank, world in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            shard_positions(["a"], rank, world)
