"""Shards of a run: which shard this process runs (`--shard I/N` or the launcher's
environment), their file names, when all are complete, and joining them into one file (rows
in listing order; refused when the shards disagree on settings or on the listing)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..data.datasets import DatasetError
from ..data.listing import Listing, compare
from ..errors import one_line
from ..reports.writer import write_failures_csv, write_report_csv, write_summary
from ..store.lock import OutputInUse, hold
from ..store.reader import (
    FAILURES_FILE,
    MASKS_FILE,
    REPORT_FILE,
    RunFile,
    read_attrs,
    read_failures,
    read_listing,
)
from ..store.writer import (
    FORMAT,
    StoreError,
    create_column,
    create_failures,
    string_array,
    write_listing,
)
from .configuration import RunRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: shard `rank` of `world`, on GPU `local_rank`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    source: str = "single process"

    @property
    def tag(self) -> str:
        """File-name tag, e.g. "00003-of-00008"."""
        return f"{self.rank:05d}-of-{self.world:05d}"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise DatasetError(f"environment variable {name}={value!r} is not an integer") from exc


def resolve_shard(spec: str | None, env: Mapping[str, str]) -> Shard:
    """Which shard this process runs, from `--shard I/N` or the launcher's environment.

    Order: an explicit "I/N"; else the rank inside one job step (torchrun's RANK/WORLD_SIZE,
    or srun's SLURM_PROCID/SLURM_NTASKS), combined with the SLURM job-array index
    (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) when present:
    global rank = array_index × ranks_per_task + rank. LOCAL_RANK (or SLURM_LOCALID) picks
    the GPU.
    """
    local_rank = _env_int(env, "LOCAL_RANK")
    if local_rank is None:
        local_rank = _env_int(env, "SLURM_LOCALID") or 0
    if spec:
        try:
            rank_text, world_text = spec.split("/")
            rank, world = int(rank_text), int(world_text)
        except ValueError as exc:
            raise DatasetError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from exc
        if world < 1 or not 0 <= rank < world:
            raise DatasetError(f"--shard {spec!r}: need 0 <= I < N")
        return Shard(rank, world, local_rank, "--shard")

    rank, world, source = 0, 1, "single process"
    if _env_int(env, "WORLD_SIZE") is not None:
        rank, world, source = _env_int(env, "RANK") or 0, _env_int(env, "WORLD_SIZE"), "torchrun"
    elif _env_int(env, "SLURM_NTASKS") is not None and _env_int(env, "SLURM_PROCID") is not None:
        rank, world, source = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS"), "srun"
    task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task_id is not None:
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise DatasetError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        index = task_id - first
        if not 0 <= index < count:
            raise DatasetError(
                f"SLURM array task {task_id} is outside {first}..{first + count - 1}: "
                "use a contiguous --array range"
            )
        rank, world = index * world + rank, count * world
        source = f"SLURM array ({source})" if source != "single process" else "SLURM array"
    if world < 1 or not 0 <= rank < world:
        raise DatasetError(f"invalid shard from the environment ({source}): rank {rank} of {world}")
    return Shard(rank, world, local_rank, source)


def output_names(shard: Shard) -> tuple[str, str, str]:
    """(masks, report, failures) file names of a shard: masks.h5 when unsharded."""
    if shard.world == 1:
        return MASKS_FILE, REPORT_FILE, FAILURES_FILE
    return (f"masks-{shard.tag}.h5", f"report-{shard.tag}.csv", f"failures-{shard.tag}.csv")


def shard_files(out: Path) -> dict[int, dict[int, Path]]:
    """Shard mask files in `out`, as {world: {rank: path}}."""
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(Path(out).glob("masks-*-of-*.h5")):
        rank_text, _, world_text = path.stem[len("masks-") :].partition("-of-")
        if rank_text.isdigit() and world_text.isdigit():
            found.setdefault(int(world_text), {})[int(rank_text)] = path
    return found


def all_shards_complete(out: Path, world: int) -> bool:
    """True when every shard file of a `world`-way run exists and is marked complete."""
    files = shard_files(out).get(world, {})
    if len(files) != world:
        return False
    for path in files.values():
        try:
            if not read_attrs(path).get("complete", False):
                return False
        except OSError:
            return False
    return True


def merge_once(out: Path) -> Path | None:
    """Merge the shards unless another shard's process is merging them already.

    The last shards of a run can finish at the same moment, each see all shards complete,
    and both write OUT/masks.h5; the lock of masks.h5 lets one of them merge. Returns the
    merged file, or None when another process holds it.
    """
    try:
        return merge(out)
    except OutputInUse as busy:
        log.warning("not merging: %s", busy)
        return None


def merge(out: str | Path) -> Path:
    """Join OUT/masks-IIIII-of-NNNNN.h5 into OUT/masks.h5 with report.csv, failures.csv and
    the summary; refuses (StoreError) when shards are missing, incomplete, inconsistent or
    made from other listings, and (OutputInUse) while another process writes masks.h5."""
    out = Path(out)
    merged = out / MASKS_FILE
    with hold(merged):
        found = shard_files(out)
        if not found:
            raise StoreError(f"{out}: no shard files (masks-IIIII-of-NNNNN.h5) to merge")
        if len(found) > 1:
            raise StoreError(f"{out}: shard files of several world sizes {sorted(found)}; keep one")
        world, files = next(iter(found.items()))
        missing = [f"masks-{r:05d}-of-{world:05d}.h5" for r in range(world) if r not in files]
        if missing:
            raise StoreError(f"{out}: missing shards {', '.join(missing)}; run them, then merge")
        shards = [files[r] for r in range(world)]
        merge_files(shards, merged, compare_keys=RunRecord.merge_keys())
        write_report_csv(merged, out / REPORT_FILE)
        failures = write_failures_csv(merged, out / FAILURES_FILE)
        if read_attrs(merged)["config"].get("evaluation") is not None:
            write_summary(merged, out, skipped=len(failures))
    return merged


# -------------------------------------------------------------------- joining files
def sum_timings(totals: list[dict]) -> dict:
    """The shards' `timings_total` (seconds per stage, images) summed key by key."""
    keys = dict.fromkeys(k for t in totals for k, v in t.items() if isinstance(v, (int, float)))
    return {k: sum(t.get(k, 0) or 0 for t in totals) for k in keys}


def merge_files(shards: list[Path], dest: str | Path, compare_keys: list[str] | None = None) -> int:
    """Join complete shard files into one mask file, rows in listing order; returns its rows.

    The rows are copied (not linked as HDF5 virtual datasets): the merged file then stands
    alone, survives the shards being moved or deleted, and the string and failure datasets
    join the same way as the numbers. A 50,000-image run copies a few hundred MB, seconds.
    Raises StoreError naming any shard that is incomplete, made with other settings, or made
    from another listing of the images (naming the first images that differ).
    """
    runs = [_complete_shard(shard) for shard in shards]
    keys = compare_keys or sorted(set(runs[0].config) - {"shard"})
    for shard, run in zip(shards[1:], runs[1:], strict=True):
        changed = [k for k in keys if run.config.get(k) != runs[0].config.get(k)]
        if changed:
            raise StoreError(f"{shard} was made with other settings than {shards[0]}: {changed}")
    listings = [read_listing(shard) for shard in shards]
    _check_same_listing(shards, listings)
    failures = sorted(
        (f for shard in shards for f in read_failures(shard, stamps=True)), key=lambda f: f[0]
    )
    joined = _joined_columns([run.columns for run in runs])
    if "index" in joined:
        order = np.argsort(joined["index"], kind="stable")
        joined = {name: values[order] for name, values in joined.items()}
    _write_merged(Path(dest), runs, joined, failures, listings[0], [Path(s).name for s in shards])
    return sum(run.rows for run in runs)


def _complete_shard(shard: Path) -> RunFile:
    """A shard file read whole; StoreError when it cannot be read or is not complete."""
    try:
        run = RunFile.open(shard)
        run.attrs["config"], run.attrs["versions"]  # noqa: B018 (both must be there)
    except (OSError, KeyError, ValueError) as error:
        raise StoreError(f"{shard}: cannot be read ({one_line(error)})") from error
    if not run.attrs.get("complete", False):
        raise StoreError(f"{shard} is not complete: rerun its shard to finish it")
    return run


def _encoded(value):
    """An attribute as the store writes it: JSON unless a plain number or string."""
    return value if isinstance(value, (int, float, str)) else json.dumps(value, sort_keys=True)


def _write_merged(dest: Path, runs, joined, failures, listing, names) -> None:
    """Write the merged file under a temporary name, then rename it to `dest`."""
    first = runs[0].attrs
    temporary = dest.with_name(f".{dest.name}.merging")
    with h5py.File(temporary, "w") as file:
        file.attrs["format"] = FORMAT
        config = {k: v for k, v in first["config"].items() if k != "shard"}
        file.attrs["config"] = json.dumps(config, sort_keys=True)
        file.attrs["versions"] = _encoded(first["versions"])
        file.attrs["rows"] = sum(run.rows for run in runs)
        file.attrs["failures"] = len(failures)
        file.attrs["complete"] = True
        file.attrs["merged_from"] = json.dumps(names)
        for key in ("class_names", "protocol"):
            found = [run.attrs[key] for run in runs if key in run.attrs]
            if found:
                file.attrs[key] = _encoded(found[0])
        totals = [run.attrs.get("timings_total", {}) for run in runs]
        if any(totals):
            file.attrs["timings_total"] = json.dumps(sum_timings(totals))
        for name, values in joined.items():
            create_column(file, name, values)
        create_failures(file, failures)
        if listing is not None:
            write_listing(file, listing)
            file.attrs["listing_sha256"] = listing.digest()
    os.replace(temporary, dest)


def _check_same_listing(shards: list[Path], listings: list[Listing | None]) -> None:
    """Shards must have been run over one listing of the images (files of mpbatch ≤ 0.1 have
    none and are not checked)."""
    first = listings[0]
    for shard, listing in zip(shards[1:], listings[1:], strict=True):
        if first is None or listing is None or listing.digest() == first.digest():
            continue
        change = compare(first, listing)
        raise StoreError(
            f"{shard} was run over another listing of the images than {shards[0]} "
            f"(the folder changed between them: {change.describe()}); rerun every shard "
            "with the same command so that each catches up, then merge"
        )


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
            joined[name] = string_array(np.concatenate(parts)) if strings else np.concatenate(parts)
    return joined
