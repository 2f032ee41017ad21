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

HDF5 files are not crash-safe: a process killed in the middle of a write can leave one
that does not open. So every batch is first written to a small journal file of its own
(`.masks.parts/part-<next_position>.h5`, written under a temporary name and renamed, so a
part is either whole or absent), then appended to the main file. When the main file is
damaged it is moved aside (`*.damaged`) and rebuilt from the journal; when it is behind the
journal the missing batches are replayed. The journal is deleted once the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from .errors import one_line

FORMAT = "mpbatch-masks-1"
MASKS_FILE = "masks.h5"  # a run's file (shards: masks-IIIII-of-NNNNN.h5)
SCORES_FILE = "scores.h5"  # `evaluate`'s file for maps not made by mpbatch
REPORT_FILE = "report.csv"
FAILURES_FILE = "failures.csv"
STRING = h5py.string_dtype("utf-8")
FAILURE_FIELDS = ("index", "path", "reason")


# Crash testing: MPBATCH_KILL_AT="stage:n" kills this process with SIGKILL the n-th time it
# reaches `stage` ("part-write": journal part written but not yet renamed; "main-write":
# main file grown but not committed; "after-commit"). Used by tests/test_resume.py only.
_KILL_AT = os.environ.get("MPBATCH_KILL_AT", "")
_stage_counts: dict[str, int] = {}


def _crash_point(stage: str) -> None:
    if not _KILL_AT:
        return
    _stage_counts[stage] = _stage_counts.get(stage, 0) + 1
    if _KILL_AT == f"{stage}:{_stage_counts[stage]}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class _UncleanShutdown(Exception):
    """The file was left open for writing by a process that died."""


class StoreError(Exception):
    """A one-line, user-facing problem with an output file."""


