"""pipeline/store/reader.py: reading a run's columns."""

from __future__ import annotations

import h5py
import numpy as np

from pipeline.reports.tables import per_image_table
from pipeline.store.reader import read_columns


def test_scores_shorter_than_the_rows_read_as_not_scored(tmp_path) -> None:
    """`evaluate` scored 2 images, then a resumed `run --no-metrics` added a third: the run's
    report.csv used to fail with "All arrays must be of the same length"."""
    path = tmp_path / "masks.h5"
    with h5py.File(path, "w") as file:
        file.attrs["rows"] = 3
        file.create_dataset("path", data=["a.png", "b.png", "c.png"], dtype=h5py.string_dtype())
        file.create_dataset("masks", data=np.zeros((3, 2, 2), dtype=np.float32))
        file.create_dataset("deletion_auc", data=np.array([0.25, 0.5], dtype=np.float32))
        file.create_dataset("pointing_hit", data=np.array([1, 0], dtype=np.int8))
    columns, _ = read_columns(path)
    assert columns["deletion_auc"][:2].tolist() == [0.25, 0.5]
    assert np.isnan(columns["deletion_auc"][2])
    assert columns["pointing_hit"][:2].tolist() == [1, 0] and np.isnan(columns["pointing_hit"][2])
    table = per_image_table(columns, [])
    assert list(table["path"]) == ["a.png", "b.png", "c.png"]
    assert table["deletion_auc"].isna().tolist() == [False, False, True]
