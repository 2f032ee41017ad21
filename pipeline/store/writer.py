"""HDF5 storage of masks and per-image columns, appended one batch at a time, resumable.

Layout of a mask file (one per shard; `masks.h5` for a single-process run):

    /masks          N×h×w float32, 1 = pixel kept (the optimisation resolution)
    /path           N UTF-8 strings, relative to the data root: the key of a row
    /file_size, /file_mtime_ns   N int64: the stamp of the image file the row was made from
    /index          N int64, position of the image in the run's listing
    /<column>       N (or N×K) numbers: label, target, pred, prob_clean, prob_masked, ...
    /failures/{index,path,reason,file_size,file_mtime_ns}   images that could not be decoded
    /listing/{path,file_size,file_mtime_ns}   the whole listing of the last invocation
    attrs: config (JSON), versions (JSON), rows, failures, batches, format, listing_sha256

Commit protocol: a batch's rows are written first (datasets grown and filled), then the
counters `rows`, `failures` and `batches` are updated and the file is flushed. Rows beyond
`rows` are leftovers of an interrupted write and are cut off when the file is reopened.

A resumed run keys rows by path, never by position (`reconcile`): rows whose image is gone
from today's listing, or whose file was replaced (another size or mtime), are moved to a file
of their own under OUT/dropped/, the rest are renumbered to today's positions, and what is
left to do is every image of today's listing without a row or a failure. `sort_by_index`
puts the rows in listing order at the end. So a changed folder neither duplicates nor skips
an image.

HDF5 files are not crash-safe: a process killed in the middle of a write can leave one
that does not open. So every batch is first written to a small journal file of its own
(`.masks.parts/part-<batch>.h5`, written under a temporary name and renamed, so a part is
either whole or absent), then appended to the main file. When the main file is damaged it
is moved aside (`*.damaged`) and rebuilt from the journal; when it is behind the journal
(fewer committed batches) the missing batches are replayed. The journal is deleted once the
run completes. A write that fails (disk full, quota) raises StoreError naming the file; what
was committed before stays, and a rerun resumes.

The journal covers every row the main file holds: a file reopened with rows but no journal
(a finished run resumed over a grown folder, or one rescored by `evaluate`) is first copied
whole into the journal as `base.h5`, and a rebuild starts from that copy. A file is only
ever rebuilt from a journal that covers it; one whose journal does not (left by an older
mpbatch) is repaired in place, or, when it cannot be opened, kept aside as `*.damaged` with
a warning that names it.

This module is longer than the project's 300 lines because the commit protocol, the journal
and the resume by path keep one invariant together (every image of the listing has exactly
one row or failure, whatever was killed when); splitting it would spread that over files.
"""

from __future__ import annotations

import datetime
import errno
import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..data.listing import UNKNOWN, Listing, same_stamp
from ..errors import MpbatchError, one_line
from .reader import (
    FAILURE_FIELDS,
    STAMP_COLUMNS,
    decode_attr,
    decode_strings,
    listing_of,
    row_keys,
)

FORMAT = "mpbatch-masks-1"
LISTING_PART = "listing.h5"  # the journal's copy of the stored listing
BASE_PART = "base.h5"  # the journal's copy of the rows a reopened file held before its parts
DROPPED_DIR = "dropped"  # rows whose image left the listing, one file per resume that dropped
STRING = h5py.string_dtype("utf-8")


# The commit protocol's stages, as they are reached: "base-write" (a reopened file's copy in
# the journal written but not yet renamed), "part-write" (a journal part written but not yet
# renamed), "main-write" (the main file grown but not committed) and "after-commit". Each
# callable here is called with the stage's name; the kill tests (tests/crashing_cli.py) add
# one that kills the process at a chosen stage.
STAGE_OBSERVERS: list[Callable[[str], None]] = []


def _reached(stage: str) -> None:
    for observer in STAGE_OBSERVERS:
        observer(stage)


class _UncleanShutdown(Exception):
    """The file was left open for writing by a process that died."""


