"""A run's listing: the images it explains, keyed by path, each with a stamp of its file.

A run is keyed by its listing, never by positions in it. Each image is its path relative to
DATA, stamped with the file's size and modification time (ns), so that a file replaced under
the same name counts as changed. A resumed run compares the listing it finds today with the
rows it has stored (`MaskStore.reconcile`). Rows whose file is gone or was replaced are
moved out of the mask file (to OUT/dropped/), and every image of today's listing not yet
done is explained. So a changed folder
neither duplicates nor skips an image.

Shards split by a stable key of the path: image p belongs to shard
    int(sha256(p)[:8 bytes], little endian) mod N.
Whatever is added to or removed from the folder, an image stays in its shard. No change of
the listing can make two shards explain one image, or leave one to none of them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNKNOWN = -1  # the stamp of a file that cannot be stat'ed (a dangling link): always "same"


@dataclass(frozen=True)
class Listing:
    """Relative POSIX paths (sorted, as `discover` returns them), each file's size in bytes
    and its mtime in ns (UNKNOWN where the file cannot be stat'ed)."""

    paths: tuple[str, ...]
    sizes: np.ndarray  # int64, one per path
    mtimes: np.ndarray  # int64 ns, one per path

    @classmethod
    def of(cls, root: str | os.PathLike, paths: Sequence[str]) -> Listing:
        """Stamp every path under `root` with os.stat (one call per file)."""
        sizes = np.full(len(paths), UNKNOWN, dtype=np.int64)
        mtimes = np.full(len(paths), UNKNOWN, dtype=np.int64)
        for i, path in enumerate(paths):
            try:
                status = os.stat(Path(root, *path.split("/")))
            except OSError:
                continue  # decoding will fail and say why; the stamp stays unknown
            sizes[i], mtimes[i] = status.st_size, status.st_mtime_ns
        return cls(tuple(paths), sizes, mtimes)

    def __len__(self) -> int:
        return len(self.paths)

    def stamps(self) -> dict[str, tuple[int, int]]:
        """{path: (size, mtime_ns)}."""
        return {
            p: (int(s), int(m)) for p, s, m in zip(self.paths, self.sizes, self.mtimes, strict=True)
        }

    def digest(self) -> str:
        """sha256 of the paths and stamps: equal digests, equal listings."""
        hasher = hashlib.sha256()
        for path, size, mtime in zip(self.paths, self.sizes, self.mtimes, strict=True):
            hasher.update(f"{path}\0{int(size)}\0{int(mtime)}\n".encode())
        return hasher.hexdigest()


def same_stamp(stored: tuple[int, int], today: tuple[int, int]) -> bool:
    """Whether a stored row still describes today's file (an unknown stamp is not a change)."""
    return UNKNOWN in stored or UNKNOWN in today or stored == today


@dataclass(frozen=True)
class ListingChange:
    """How today's listing differs from an earlier one (paths, sorted)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    replaced: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.replaced)

    def describe(self, examples: int = 3) -> str:
        """E.g. "1 added (b.png), 1 removed (a.png), 0 replaced"."""
        parts = []
        for word, paths in (
            ("added", self.added),
            ("removed", self.removed),
            ("replaced", self.replaced),
        ):
            named = ", ".join(paths[:examples]) + (", ..." if len(paths) > examples else "")
            parts.append(f"{len(paths)} {word}" + (f" ({named})" if paths else ""))
        return ", ".join(parts)


def compare(earlier: Listing, today: Listing) -> ListingChange:
    """What was added, removed and replaced between two listings."""
    before, now = earlier.stamps(), today.stamps()
    return ListingChange(
        added=tuple(sorted(set(now) - set(before))),
        removed=tuple(sorted(set(before) - set(now))),
        replaced=tuple(
            sorted(p for p in set(now) & set(before) if not same_stamp(before[p], now[p]))
        ),
    )


def shard_of(path: str, world: int) -> int:
    """The shard (0..world-1) an image belongs to, from its relative path alone."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    digest = hashlib.sha256(path.encode()).digest()
    return int.from_bytes(digest[:8], "little") % world


def shard_positions(paths: Sequence[str], rank: int, world: int) -> list[int]:
    """Positions in `paths` of the images of shard `rank` of `world`, in listing order.

    Shards are disjoint and cover every path; their sizes vary by chance (about ±√(n/world)),
    and a shard may be empty. Without padding, so no image is explained twice.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if world == 1:
        return list(range(len(paths)))
    return [i for i, path in enumerate(paths) if shard_of(path, world) == rank]
