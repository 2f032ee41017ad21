"""Shards of a run: their file names, when all are complete, and merging them into one."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py

from .configuration import RunRecord
from .datasets import Shard
from .outdir import OutputInUse, hold
from .report import write_failures_csv, write_report_csv, write_summary
from .store import (
    FAILURES_FILE,
    MASKS_FILE,
    REPORT_FILE,
    StoreError,
    merge_files,
    read_columns,
)


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
            with h5py.File(path, "r") as file:
                if not file.attrs.get("complete", False):
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
        print(f"mpbatch: not merging: {busy}", file=sys.stderr)
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
        _, attrs = read_columns(merged)
        if attrs["config"].get("evaluation") is not None:
            write_summary(merged, out, skipped=len(failures))
    return merged
