"""HDF5 mask store: appending, reading back, resume bookkeeping, settings check."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.data.listing import Listing
from pipeline.store.reader import read_columns, read_failures, read_listing
from pipeline.store.writer import MaskStore, StoreError

CONFIG = {"model": "tiny", "mask": {"iterations": 3}}


def _batch(start: int, count: int) -> dict:
    return {
        "masks": np.full((count, 4, 4), start, dtype=np.float32),
        "path": [f"img_{i}.png" for i in range(start, start + count)],
        "index": np.arange(start, start + count),
        "prob_clean": np.linspace(0, 1, count).astype(np.float32),
    }


def test_append_and_read_back(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, CONFIG, {"torch": "x"}) as store:
        store.append(_batch(0, 3), [])
        store.append(_batch(3, 2), [(5, "bad.jpg", "truncated file")])
        assert (store.rows, store.n_failures, store.batches) == (5, 1, 2)
    columns, attrs = read_columns(path)
    assert columns["masks"].shape == (5, 4, 4) and columns["masks"].dtype == np.float32
    assert list(columns["path"]) == [f"img_{i}.png" for i in range(5)]
    assert columns["masks"][4, 0, 0] == 3.0
    assert attrs["config"] == CONFIG and attrs["versions"] == {"torch": "x"}
    assert read_failures(path) == [(5, "bad.jpg", "truncated file")]


def test_reopen_resumes_and_cuts_uncommitted_rows(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, CONFIG, {}) as store:
        store.append(_batch(0, 3), [])
    # simulate a write interrupted after growing a dataset but before the commit counters
    with h5py.File(path, "r+") as file:
        file["masks"].resize(5, axis=0)
        file["path"].resize(4, axis=0)
    with MaskStore.open(path, CONFIG, {}) as store:
        assert store.batches == 1 and store.rows == 3
        assert store.file["masks"].shape[0] == 3 and store.file["path"].shape[0] == 3
        store.append(_batch(3, 1), [])
    columns, _ = read_columns(path)
    assert list(columns["index"]) == [0, 1, 2, 3]


def test_changed_settings_are_refused_unless_overwrite(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    MaskStore.open(path, CONFIG, {}).close()
    other = {"model": "tiny", "mask": {"iterations": 4}}
    with pytest.raises(StoreError, match="iterations"):
        MaskStore.open(path, other, {})
    # keys outside compare_keys may change (e.g. batch size)
    MaskStore.open(path, {**CONFIG, "batch_size": 9}, {}, compare_keys=["model", "mask"]).close()
    with MaskStore.open(path, other, {}, overwrite=True) as store:
        assert store.rows == 0 and store.config == other


def test_column_length_mismatch_is_an_error(tmp_path) -> None:
    with MaskStore.open(tmp_path / "m.h5", CONFIG, {}) as store:
        with pytest.raises(ValueError):
            store.append({"a": np.zeros(2), "b": np.zeros(3)}, [])


def test_merge_keeps_the_union_of_the_shards_columns(tmp_path) -> None:
    from pipeline.commands.shards import merge_files

    config = {"shard": {"stop": 2}}
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    with MaskStore.open(first, config, {}) as store:
        store.append({"path": ["x", "y"], "score": np.array([1, 2])}, [])
        store.finish()
    with MaskStore.open(second, {"shard": {"stop": 3}}, {}) as store:
        columns = {"path": ["z"], "score": np.array([3]), "extra": np.array([[0.5, 0.25]])}
        store.append(columns, [])
        store.finish()
    assert merge_files([first, second], tmp_path / "m.h5", compare_keys=[]) == 3
    merged, _ = read_columns(tmp_path / "m.h5")
    assert list(merged["path"]) == ["x", "y", "z"]
    assert list(merged["score"]) == [1, 2, 3]
    np.testing.assert_array_equal(merged["extra"], [[np.nan] * 2] * 2 + [[0.5, 0.25]])


def test_merge_sums_the_shards_seconds(tmp_path) -> None:
    """A merged run still says what it cost: the shards' summed timings (seconds, images)."""
    from pipeline.commands.shards import merge_files

    shards = []
    for number, (seconds, images) in enumerate([(30.0, 2), (12.5, 1)]):
        shard = tmp_path / f"s{number}.h5"
        with MaskStore.open(shard, {"shard": {"stop": number + 1}}, {}) as store:
            store.append({"path": [f"p{number}"]}, [])
            store.set_attrs(timings_total={"optimize": seconds, "images": images})
            store.finish()
        shards.append(shard)
    merge_files(shards, tmp_path / "m.h5", compare_keys=[])
    _, attrs = read_columns(tmp_path / "m.h5")
    assert attrs["timings_total"] == {"optimize": 42.5, "images": 3}