def _string_array(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _as_column(values) -> np.ndarray:
    """Per-row values as an array: numbers as they are, strings as UTF-8 objects."""
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OUS":
        return values
    if len(values) and isinstance(values[0], (str, bytes, np.str_)):
        return _string_array(values)
    return np.asarray(values)


def create_column(group: h5py.Group, name: str, values, rows: int | None = None) -> h5py.Dataset:
    """The one way a per-row dataset is made: resizable along the rows, chunked about 1 MB,
    strings as UTF-8, NaN as the fill value of floats. With `rows` (≥ 0) the dataset starts
    with that many fill rows and `values` only sets its type and row shape; else it holds
    `values`."""
    array = _as_column(values)
    dtype = STRING if array.dtype.kind in "OUS" else array.dtype
    row_shape = array.shape[1:]
    chunk_rows = max(1, min(256, (1 << 20) // max(1, array[0:1].nbytes or 8)))
    floating = dtype is not STRING and np.issubdtype(np.dtype(dtype), np.floating)
    dataset = group.create_dataset(
        name,
        shape=(len(array) if rows is None else rows,) + row_shape,
        maxshape=(None,) + row_shape,
        dtype=dtype,
        chunks=(chunk_rows,) + row_shape,
        fillvalue=np.nan if floating else None,
    )
    if rows is None and len(array):
        dataset[:] = array
    return dataset


class MaskStore:
    """An open mask file in append mode. Use `MaskStore.open(...)`; close with `close()`."""

    def __init__(self, file: h5py.File, path: Path) -> None:
        self.file = file
        self.path = path
        self.repaired = ""  # what was repaired on opening, for the log

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
        fill_stored: Callable[[dict], dict] | None = None,
    ) -> MaskStore:
        """Create `path`, or reopen it to resume when its config matches `config`.

        compare_keys: the config keys that must match to resume (all keys when None).
        fill_stored: applied to the stored config before the comparison, to fill in settings
        that files of older versions did not record (their values then were the defaults).
        Raises StoreError when the existing file was made with other settings, or is damaged
        with no journal to rebuild it from.
        """
        path = Path(path)
        parts = journal_dir(path)
        if overwrite:
            path.unlink(missing_ok=True)
            shutil.rmtree(parts, ignore_errors=True)
        has_journal = bool(_part_files(parts))
        if path.exists():
            try:
                store = cls._reopen(path, trust_unclean=not has_journal)
            except (OSError, KeyError, ValueError) as error:
                if not has_journal:
                    raise StoreError(
                        f"{path} is damaged ({one_line(error)}) and has no journal to rebuild "
                        "it from; use --overwrite to start over"
                    ) from error
                damaged = path.with_name(path.name + ".damaged")
                os.replace(path, damaged)
                store = cls._create(path, _part_config(parts), versions)
                store.repaired = f"{path} was damaged: moved to {damaged.name}, rebuilt"
            except _UncleanShutdown:
                # The last writer died with the file open: HDF5 may hold half-written metadata
                # that only fails later, so rebuild it from the journal rather than trust it.
                path.unlink()
                store = cls._create(path, _part_config(parts), versions)
                store.repaired = f"{path} was not closed cleanly: rebuilt from its journal"
        elif has_journal:
            store = cls._create(path, _part_config(parts), versions)
        else:
            return cls._create(path, config, versions)
        store._check_config(config, compare_keys, fill_stored)
        store._replay_journal()
        return store

    @classmethod
    def _reopen(cls, path: Path, trust_unclean: bool) -> MaskStore:
        file = h5py.File(path, "r+")
        try:
            if file.attrs.get("format") != FORMAT:
                raise ValueError(f"not an mpbatch mask file (format {file.attrs.get('format')!r})")
            json.loads(file.attrs["config"])
            if file.attrs.get("writing", False) and not trust_unclean:
                raise _UncleanShutdown()
            store = cls(file, path)
            store._truncate_to_commit()
            store._mark_writing(True)
        except BaseException:
            file.close()
            raise
        return store

    def _mark_writing(self, writing: bool) -> None:
        """The `writing` attribute is True while a process has the file open for writing; a
        file found with it set was not closed cleanly."""
        self.file.attrs["writing"] = writing
        self.file.flush()

    @classmethod
    def _create(cls, path: Path, config: dict, versions: dict) -> MaskStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = h5py.File(path, "w")
        file.attrs["format"] = FORMAT
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        file.attrs["versions"] = json.dumps(versions, sort_keys=True)
        file.attrs["rows"] = 0
        file.attrs["failures"] = 0
        file.attrs["next_position"] = 0
        _create_failures(file, [])
        store = cls(file, path)
        store._mark_writing(True)
        return store

    def _check_config(self, config: dict, compare_keys: list[str] | None, fill_stored=None) -> None:
        stored = json.loads(self.file.attrs["config"])
        if fill_stored is not None:
            stored = fill_stored(stored)
        keys = compare_keys if compare_keys is not None else sorted(set(stored) | set(config))
        config = json.loads(json.dumps(config))  # as stored: tuples become lists
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
                if dataset.shape[0] < rows:
                    raise ValueError(f"dataset {dataset.name} is shorter than the committed rows")
                dataset.resize(rows, axis=0)
        for field in FAILURE_FIELDS:
            dataset = self.file["failures"][field]
            if dataset.shape[0] != failures:
                dataset.resize(failures, axis=0)

    def _replay_journal(self) -> None:
        """Append journal parts that the main file does not hold yet."""
        for part in _part_files(journal_dir(self.path)):
            columns, failures, next_position = _read_part(part)
            if next_position > self.next_position:
                self._append_main(columns, failures, next_position)

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
        curves; lists of str for strings); `failures` are (index, path, reason) triples.

        The batch goes to the journal first, then to the main file."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"columns of different lengths: { {k: len(v) for k, v in columns.items()} }"
            )
        _write_part(journal_dir(self.path), columns, failures, next_position, self.config)
        self._append_main(columns, failures, next_position)

    def _append_main(self, columns: dict, failures: list, next_position: int) -> None:
        start = self.rows
        count = len(next(iter(columns.values()))) if columns else 0
        if count:
            for name, values in columns.items():
                self._write_rows(name, values, start, count)
        if failures:
            self._write_failures(failures)
        _crash_point("main-write")
        self.file.attrs["rows"] = start + count
        self.file.attrs["failures"] = self.n_failures + len(failures)
        self.file.attrs["next_position"] = next_position
        self.file.flush()
        _crash_point("after-commit")

    def _write_rows(self, name: str, values, start: int, count: int) -> None:
        if name not in self.file:
            create_column(self.file, name, values, rows=start)
        dataset = self.file[name]
        dataset.resize(start + count, axis=0)
        dataset[start : start + count] = _as_column(values)

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

    def get_attr(self, key: str, default=None):
        """A file attribute, JSON-decoded when it holds an object or a list."""
        value = self.file.attrs.get(key, default)
        if isinstance(value, str) and value[:1] in "{[":
            value = json.loads(value)
        return value

    def set_attrs(self, **attrs) -> None:
        """Store extra file attributes (JSON-encoded when not a plain number or string)."""
        for key, value in attrs.items():
            if not isinstance(value, (int, float, str)):
                value = json.dumps(value, sort_keys=True)
            self.file.attrs[key] = value
        self.file.flush()

    def finish(self) -> None:
        """Mark the file complete, close it, and delete the journal (no longer needed)."""
        self.file.attrs["complete"] = True
        self.close()
        shutil.rmtree(journal_dir(self.path), ignore_errors=True)

    def close(self) -> None:
        if self.file.id.valid:
            if self.file.mode == "r+":
                self._mark_writing(False)
            self.file.close()

    def __enter__(self) -> MaskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -------------------------------------------------------------------- journal