class StoreError(MpbatchError):
    """A one-line, user-facing problem with an output file.

    exit_at_once: HDF5 failed in the middle of a write (disk full). Its library then crashes
    at interpreter exit (a segmentation fault with h5py 3.16, HDF5 2.0), so the CLI ends the
    process with os._exit after saying so; the journal keeps everything for the rerun."""

    def __init__(self, message: str, *, exit_at_once: bool = False) -> None:
        super().__init__(message)
        self.exit_at_once = exit_at_once


def _is_lock_error(error: BaseException) -> bool:
    """HDF5's own file lock: another process has the file open (not a damaged file)."""
    return "unable to lock file" in str(error).lower()


def string_array(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _as_column(values) -> np.ndarray:
    """Per-row values as an array: numbers as they are, strings as UTF-8 objects."""
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OUS":
        return values
    if len(values) and isinstance(values[0], (str, bytes, np.str_)):
        return string_array(values)
    return np.asarray(values)


def _chunk_rows(array: np.ndarray) -> int:
    """Rows per chunk of a growable column: about 1 MB, at most 256 rows."""
    return max(1, min(256, (1 << 20) // max(1, array[0:1].nbytes or 8)))


def create_column(
    group: h5py.Group, name: str, values, rows: int | None = None, fitted: bool = False
) -> h5py.Dataset:
    """The one way a per-row dataset is made: resizable along the rows, chunked about 1 MB,
    strings as UTF-8, NaN as the fill value of floats. With `rows` (≥ 0) the dataset starts
    with that many fill rows and `values` only sets its type and row shape; else it holds
    `values`. `fitted`: one chunk of exactly the rows given (a journal part, never grown)."""
    array = _as_column(values)
    dtype = STRING if array.dtype.kind in "OUS" else array.dtype
    row_shape = array.shape[1:]
    chunk_rows = _chunk_rows(array)
    if fitted:
        chunk_rows = max(1, len(array))
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


_HDF5_OS_MESSAGE = re.compile(r"error message = '([^']*)'")


def _os_reason(error: Exception) -> str:
    """The OS's words for a failed write ("No space left on device"), also when HDF5 wraps
    them in a long message; else the error as one line."""
    found = _HDF5_OS_MESSAGE.search(str(error))
    if found:
        return found.group(1)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return one_line(error)


def _write_errors_are_store_errors(method):
    """A write that fails (disk full, quota, file size limit) raises StoreError with one line
    naming the file; HDF5 reports such failures as OSError or RuntimeError. What was committed
    before stays, and a rerun resumes."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as error:
            if isinstance(error, MpbatchError):
                raise
            self._let_go()
            raise StoreError(
                f"{self.path}: cannot write ({_os_reason(error)}); what was written before is "
                "kept: rerun the same command to resume once it can be written",
                exit_at_once=True,
            ) from error

    return wrapper


def _quiet_hdf5_deallocation(unraisable) -> None:
    """After a failed write HDF5 repeats the error as each of the file's objects is freed
    ("Exception ignored in: h5py._objects.ObjectID.__dealloc__"), dozens of tracebacks after
    the one line that says it; other unraisable errors go to Python's own hook."""
    if "h5py" not in repr(unraisable.object) and "ObjectID" not in str(unraisable.err_msg):
        sys.__unraisablehook__(unraisable)


@dataclass(frozen=True)
class Reconciled:
    """What `MaskStore.reconcile` found: the paths done (a row or a failure), and the rows
    and failures it moved out because their image is gone or was replaced."""

    done: frozenset[str]
    gone: int
    replaced: int
    dropped_file: Path | None


class MaskStore:
    """An open mask file in append mode. Use `MaskStore.open(...)`; close with `close()`."""

    def __init__(self, file: h5py.File, path: Path) -> None:
        self.file = file
        self.path = path
        self.repaired = ""  # what was repaired on opening, for the log
        self.closed = False
        self.broken = False  # a write failed: HDF5's state is not to be trusted

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
        Raises StoreError when the existing file was made with other settings, is open in
        another process, cannot be written, or is damaged with no journal to rebuild it from.
        """
        path = Path(path)
        try:
            return cls._open(path, config, versions, compare_keys, overwrite, fill_stored)
        except OSError as error:
            raise StoreError(f"{path}: cannot be written ({_os_reason(error)})") from error

    @classmethod
    def _open(cls, path, config, versions, compare_keys, overwrite, fill_stored) -> MaskStore:
        parts = journal_dir(path)
        if overwrite:
            path.unlink(missing_ok=True)
            shutil.rmtree(parts, ignore_errors=True)
        for leftover in parts.glob(".tmp-*") if parts.is_dir() else []:
            leftover.unlink()  # a part whose write failed (disk full) or was killed
        has_journal = bool(_part_files(parts)) or (parts / BASE_PART).exists()
        covered = _journal_covers(parts)
        if path.exists() and not os.access(path, os.W_OK):
            raise StoreError(f"{path}: the file is not writable (its permissions)")
        if path.exists():
            try:
                store = cls._reopen(path, trust_unclean=not covered)
            except (OSError, KeyError, ValueError) as error:
                if isinstance(error, PermissionError) or "errno = 13" in str(error):
                    raise StoreError(
                        f"{path}: the file is not writable ({one_line(error)})"
                    ) from error
                if _is_lock_error(error):
                    raise StoreError(
                        f"{path} is open in another process (HDF5 file lock: {one_line(error)}); "
                        "close it there, then rerun"
                    ) from error
                if not has_journal:
                    raise StoreError(
                        f"{path} is damaged ({one_line(error)}) and has no journal to rebuild "
                        "it from; use --overwrite to start over"
                    ) from error
                damaged = _set_aside(path, ".damaged")
                store = cls._rebuild(path, versions)
                store.repaired = f"{path} was damaged: moved to {damaged.name}, rebuilt" + (
                    ""
                    if covered
                    else f"; its journal held only later batches, so the rows before them "
                    f"are in {damaged.name} alone"
                )
            except _UncleanShutdown:
                # The last writer died with the file open: HDF5 may hold half-written metadata
                # that only fails later, so rebuild it from the journal (which covers every row
                # the file held) rather than trust it. The file is kept until the rebuild is done.
                unclean = _set_aside(path, ".unclean")
                store = cls._rebuild(path, versions)
                unclean.unlink()
                store.repaired = f"{path} was not closed cleanly: rebuilt from its journal"
        elif has_journal:
            store = cls._rebuild(path, versions)
        else:
            return cls._create(path, config, versions)
        store._check_config(config, compare_keys, fill_stored)
        store._replay_journal()
        if not _journal_covers(parts) and (store.rows or store.n_failures):
            store._write_base()
        return store

    @classmethod
    def _reopen(cls, path: Path, trust_unclean: bool) -> MaskStore:
        file = h5py.File(path, "r+")
        try:
            if file.attrs.get("format") != FORMAT:
                raise ValueError(f"not an mpbatch mask file (format {file.attrs.get('format')!r})")
            decode_attr(file.attrs["config"])
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

    def _write_base(self) -> None:
        """Copy the whole file into the journal (BASE_PART), so that the journal covers every
        row the file holds before the next part is written: written aside, then renamed."""
        self.file.flush()
        _write_base_part(self.path, journal_dir(self.path))

    @classmethod
    def _rebuild(cls, path: Path, versions: dict) -> MaskStore:
        """A new main file from the journal: its base copy when it has one, else its config
        and listing; the parts are replayed after the config check."""
        parts = journal_dir(path)
        if (parts / BASE_PART).exists():
            temporary = path.with_name(f".{path.name}.rewriting")
            shutil.copyfile(parts / BASE_PART, temporary)
            os.replace(temporary, path)
            store = cls(h5py.File(path, "r+"), path)
            store._mark_writing(True)
            return store
        store = cls._create(path, _part_config(parts), versions)
        if (parts / LISTING_PART).exists():
            with h5py.File(parts / LISTING_PART, "r") as journal:
                listing = listing_of(journal)
            if listing is not None:
                write_listing(store.file, listing)
                store.file.attrs["listing_sha256"] = listing.digest()
        return store

    @classmethod
    def _create(cls, path: Path, config: dict, versions: dict) -> MaskStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = h5py.File(path, "w")
        file.attrs["format"] = FORMAT
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        file.attrs["versions"] = json.dumps(versions, sort_keys=True)
        file.attrs["rows"] = 0
        file.attrs["failures"] = 0
        file.attrs["batches"] = 0
        create_failures(file, [])
        store = cls(file, path)
        store._mark_writing(True)
        return store

    def _check_config(self, config: dict, compare_keys: list[str] | None, fill_stored=None) -> None:
        stored = decode_attr(self.file.attrs["config"])
        if fill_stored is not None:
            stored = fill_stored(stored)
        keys = compare_keys if compare_keys is not None else sorted(set(stored) | set(config))
        config = json.loads(json.dumps(config))  # as stored: tuples become lists
        changed = [k for k in keys if stored.get(k) != config.get(k)]
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in changed)
            hint = _rescored_hint(self.file.attrs, changed)
            self.close()  # unchanged: closed as it was found, not as a killed writer's
            raise StoreError(
                f"{self.path} was made with other settings ({details}); "
                "rerun with the same options to resume, or use --overwrite to start over" + hint
            )

    def _truncate_to_commit(self) -> None:
        rows, failures = self.rows, self.n_failures
        for dataset in self.file.values():
            if isinstance(dataset, h5py.Dataset) and dataset.shape[0] != rows:
                # longer: an interrupted write's leftovers; shorter (files of mpbatch <= 0.1):
                # scores of rows added by a run without metrics, which read as not scored yet
                dataset.resize(rows, axis=0)
        for dataset in self.file["failures"].values():
            if dataset.shape[0] != failures:
                dataset.resize(failures, axis=0)

    def _replay_journal(self) -> None:
        """Append journal parts that the main file does not hold yet: those of a later batch
        than its last commit (files of mpbatch ≤ 0.1 count positions instead of batches)."""
        committed = self.batches
        old_position = int(self.file.attrs.get("next_position", -1))
        for part in _part_files(journal_dir(self.path)):
            with h5py.File(part, "r") as file:  # the attributes only: most parts are old
                batch = int(file.attrs["batch"]) if "batch" in file.attrs else None
                position = int(file.attrs.get("next_position", -1))
            later = batch > committed if batch is not None else position > old_position
            if later:
                columns, failures = _read_part(part)
                self._append_main(columns, failures, batch if batch is not None else committed)

    # ---------------------------------------------------------------- state
    @property
    def rows(self) -> int:
        return int(self.file.attrs["rows"])

    @property
    def n_failures(self) -> int:
        return int(self.file.attrs["failures"])

    @property
    def batches(self) -> int:
        """How many batches have been committed (the journal's part numbers)."""
        return int(self.file.attrs.get("batches", 0))

    @property
    def config(self) -> dict:
        return decode_attr(self.file.attrs["config"])

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs.get("complete", False))

    # ---------------------------------------------------------------- resuming by path
    @_write_errors_are_store_errors
    def reconcile(self, today: Mapping[str, tuple[int, int, int]]) -> Reconciled:
        """Match the stored rows and failures to today's listing of this file's images,
        `today` = {path: (position, size, mtime_ns)}.

        A row (or failure) is kept when its path is in `today` with the same stamp, once per
        path; the others (image gone, file replaced, a duplicate) are moved to a file under
        OUT/dropped/. Kept rows are renumbered to today's positions. Returns what is done.
        """
        rows = row_keys(self.file, self.rows)
        failures = row_keys(self.file["failures"], self.n_failures)
        seen: set[str] = set()
        kept_rows, kept_failures, gone, replaced = [], [], 0, 0
        for keys, kept in ((rows, kept_rows), (failures, kept_failures)):
            for r, (path, stamp) in enumerate(keys):
                if path not in today:
                    gone += 1
                elif not same_stamp(stamp, today[path][1:]) or path in seen:
                    replaced += 1
                else:
                    seen.add(path)
                    kept.append(r)
        row_index = np.array([today[rows[r][0]][0] for r in kept_rows], dtype=np.int64)
        failure_index = np.array([today[failures[r][0]][0] for r in kept_failures], dtype=np.int64)
        dropped = None
        if gone or replaced:
            dropped = self._move_out(kept_rows, kept_failures)
        unchanged = (
            len(kept_rows) == len(rows)
            and len(kept_failures) == len(failures)
            and np.array_equal(row_index, self._index("index", self.rows))
            and np.array_equal(failure_index, self._index("failures/index", self.n_failures))
        )
        if not unchanged:
            self._rewrite(kept_rows, row_index, kept_failures, failure_index)
        return Reconciled(frozenset(seen), gone, replaced, dropped)

    def _index(self, name: str, count: int) -> np.ndarray:
        return self.file[name][:count] if name in self.file else np.zeros(0, dtype=np.int64)

    def _move_out(self, kept_rows: list[int], kept_failures: list[int]) -> Path:
        """Copy the rows and failures not kept to OUT/dropped/<stem>-<UTC time>.h5."""
        kept_rows, kept_failures = set(kept_rows), set(kept_failures)
        rows = [r for r in range(self.rows) if r not in kept_rows]
        failures = [r for r in range(self.n_failures) if r not in kept_failures]
        folder = self.path.parent / DROPPED_DIR
        folder.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = folder / f"{self.path.stem}-{stamp}.h5"
        _copy_rows(self.file, dest, rows, None, failures, None)
        return dest

    def _rewrite(self, rows, row_index, failures, failure_index) -> None:
        """Replace the main file by one holding only the given rows and failures (in that
        order, with these indices), atomically: written aside, fsynced, renamed."""
        temporary = self.path.with_name(f".{self.path.name}.rewriting")
        _copy_rows(self.file, temporary, rows, row_index, failures, failure_index)
        self.file.close()
        os.replace(temporary, self.path)
        self.file = h5py.File(self.path, "r+")
        self._mark_writing(True)

    def listing(self) -> Listing | None:
        """The listing stored by the last invocation (None in files that predate it)."""
        return listing_of(self.file)

    @_write_errors_are_store_errors
    def set_listing(self, listing: Listing) -> None:
        """Store the whole listing of this invocation (for merge's check and the next
        resume's message), unless the stored one is the same; the journal keeps a copy,
        so that a main file rebuilt from it still knows the listing."""
        digest = listing.digest()
        if self.file.attrs.get("listing_sha256") == digest:
            return
        if "listing" in self.file:
            del self.file["listing"]
        write_listing(self.file, listing)
        self.file.attrs["listing_sha256"] = digest
        self.file.flush()
        _write_journal_file(
            journal_dir(self.path) / LISTING_PART, lambda f: write_listing(f, listing)
        )

    # ---------------------------------------------------------------- writing
    @_write_errors_are_store_errors
    def append(self, columns: dict[str, np.ndarray | list], failures: list[tuple]) -> None:
        """Append one batch: `columns` maps a name to B values (B×... arrays for masks and
        curves; lists of str for strings); `failures` are (index, path, reason) triples, or
        (index, path, reason, size, mtime_ns) with the file's stamp.

        The batch goes to the journal first, then to the main file. A failed write (disk
        full) raises StoreError naming the file; earlier batches stay committed."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"columns of different lengths: { {k: len(v) for k, v in columns.items()} }"
            )
        self._check_row_shapes(columns)
        batch = self.batches + 1
        try:  # both fail as plain OSErrors, before HDF5 touches the main file
            self._reserve(columns, failures)
            _write_part(journal_dir(self.path), columns, failures, batch, self.config)
        except OSError as error:
            raise StoreError(
                f"{error.filename or journal_dir(self.path)}: cannot write ({_os_reason(error)}); "
                "what was written before is kept: rerun the same command to resume once it can "
                "be written"
            ) from error
        self._append_main(columns, failures, batch)

    def _check_row_shapes(self, columns: dict) -> None:
        """Refuse, before the journal is written, a batch whose column does not fit the file's
        (a curve of another length after `evaluate` rescored the file with another step):
        such a part could never be replayed."""
        for name, values in columns.items():
            if name in self.file and isinstance(self.file[name], h5py.Dataset) and len(values):
                stored, given = self.file[name].shape[1:], np.shape(values)[1:]
                if stored != given:
                    raise StoreError(
                        f"{self.path}: column {name} holds rows of shape {stored}, and this run "
                        f"makes {given}; nothing of this batch was written"
                    )

    def _reserve(self, columns: dict, failures: list) -> None:
        """Make sure the disk (and the quota) has room for this batch before anything is
        written: allocate a file of the batch's largest possible growth of the journal and
        the main file, then delete it. A full disk then fails here, as a plain OSError,
        instead of in the middle of an HDF5 write (which leaves the main file unreadable
        until a rerun rebuilds it from the journal). Skipped where the file system cannot
        allocate ahead (EOPNOTSUPP, e.g. some NFS servers)."""
        needed = 2 * _growth_bound(columns, failures) + (1 << 20)  # part + main, metadata
        reserve = self.path.with_name(f".{self.path.name}.reserve")
        descriptor = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(descriptor, 0, needed)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            raise OSError(error.errno, error.strerror, str(self.path)) from error
        finally:
            os.close(descriptor)
            reserve.unlink(missing_ok=True)

    def _append_main(self, columns: dict, failures: list, batch: int) -> None:
        start = self.rows
        count = len(next(iter(columns.values()))) if columns else 0
        if count:
            for name, values in columns.items():
                self._write_rows(name, values, start, count)
            for name, dataset in self.file.items():  # columns this batch lacks: fill values
                if isinstance(dataset, h5py.Dataset) and name not in columns:
                    dataset.resize(start + count, axis=0)
        if failures:
            self._write_failures(failures)
        _reached("main-write")
        self.file.attrs["rows"] = start + count
        self.file.attrs["failures"] = self.n_failures + len(failures)
        self.file.attrs["batches"] = batch
        self.file.flush()
        _reached("after-commit")

    def _write_rows(self, name: str, values, start: int, count: int) -> None:
        if name not in self.file:
            create_column(self.file, name, values, rows=start)
        dataset = self.file[name]
        dataset.resize(start + count, axis=0)
        dataset[start : start + count] = _as_column(values)

    def _write_failures(self, failures: list[tuple]) -> None:
        group = self.file["failures"]
        start, count = self.n_failures, len(failures)
        for name, values in _failure_columns(failures).items():
            if name not in group:
                create_column(group, name, values, rows=start)
            group[name].resize(start + count, axis=0)
            group[name][start : start + count] = values

    def get_attr(self, key: str, default=None):
        """A file attribute, JSON-decoded when it holds an object or a list."""
        return decode_attr(self.file.attrs.get(key, default))

    @_write_errors_are_store_errors
    def set_attrs(self, **attrs) -> None:
        """Store extra file attributes (JSON-encoded when not a plain number or string)."""
        for key, value in attrs.items():
            if not isinstance(value, (int, float, str)):
                value = json.dumps(value, sort_keys=True)
            self.file.attrs[key] = value
        self.file.flush()

    @_write_errors_are_store_errors
    def mark_incomplete(self) -> None:
        """A finished file that has new images to explain (its folder changed)."""
        if self.complete:
            self.file.attrs["complete"] = False
            self.file.flush()

    @_write_errors_are_store_errors
    def sort_by_index(self) -> None:
        """Put the rows and failures in listing order (a resume over a changed folder
        appends its new images last)."""
        index = self._index("index", self.rows)
        failure_index = self._index("failures/index", self.n_failures)
        if np.any(np.diff(index) < 0) or np.any(np.diff(failure_index) < 0):
            rows = np.argsort(index, kind="stable")
            failures = np.argsort(failure_index, kind="stable")
            self._rewrite(list(rows), index[rows], list(failures), failure_index[failures])

    @_write_errors_are_store_errors
    def finish(self) -> None:
        """Mark the file complete, close it, and delete the journal (no longer needed)."""
        self.file.attrs["complete"] = True
        self.close()
        shutil.rmtree(journal_dir(self.path), ignore_errors=True)

    def close(self) -> None:
        """Close the file (once). After a failed write it is only let go of: HDF5's state
        is not to be trusted then, and the file, still marked as being written, is rebuilt
        from the journal when reopened."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.broken:
                self._mark_writing(False)
        finally:
            try:
                self.file.close()
            except (OSError, RuntimeError):
                pass

    def _let_go(self) -> None:
        """After a failed write: close without writing anything more, and from now on keep
        HDF5's repeats of the error out of stderr (the process is about to end: the CLI says
        what was kept in one line). Nothing else changes Python's unraisable hook."""
        self.broken = True
        sys.unraisablehook = _quiet_hdf5_deallocation
        self.close()

    def __enter__(self) -> MaskStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _growth_bound(columns: dict, failures: list) -> int:
    """Bytes a batch can add to a mask file at most: each column's rows rounded up to whole
    chunks (create_column's chunking), plus one more chunk, and the failures likewise."""
    total = 0
    for values in [*columns.values(), *_failure_columns(failures).values()]:
        array = _as_column(values)
        row_bytes = max(8, array[0:1].nbytes) if len(array) else 8
        chunk_rows = _chunk_rows(array)
        total += (len(array) // chunk_rows + 2) * chunk_rows * row_bytes
    return total


def _failure_columns(failures: list[tuple]) -> dict[str, np.ndarray]:
    """The failures group's columns of (index, path, reason[, size, mtime_ns]) tuples."""
    return {
        "index": np.array([f[0] for f in failures], dtype=np.int64),
        "path": string_array([f[1] for f in failures]),
        "reason": string_array([f[2] for f in failures]),
        "file_size": np.array([f[3] if len(f) > 3 else UNKNOWN for f in failures], np.int64),
        "file_mtime_ns": np.array([f[4] if len(f) > 4 else UNKNOWN for f in failures], np.int64),
    }


def _copy_rows(source: h5py.File, dest: Path, rows, row_index, failures, failure_index) -> None:
    """Write `dest` as a copy of `source` with only the given rows and failures, in order;
    their `index` replaced by row_index / failure_index unless None. Written and fsynced."""
    rows, failures = np.asarray(rows, dtype=np.int64), np.asarray(failures, dtype=np.int64)
    committed, failed = int(source.attrs["rows"]), int(source.attrs["failures"])
    with h5py.File(dest, "w") as file:
        for key, value in source.attrs.items():
            file.attrs[key] = value
        file.attrs["rows"], file.attrs["failures"] = len(rows), len(failures)
        for name, dataset in source.items():
            if isinstance(dataset, h5py.Dataset):
                values = dataset[:committed][rows] if len(rows) else dataset[:0]
                if name == "index" and row_index is not None:
                    values = row_index
                create_column(file, name, _decode_strings(dataset, values))
            elif name == "listing":
                source.copy(dataset, file, name="listing")
        group = file.create_group("failures")
        for name, dataset in source["failures"].items():
            values = dataset[:failed][failures] if len(failures) else dataset[:0]
            if name == "index" and failure_index is not None:
                values = failure_index
            create_column(group, name, _decode_strings(dataset, values))
    with open(dest, "rb+") as handle:
        os.fsync(handle.fileno())


def _decode_strings(dataset: h5py.Dataset, values: np.ndarray) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype):
        return string_array(decode_strings(values))
    return values


def write_listing(file: h5py.File, listing: Listing) -> None:
    group = file.create_group("listing")
    create_column(group, "path", string_array(listing.paths))
    create_column(group, "file_size", listing.sizes)
    create_column(group, "file_mtime_ns", listing.mtimes)


# -------------------------------------------------------------------- journal
def journal_dir(path: Path) -> Path:
    """Where the per-batch journal of a mask file lives: OUT/.<stem>.parts/."""
    path = Path(path)
    return path.with_name(f".{path.stem}.parts")


def _part_files(parts: Path) -> list[Path]:
    return sorted(parts.glob("part-*.h5")) if parts.is_dir() else []


def _journal_covers(parts: Path) -> bool:
    """Whether the journal holds every row of its main file: a base copy, or parts from the
    first batch on (a run's journal from its start; parts are numbered by batch)."""
    if (parts / BASE_PART).exists():
        return True
    files = _part_files(parts)
    return bool(files) and files[0].name == f"part-{1:010d}.h5"


def _write_base_part(source: Path, parts: Path) -> None:
    """Copy the mask file `source` into the journal as its BASE_PART: copied under a
    temporary name, fsynced, renamed, so the base is whole or absent."""
    parts.mkdir(parents=True, exist_ok=True)
    temporary = parts / f".tmp-{BASE_PART}"
    shutil.copyfile(source, temporary)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    _reached("base-write")
    os.replace(temporary, parts / BASE_PART)


def _set_aside(path: Path, suffix: str) -> Path:
    """Move `path` to `path + suffix` (an earlier one of that name is replaced)."""
    aside = path.with_name(path.name + suffix)
    os.replace(path, aside)
    return aside


def _rescored_hint(attrs: h5py.AttributeManager, changed: list[str]) -> str:
    """What continues a run whose scores `mpbatch evaluate` recomputed with other settings
    (it records them in the config's `scoring`, see pipeline.commands.evaluate)."""
    if "scoring" not in changed or "evaluated" not in attrs:
        return ""
    return (
        "; its scores were recomputed by `mpbatch evaluate`: resume with the scoring options "
        "recorded there, or with --no-metrics and then run `mpbatch evaluate` again"
    )


def _write_part(parts: Path, columns: dict, failures: list, batch: int, config: dict) -> None:
    """Write one batch as parts/part-<batch>.h5 (see _write_journal_file)."""

    def fill(file: h5py.File) -> None:
        file.attrs["batch"] = batch
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        rows = file.create_group("columns")
        for name, values in columns.items():
            create_column(rows, name, values, fitted=True)
        create_failures(file, failures)

    _write_journal_file(parts / f"part-{batch:010d}.h5", fill)


def _write_journal_file(final: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write an HDF5 file of the journal atomically (temporary name, fsync, rename). It is
    built in memory (HDF5's core driver) and written with plain file I/O, so a full disk
    fails as an ordinary OSError and never leaves HDF5 half-way through a write."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".tmp-{final.name}")
    with h5py.File(final.name, "w", driver="core", backing_store=False) as file:
        fill(file)
        file.flush()
        image = file.id.get_file_image()
    try:
        with open(temporary, "wb") as handle:
            handle.write(image)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(temporary)) from error
    _reached("part-write")
    os.replace(temporary, final)


def _read_part(part: Path) -> tuple[dict, list]:
    """(columns, failures) of a journal part."""
    with h5py.File(part, "r") as file:
        columns = {name: decode_strings(d[()]) for name, d in file["columns"].items()}
        group = file["failures"]
        names = [n for n in (*FAILURE_FIELDS, *STAMP_COLUMNS) if n in group]
        values = [decode_strings(group[n][()]) for n in names]
        failures = [tuple(v) for v in zip(*values, strict=True)] if values else []
        return columns, failures


def _part_config(parts: Path) -> dict:
    with h5py.File(_part_files(parts)[0], "r") as file:
        return decode_attr(file.attrs["config"])


# -------------------------------------------------------------------- rewriting
def replace_columns(
    path: str | Path, columns: dict[str, np.ndarray], config: dict | None = None, **attrs
) -> None:
    """Overwrite (or add) whole per-image datasets of a mask file, e.g. recomputed metrics;
    `config`: keys of the stored config to set (what scored them).

    Every array must have one entry per committed row. The file is changed in a copy that
    replaces it whole, so a kill leaves the old file or the new one. A journal (a run not
    finished) is replaced by a copy of the new file, so that its parts, made with the old
    columns, are never replayed beside the new ones.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.rewriting")
    shutil.copyfile(path, temporary)
    with h5py.File(temporary, "r+") as file:
        rows = int(file.attrs["rows"])
        for name, values in columns.items():
            array = np.asarray(values)
            if array.shape[0] != rows:
                temporary.unlink()
                raise ValueError(f"{path}: column {name} has {array.shape[0]} rows, not {rows}")
            if name in file:
                del file[name]
            create_column(file, name, array)
        if config:
            file.attrs["config"] = json.dumps(
                {**decode_attr(file.attrs["config"]), **config}, sort_keys=True
            )
        for key, value in attrs.items():
            file.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    parts = journal_dir(path)
    if _part_files(parts) or (parts / BASE_PART).exists():
        _write_base_part(temporary, parts)
        for part in _part_files(parts):
            part.unlink()
    os.replace(temporary, path)


def create_failures(file: h5py.File, failures: list[tuple]) -> None:
    """The failures group: index, path, reason and the file's stamp per image that could
    not be used."""
    group = file.create_group("failures")
    for name, values in _failure_columns(failures).items():
        create_column(group, name, values)