# ------------------------------------------------------------------ resuming by path
def _stamped(paths: list[str], index: list[int], size: int = 10) -> dict:
    count = len(paths)
    return {
        "masks": np.arange(count, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32),
        "path": paths,
        "index": np.array(index),
        "file_size": np.full(count, size),
        "file_mtime_ns": np.full(count, 7),
    }


def _today(paths: list[str], replaced: tuple[str, ...] = ()) -> dict:
    return {p: (i, 11 if p in replaced else 10, 7) for i, p in enumerate(paths)}


def test_reconcile_keeps_rows_by_path_and_moves_out_gone_and_replaced(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, CONFIG, {}) as store:
        store.append(_stamped(["a", "b", "c"], [0, 1, 2]), [(3, "d", "broken", 10, 7)])
        # today: "b" is gone, "c" was replaced (another size), "a0" was added before "a"
        done = store.reconcile(_today(["a0", "a", "c", "d", "e"], replaced=("c",)))
        assert done.done == {"a", "d"} and (done.gone, done.replaced) == (1, 1)
        assert store.rows == 1 and store.n_failures == 1
    columns, _ = read_columns(path)
    assert list(columns["path"]) == ["a"] and list(columns["index"]) == [1]  # renumbered
    assert read_failures(path) == [(3, "d", "broken")]
    moved, _ = read_columns(done.dropped_file)
    assert sorted(moved["path"]) == ["b", "c"]  # nothing is deleted: moved aside
    assert done.dropped_file.parent == tmp_path / "dropped"


def test_reconcile_without_change_rewrites_nothing(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, CONFIG, {}) as store:
        store.append(_stamped(["a", "b"], [0, 1]), [])
        inode = path.stat().st_ino
        done = store.reconcile(_today(["a", "b", "c"]))
        assert done.done == {"a", "b"} and done.dropped_file is None
    assert path.stat().st_ino == inode and not (tmp_path / "dropped").exists()


def test_reconcile_keeps_one_row_per_path_and_sorting_restores_listing_order(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, CONFIG, {}) as store:
        store.append(_stamped(["b", "a"], [1, 0]), [])
        store.append(_stamped(["a"], [0]), [])  # a journal replay can leave a duplicate
        done = store.reconcile(_today(["a", "b"]))
        assert done.done == {"a", "b"} and done.replaced == 1 and store.rows == 2
        store.sort_by_index()
    columns, _ = read_columns(path)
    assert list(columns["path"]) == ["a", "b"] and list(columns["index"]) == [0, 1]
    assert list(columns["masks"][:, 0, 0]) == [1.0, 0.0]  # each row moved with its mask


def test_listing_is_stored_and_merge_refuses_shards_of_other_listings(tmp_path) -> None:
    from pipeline.commands.shards import merge_files

    before = Listing(("a", "b"), np.array([1, 2]), np.array([5, 5]))
    after = Listing(("a", "c"), np.array([1, 2]), np.array([5, 5]))
    shards = []
    for number, listing in enumerate([before, after]):
        shard = tmp_path / f"masks-{number:05d}-of-00002.h5"
        with MaskStore.open(shard, CONFIG, {}) as store:
            store.set_listing(listing)
            store.append(_stamped([listing.paths[number]], [number]), [])
            store.finish()
        shards.append(shard)
    assert read_listing(shards[0]).paths == ("a", "b")
    with pytest.raises(StoreError, match=r"masks-00001-of-00002.h5 was run over another") as err:
        merge_files(shards, tmp_path / "m.h5", compare_keys=[])
    assert "1 added (c)" in str(err.value) and "1 removed (b)" in str(err.value)


def test_merged_rows_are_in_listing_order(tmp_path) -> None:
    from pipeline.commands.shards import merge_files

    shards = []
    for number, (paths, index) in enumerate([(["b", "d"], [1, 3]), (["a", "c"], [0, 2])]):
        shard = tmp_path / f"s{number}.h5"
        with MaskStore.open(shard, CONFIG, {}) as store:
            store.append(_stamped(paths, index), [(4 + number, f"x{number}", "bad")])
            store.finish()
        shards.append(shard)
    merge_files(shards, tmp_path / "m.h5", compare_keys=[])
    merged, _ = read_columns(tmp_path / "m.h5")
    assert list(merged["path"]) == ["a", "b", "c", "d"]
    assert [f[1] for f in read_failures(tmp_path / "m.h5")] == ["x0", "x1"]