def journal_dir(path: Path) -> Path:
    """Where the per-batch journal of a mask file lives: OUT/.<stem>.parts/."""
    path = Path(path)
    return path.with_name(f".{path.stem}.parts")


def _part_files(parts: Path) -> list[Path]:
    return sorted(parts.glob("part-*.h5")) if parts.is_dir() else []


def _write_part(parts: Path, columns: dict, failures: list, next_position: int, config: dict):
    """Write one batch as parts/part-<next_position>.h5, atomically (temporary name, rename)."""
    parts.mkdir(parents=True, exist_ok=True)
    final = parts / f"part-{next_position:010d}.h5"
    temporary = parts / f".tmp-{next_position:010d}.h5"
    with h5py.File(temporary, "w") as file:
        file.attrs["next_position"] = next_position
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        rows = file.create_group("columns")
        for name, values in columns.items():
            create_column(rows, name, values)
        _create_failures(file, failures)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    _crash_point("part-write")
    os.replace(temporary, final)


def _decode(values: np.ndarray) -> np.ndarray | list[str]:
    if values.dtype == object:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return values


def _read_part(part: Path) -> tuple[dict, list, int]:
    with h5py.File(part, "r") as file:
        columns = {name: _decode(d[()]) for name, d in file["columns"].items()}
        group = file["failures"]
        failures = list(
            zip(
                [int(i) for i in group["index"][()]],
                _decode(group["path"][()]),
                _decode(group["reason"][()]),
                strict=True,
            )
        )
        return columns, failures, int(file.attrs["next_position"])


def _part_config(parts: Path) -> dict:
    with h5py.File(_part_files(parts)[0], "r") as file:
        return json.loads(file.attrs["config"])


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
            create_column(file, name, array)
        for key, value in attrs.items():
            file.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


# -------------------------------------------------------------------- merging shards
def sum_timings(totals: list[dict]) -> dict:
    """The shards' `timings_total` (seconds per stage, images) summed key by key."""
    keys = dict.fromkeys(k for t in totals for k, v in t.items() if isinstance(v, (int, float)))
    return {k: sum(t.get(k, 0) or 0 for t in totals) for k in keys}


