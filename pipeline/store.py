"""HDF5 storage of masks and per-image columns, appended one batch at a time, resumable.

Layout of a mask file (one per shard; `masks.h5` for a single-process run):

    /masks          N×h×w float32, 1 = pixel kept (the optimisation resolution)
    /path           N UTF-8 strings, relative to the data root
    /index          N int64, position of the image in the run's sample list
    /<column>       N (or N×K) numbers: label, target, pred, prob_clean, prob_masked, ...
    /failures/{index,path,reason}   images that could not be decoded
    attrs: config (JSON), versions (JSON), rows, failures, next_position, format

Commit protocol: a batch's rows are written first (datasets grown and filled), then the
counters `rows`, `failures` and `next_position` are updated and the file is flushed. Rows
beyond `rows` are leftovers of an interrupted write and are cut off when the file is
reopened, so a resumed run never duplicates or skips an image.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

FORMAT = "mpbatch-masks-1"
STRING = h5py.string_dtype("utf-8")
FAILURE_FIELDS = ("index", "path", "reason")


class StoreError(Exception):
    """A one-line, user-facing problem with an output file."""


def _string_array(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


class MaskStore:
    """An open mask file in append mode. Use `MaskStore.open(...)`; close with `close()`."""

    def __init__(self, file: h5py.File, path: Path) -> None:
        self.file = file
        self.path = path

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        config: dict,
        versions: dict,
        *,
        compare_keys: list[str] | None = None,
        overwrite: bool = False,
    ) -> MaskStore:
        """Create `path`, or reopen it to resume when its config matches `config`.

        compare_keys: the config keys that must match to resume (all keys when None).
        Raises StoreError when the existing file was made with other settings.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            try:
                file = h5py.File(path, "r+")
            except OSError as error:
                raise StoreError(
                    f"{path}: cannot be opened to resume ({error}); use --overwrite to start over"
                ) from error
            store = cls(file, path)
            store._check_config(config, compare_keys)
            store._truncate_to_commit()
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        file = h5py.File(path, "w")
        file.attrs["format"] = FORMAT
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        file.attrs["versions"] = json.dumps(versions, sort_keys=True)
        file.attrs["rows"] = 0
        file.attrs["failures"] = 0
        file.attrs["next_position"] = 0
        group = file.create_group("failures")
        group.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64)
        group.create_dataset("path", shape=(0,), maxshape=(None,), dtype=STRING)
        group.create_dataset("reason", shape=(0,), maxshape=(None,), dtype=STRING)
        file.flush()
        return cls(file, path)

    def _check_config(self, config: dict, compare_keys: list[str] | None) -> None:
        stored = json.loads(self.file.attrs["config"])
        keys = compare_keys if compare_keys is not None else sorted(set(stored) | set(config))
        changed = [k for k in keys if stored.get(k) != config.get(k)]
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in changed)
            self.file.close()
            raise StoreError(
                f"{self.path} was made with other settings ({details}); "
                "rerun with the same options to resume, or use --overwrite to start over"
            )

    def _truncate_to_commit(self) -> None:
        rows, failures = self.rows, self.n_failures
        for dataset in self.file.values():
            if isinstance(dataset, h5py.Dataset) and dataset.shape[0] != rows:
                dataset.resize(rows, axis=0)
        for field in FAILURE_FIELDS:
            dataset = self.file["failures"][field]
            if dataset.shape[0] != failures:
                dataset.resize(failures, axis=0)

    # ---------------------------------------------------------------- state
    @property
    def rows(self) -> int:
        return int(self.file.attrs["rows"])

    @property
    def n_failures(self) -> int:
        return int(self.file.attrs["failures"])

    @property
    def next_position(self) -> int:
        """How many samples of the run's list are done (written or recorded as failures)."""
        return int(self.file.attrs["next_position"])

    @property
    def config(self) -> dict:
        return json.loads(self.file.attrs["config"])

    # ---------------------------------------------------------------- writing
    def append(
        self,
        columns: dict[str, np.ndarray | list],
        failures: list[tuple[int, str, str]],
        next_position: int,
    ) -> None:
        """Append one batch: `columns` maps a name to B values (B×... arrays for masks and
        curves; lists of str for strings); `failures` are (index, path, reason) triples."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"columns of different lengths: { {k: len(v) for k, v in columns.items()} }"
            )
        start = self.rows
        count = lengths.pop() if lengths else 0
        if count:
            for name, values in columns.items():
                self._write_rows(name, values, start, count)
        if failures:
            self._write_failures(failures)
        self.file.attrs["rows"] = start + count
        self.file.attrs["failures"] = self.n_failures + len(failures)
        self.file.attrs["next_position"] = next_position
        self.file.flush()

    def _write_rows(self, name: str, values, start: int, count: int) -> None:
        if len(values) and isinstance(values[0], str):
            array, dtype = _string_array(values), STRING
        else:
            array = np.asarray(values)
            dtype = array.dtype
        if name not in self.file:
            chunk_rows = max(1, min(256, (1 << 20) // max(1, array[0:1].nbytes)))
            self.file.create_dataset(
                name,
                shape=(start,) + array.shape[1:],
                maxshape=(None,) + array.shape[1:],
                dtype=dtype,
                chunks=(chunk_rows,) + array.shape[1:],
                fillvalue=np.nan if np.issubdtype(np.dtype(dtype), np.floating) else None,
            )
        dataset = self.file[name]
        dataset.resize(start + count, axis=0)
        dataset[start : start + count] = array

    def _write_failures(self, failures: list[tuple[int, str, str]]) -> None:
        group = self.file["failures"]
        start, count = self.n_failures, len(failures)
        for position, field in enumerate(FAILURE_FIELDS):
            values = [f[position] for f in failures]
            array = (
                np.asarray(values, dtype=np.int64) if field == "index" else _string_array(values)
            )
            group[field].resize(start + count, axis=0)
            group[field][start : start + count] = array

    def set_attrs(self, **attrs) -> None:
        """Store extra file attributes (JSON-encoded when not a plain number or string)."""
        for key, value in attrs.items():
            if not isinstance(value, (int, float, str)):
                value = json.dumps(value, sort_keys=True)
            self.file.attrs[key] = value
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> MaskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -------------------------------------------------------------------- reading
def read_columns(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """All per-image datasets of a mask file (strings decoded) and its attributes (JSON decoded)."""
    with h5py.File(path, "r") as file:
        rows = int(file.attrs.get("rows", 0))
        columns = {}
        for name, dataset in file.items():
            if isinstance(dataset, h5py.Dataset):
                values = dataset[:rows]
                if h5py.check_string_dtype(dataset.dtype):
                    values = np.array([v.decode() if isinstance(v, bytes) else v for v in values])
                columns[name] = values
        attrs = {}
        for key, value in file.attrs.items():
            if isinstance(value, str) and value[:1] in "{[":
                value = json.loads(value)
            attrs[key] = value
    return columns, attrs


def read_failures(path: str | Path) -> list[tuple[int, str, str]]:
    """The (index, path, reason) triples recorded in a mask file."""
    with h5py.File(path, "r") as file:
        count = int(file.attrs.get("failures", 0))
        group = file["failures"]
        index = group["index"][:count]
        paths = [v.decode() for v in group["path"][:count]]
        reasons = [v.decode() for v in group["reason"][:count]]
    return [(int(i), p, r) for i, p, r in zip(index, paths, reasons, strict=True)]


def replace_columns(path: str | Path, columns: dict[str, np.ndarray], **attrs) -> None:
    """Overwrite (or add) whole per-image datasets of a finished file, e.g. recomputed metrics.

    Every array must have one entry per committed row.
    """
    with h5py.File(path, "r+") as file:
        rows = int(file.attrs["rows"])
        for name, values in columns.items():
            array = np.asarray(values)
            if array.shape[0] != rows:
                raise ValueError(f"{path}: column {name} has {array.shape[0]} rows, not {rows}")
            if name in file:
                del file[name]
            file.create_dataset(name, data=array, maxshape=(None,) + array.shape[1:])
        for key, value in attrs.items():
            file.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
