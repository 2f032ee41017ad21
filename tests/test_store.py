"""HDF5 mask store: appending, reading back, resume bookkeeping, settings check."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.store import MaskStore, StoreError, read_columns, read_failures

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
        store.append(_batch(0, 3), [], next_position=3)
        store.append(_batch(3, 2), [(5, "bad.jpg", "truncated file")], next_position=6)
        assert (store.rows, store.n_failures, store.next_position) == (5, 1, 6)
    columns, attrs = read_columns(path)
    assert columns["masks"].shape == (5, 4, 4) and columns["masks"].dtype == np.float32
    assert list(columns["path"]) == [f"img_{i}.png" for i in range(5)]
    assert columns["masks"][4, 0, 0] == 3.0
    assert attrs["config"] == CONFIG and attrs["versions"] == {"torch": "x"}
    assert read_failures(path) == [(5, "bad.jpg", "truncated file")]


def test_reopen_resumes_and_cuts_uncommitted_rows(tmp_path) -> None:
    path = tmp_path / "masks.h5"
    with MaskStore.open(path, CONFIG, {}) as store:
        store.append(_batch(0, 3), [], next_position=3)
    # simulate a write interrupted after growing a dataset but before the commit counters
    with h5py.File(path, "r+") as file:
        file["masks"].resize(5, axis=0)
        file["path"].resize(4, axis=0)
    with MaskStore.open(path, CONFIG, {}) as store:
        assert store.next_position == 3 and store.rows == 3
        assert store.file["masks"].shape[0] == 3 and store.file["path"].shape[0] == 3
        store.append(_batch(3, 1), [], next_position=4)
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
            store.append({"a": np.zeros(2), "b": np.zeros(3)}, [], next_position=3)


def test_merge_keeps_the_union_of_the_shards_columns(tmp_path) -> None:
    from pipeline.store import merge_files

    config = {"shard": {"stop": 2}}
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    with MaskStore.open(first, config, {}) as store:
        store.append({"path": ["x", "y"], "score": np.array([1, 2])}, [], next_position=2)
        store.finish()
    with MaskStore.open(second, {"shard": {"stop": 3}}, {}) as store:
        columns = {"path": ["z"], "score": np.array([3]), "extra": np.array([[0.5, 0.25]])}
        store.append(columns, [], next_position=3)
        store.finish()
    assert merge_files([first, second], tmp_path / "m.h5", compare_keys=[]) == 3
    merged, _ = read_columns(tmp_path / "m.h5")
    assert list(merged["path"]) == ["x", "y", "z"]
    assert list(merged["score"]) == [1, 2, 3]
    np.testing.assert_array_equal(merged["extra"], [[np.nan] * 2] * 2 + [[0.5, 0.25]])


def test_merge_sums_the_shards_seconds(tmp_path) -> None:
    """A merged run still says what it cost: the shards' summed timings (seconds, images)."""
    from pipeline.store import merge_files

    shards = []
    for number, (seconds, images) in enumerate([(30.0, 2), (12.5, 1)]):
        shard = tmp_path / f"s{number}.h5"
        with MaskStore.open(shard, {"shard": {"stop": number + 1}}, {}) as store:
            store.append({"path": [f"p{number}"]}, [], next_position=number + 1)
            store.set_attrs(timings_total={"optimize": seconds, "images": images})
            store.finish()
        shards.append(shard)
    merge_files(shards, tmp_path / "m.h5", compare_keys=[])
    _, attrs = read_columns(tmp_path / "m.h5")
    assert attrs["timings_total"] == {"optimize": 42.5, "images": 3}
