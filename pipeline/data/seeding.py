"""Per-image random seeds: the same image gets the same random numbers in any batch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def image_seed(run_seed: int, key: str | int) -> int:
    """A 63-bit seed for one image from the run seed and a stable key (its relative path,
    or an integer id). It does not depend on the batch, shard or resume point."""
    if isinstance(key, bool):
        raise TypeError("image keys must be strings or ints, not bool")
    digest = hashlib.sha256(f"{int(run_seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_seeds(run_seed: int, keys: Sequence[str | int]) -> list[int]:
    """image_seed of each key, in order."""
    return [image_seed(run_seed, key) for key in keys]
