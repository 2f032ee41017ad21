"""What resuming by path costs at ImageNet-val scale: appending batches to a mask file (space
reserved, journal part, main file), then reopening it over an unchanged listing and over one
with an image removed (the file is rewritten without its row, which is moved out).

Synthetic rows shaped like a seed-preset run's (a 28×28 mask, 2 curves of 226 scores per
map for the method and 3 comparisons, 40 scalar columns); no model runs.

    .venv/bin/python -m benchmarks.bench_resume --images 50000 --batch-size 64

Writes benchmarks/results/bench_resume.csv (``--out`` to change).
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from pipeline.store.writer import MaskStore  # noqa: E402


def batch_columns(start: int, count: int) -> dict:
    rng = np.random.default_rng(start)
    columns = {
        "masks": rng.random((count, 28, 28), dtype=np.float32),
        "path": [f"val/ILSVRC2012_val_{i:08d}.JPEG" for i in range(start, start + count)],
        "index": np.arange(start, start + count),
        "file_size": np.full(count, 110_000),
        "file_mtime_ns": np.full(count, 1_700_000_000_000_000_000),
    }
    for prefix in ("", "center_", "random_", "gradcam_"):
        for curve in ("deletion_curve", "insertion_curve"):
            columns[prefix + curve] = rng.random((count, 226), dtype=np.float32)
    for k in range(40):
        columns[f"scalar_{k}"] = rng.random(count, dtype=np.float32)
    return columns


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_resume.csv")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench_resume_", dir=ROOT))
    path = folder / "masks.h5"
    rows = []
    try:
        tick = time.perf_counter()
        with MaskStore.open(path, {"bench": True}, {}) as store:
            for start in range(0, args.images, args.batch_size):
                count = min(args.batch_size, args.images - start)
                store.append(batch_columns(start, count), [])
        appended = time.perf_counter() - tick
        batches = -(-args.images // args.batch_size)
        rows.append(
            {
                "step": "append every batch",
                "seconds": appended,
                "per_batch_ms": 1e3 * appended / batches,
            }
        )
        today = {
            f"val/ILSVRC2012_val_{i:08d}.JPEG": (i, 110_000, 1_700_000_000_000_000_000)
            for i in range(args.images)
        }
        for step, listing in (
            ("reopen + reconcile, listing unchanged", today),
            (
                "reopen + reconcile, one image removed",
                {k: v for k, v in today.items() if v[0] != 7},
            ),
        ):
            tick = time.perf_counter()
            with MaskStore.open(path, {"bench": True}, {}) as store:
                done = store.reconcile(listing)
            rows.append(
                {"step": step, "seconds": time.perf_counter() - tick, "rows_kept": len(done.done)}
            )
        size_mb = path.stat().st_size / 2**20
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    common = {
        "cpu": cpu_name(),
        "images": args.images,
        "batch_size": args.batch_size,
        "file_mb": round(size_mb, 1),
    }
    rows = [{**common, **row} for row in rows]
    for row in rows:
        print(
            ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
        )
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
