"""The one reader of a run folder: its file names, and a mask (or scores) file's columns,
attributes, failures, listing and maps.

A run folder OUT holds ``masks.h5`` (or one ``masks-IIIII-of-NNNNN.h5`` per shard, merged
into ``masks.h5``), or ``scores.h5`` for maps `mpbatch evaluate` scored that mpbatch did not
make, and beside it the reports (pipeline.reports.writer). pipeline.store.writer writes the
mask file and documents its layout; everything that reads one (evaluate, the reports, `show`, the
gallery, `merge`, benchmarks/quality.py) reads it here. Attributes stored as JSON are
decoded here (`decode_attr`; the store uses it too when it resumes a file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..data.listing import UNKNOWN, Listing
from ..errors import MpbatchError
from ..methods import DEFAULT_METHOD, get_method, settings_from_config

MASKS_FILE = "masks.h5"  # a run's file (shards: masks-IIIII-of-NNNNN.h5)
SCORES_FILE = "scores.h5"  # `evaluate`'s file for maps not made by mpbatch
REPORT_FILE = "report.csv"
FAILURES_FILE = "failures.csv"
FAILURE_FIELDS = ("index", "path", "reason")
STAMP_COLUMNS = ("file_size", "file_mtime_ns")


class RunFileError(MpbatchError):
    """A run folder without a mask file, or a file that is not one."""


class RunFileBusy(RunFileError, BlockingIOError):
    """A mask file that a live run is writing (HDF5's file lock). Also a BlockingIOError, so
    that whoever reads a file that may be busy (a shard's completeness) catches it as
    before."""


def decode_strings(values: np.ndarray) -> np.ndarray | list[str]:
    """HDF5 strings as a list of str: variable-length (bytes or str objects) and fixed-length
    bytes (`np.array(paths, dtype="S")`, the common way to write them with h5py); numbers as
    they are."""
    if values.dtype == object or values.dtype.kind == "S":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return values


def open_h5(path: str | Path) -> h5py.File:
    """A mask file opened for reading; one that a live run is writing (HDF5's file lock)
    raises RunFileError naming the run that holds it, instead of HDF5's BlockingIOError."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        if "unable to lock file" not in str(error).lower():
            raise
        path = Path(path)
        lock = path.with_name(f".{path.name}.lock")  # pipeline.store.lock's lock file
        holder = lock.read_text().strip() if lock.is_file() else ""
        raise RunFileBusy(
            f"{path} is being written by a live run ({holder or 'another process'}); "
            "rerun when it has ended or stopped"
        ) from None


def decode_attr(value: Any) -> Any:
    """One attribute as stored: JSON objects and lists decoded, bytes as str."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        value = json.loads(value)
    return value


def decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """A file's attributes, the JSON ones (objects and lists) decoded."""
    return {key: decode_attr(value) for key, value in attrs.items()}


def find_run_file(path: str | Path) -> Path:
    """The mask file of a run: `path` itself when it is a file, else OUT/masks.h5, else
    OUT/scores.h5 (maps scored by `evaluate`)."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (MASKS_FILE, SCORES_FILE):
        if (path / name).is_file():
            return path / name
    raise RunFileError(f"{path}: no {MASKS_FILE} or {SCORES_FILE} (not a run folder)")


def read_columns(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every per-image dataset of a mask file (its committed rows, strings decoded to a str
    array) and its attributes (JSON decoded).

    A numeric column shorter than the committed rows (scores that `evaluate` wrote before a
    resumed `run --no-metrics` added images) is padded to them with NaN: those images are
    not scored yet."""
    with open_h5(path) as file:
        rows = int(file.attrs.get("rows", 0))
        columns = {}
        for name, dataset in file.items():
            if isinstance(dataset, h5py.Dataset):
                values = dataset[:rows]
                if h5py.check_string_dtype(dataset.dtype):
                    values = np.array(decode_strings(values))
                elif len(values) < rows and np.issubdtype(values.dtype, np.number):
                    missing = np.full((rows - len(values), *values.shape[1:]), np.nan)
                    values = np.concatenate([values.astype(np.float64), missing])
                columns[name] = values
        return columns, decode_attrs(file.attrs)


def read_attrs(path: str | Path) -> dict[str, Any]:
    """A mask file's attributes alone (JSON decoded), without reading its datasets."""
    with open_h5(path) as file:
        return decode_attrs(file.attrs)


def read_config(folder: str | Path) -> dict:
    """The `config` attribute of a run folder's mask (or scores) file; {} when there is no
    readable one (a folder holding only a summary)."""
    try:
        config = read_attrs(find_run_file(folder)).get("config")
    except (RunFileError, OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def row_keys(group: h5py.Group, count: int) -> list[tuple[str, tuple[int, int]]]:
    """(path, (size, mtime_ns)) of the first `count` entries of a group with a path column;
    the stamp is unknown (-1) where the file predates stamps."""
    if count == 0:
        return []
    paths = decode_strings(group["path"][:count])
    stamps = [
        group[name][:count] if name in group else np.full(count, UNKNOWN) for name in STAMP_COLUMNS
    ]
    return [(p, (int(s), int(m))) for p, s, m in zip(paths, *stamps, strict=True)]


def read_failures(path: str | Path, stamps: bool = False) -> list[tuple]:
    """The (index, path, reason) triples recorded in a mask file; with `stamps`, also each
    file's (size, mtime_ns) as two more fields (unknown, -1, in older files)."""
    with open_h5(path) as file:
        count = int(file.attrs.get("failures", 0))
        group = file["failures"]
        index = group["index"][:count]
        paths = decode_strings(group["path"][:count])
        reasons = decode_strings(group["reason"][:count])
        keys = row_keys(group, count)
    triples = [(int(i), p, r) for i, p, r in zip(index, paths, reasons, strict=True)]
    if not stamps:
        return triples
    return [(*t, *stamp) for t, (_, stamp) in zip(triples, keys, strict=True)]


def listing_of(file: h5py.File) -> Listing | None:
    """The listing stored in an open mask file (None for files that predate listings)."""
    if "listing" not in file:
        return None
    group = file["listing"]
    paths = tuple(decode_strings(group["path"][()]))
    return Listing(paths, group["file_size"][()], group["file_mtime_ns"][()])


def read_listing(path: str | Path) -> Listing | None:
    """The listing stored in a mask file (None for files that predate listings)."""
    with open_h5(path) as file:
        return listing_of(file)


def map_label(config: dict) -> str:
    """How a run's own map is labelled in summaries: its name, else its method."""
    return str(config.get("name") or config.get("method") or "method")


@dataclass
class RunFile:
    """A mask or scores file read whole: per-image columns and decoded attributes.

    `columns` maps a dataset name to its N committed rows (N×... arrays; strings as str).
    """

    path: Path
    columns: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> RunFile:
        """Read the run in `path` (a run folder, a mask file or a scores file)."""
        found = find_run_file(path)
        columns, attrs = read_columns(found)
        return cls(found, columns, attrs)

    @property
    def config(self) -> dict:
        config = self.attrs.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def class_names(self) -> list[str]:
        return [str(name) for name in self.attrs.get("class_names", [])]

    @property
    def rows(self) -> int:
        return len(self.columns.get("path", []))

    @property
    def label(self) -> str:
        return map_label(self.config)

    def failures(self) -> list[tuple]:
        return read_failures(self.path)

    def class_name(self, index: int) -> str:
        names = self.class_names
        return names[index] if 0 <= index < len(names) else ""

    def method_columns(self, rows, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The stored columns the run's method makes its maps from, for `rows`."""
        stored = [k for k in ("masks", "params", "prob_masked") if k in self.columns]
        picked = {k: np.asarray(self.columns[k][rows], dtype=np.float32) for k in stored}
        return {k: torch.from_numpy(v).to(device) for k, v in picked.items()}

    def maps(self, rows, size: tuple[int, int], device: torch.device | str = "cpu"):
        """The run's B×H×W maps of `rows` at input `size`, as its method scores them."""
        method = get_method(self.config.get("method") or DEFAULT_METHOD)
        settings = settings_from_config(self.config)
        columns = self.method_columns(rows, device)
        return method.saliency(columns, settings, size, self.config.get("area"))