def merge_files(shards: list[Path], dest: str | Path, compare_keys: list[str] | None = None) -> int:
    """Join complete shard files, in the given order, into one mask file; returns its rows.

    The rows are copied (not linked as HDF5 virtual datasets): the merged file then stands
    alone, survives the shards being moved or deleted, and the string and failure datasets
    join the same way as the numbers. A 50,000-image run copies a few hundred MB, seconds.
    Raises StoreError naming any shard that is incomplete or made with other settings.
    """
    dest = Path(dest)
    configs, columns_list, failures, rows, extra = [], [], [], 0, {}
    totals = []
    for shard in shards:
        try:
            with h5py.File(shard, "r") as file:
                complete = bool(file.attrs.get("complete", False))
                config = json.loads(file.attrs["config"])
                versions = file.attrs["versions"]
                for key in ("class_names", "protocol"):
                    if key in file.attrs:
                        extra.setdefault(key, file.attrs[key])
                totals.append(json.loads(file.attrs.get("timings_total", "{}")))
        except (OSError, KeyError) as error:
            raise StoreError(f"{shard}: cannot be read ({one_line(error)})") from error
        if not complete:
            raise StoreError(f"{shard} is not complete: rerun its shard to finish it")
        configs.append(config)
        columns, _ = read_columns(shard)
        columns_list.append(columns)
        failures += read_failures(shard)
        rows += len(columns.get("path", []))
    keys = compare_keys or sorted(set(configs[0]) - {"shard"})
    for shard, config in zip(shards[1:], configs[1:], strict=True):
        changed = [k for k in keys if config.get(k) != configs[0].get(k)]
        if changed:
            raise StoreError(f"{shard} was made with other settings than {shards[0]}: {changed}")
    config = {k: v for k, v in configs[0].items() if k != "shard"}
    temporary = dest.with_name(f".{dest.name}.merging")
    with h5py.File(temporary, "w") as file:
        file.attrs["format"] = FORMAT
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        file.attrs["versions"] = versions
        file.attrs["rows"] = rows
        file.attrs["failures"] = len(failures)
        file.attrs["next_position"] = max((c["shard"]["stop"] for c in configs), default=0)
        file.attrs["complete"] = True
        file.attrs["merged_from"] = json.dumps([Path(s).name for s in shards])
        for key, value in extra.items():
            file.attrs[key] = value
        if any(totals):
            file.attrs["timings_total"] = json.dumps(sum_timings(totals))
        for name, values in _joined_columns(columns_list).items():
            create_column(file, name, values)
        _create_failures(file, failures)
    os.replace(temporary, dest)
    return rows


def _joined_columns(columns_list: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The union of the shards' columns, rows in shard order. A column that a shard with rows
    lacks (e.g. its images all lacked boxes) is filled there: NaN for numbers (integers
    become floats), "" for strings."""
    names = list(dict.fromkeys(n for columns in columns_list for n in columns))
    joined = {}
    for name in names:
        example = next(c[name] for c in columns_list if name in c)
        parts = []
        for columns in columns_list:
            count = len(columns.get("path", []))
            if name in columns:
                parts.append(columns[name][:count])
            elif count and example.dtype.kind in "OUS":
                parts.append(np.array([""] * count, dtype=object))
            elif count:
                parts.append(np.full((count,) + example.shape[1:], np.nan))
        parts = [p for p in parts if len(p)]
        if parts:
            strings = any(p.dtype.kind in "OUS" for p in parts)
            joined[name] = (
                _string_array(np.concatenate(parts)) if strings else np.concatenate(parts)
            )
    return joined


def _create_failures(file: h5py.File, failures: list[tuple[int, str, str]]) -> None:
    """The failures group: index, path and reason per image that could not be used."""
    group = file.create_group("failures")
    create_column(group, "index", np.array([f[0] for f in failures], dtype=np.int64))
    for position, field in ((1, "path"), (2, "reason")):
        create_column(group, field, _string_array([f[position] for f in failures]))
