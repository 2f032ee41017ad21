"""The output folder: made (its parent must exist), and held by one process at a time.

Two processes writing one mask file (a SLURM array given the same `-o` by mistake) would
destroy each other's work, so `run`, `evaluate` and `merge` hold a lock on the file they
write: OUT/.<name>.lock, taken with flock(2). The kernel releases it when its holder dies,
so a lock left by a killed process never blocks a rerun; a live holder is named from the
lock file (pid, host, start). A flock belongs to the open file, which a forked child (a
DataLoader worker) shares: each child lets go of the locks its parent holds as it starts, so
that workers outliving a killed run do not keep its folder locked. Shards of one run write
different files and run side by side.
flock works across hosts on NFS (Linux maps it to NFS byte-range locks) and on Lustre with
the `flock` mount option.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .writer import StoreError


class OutputInUse(StoreError):
    """Another live process holds the output file."""


_HELD: set[int] = set()  # descriptors of the lock files this process holds


def _let_go_in_child() -> None:
    """In a forked child: point each inherited lock descriptor at /dev/null, which drops the
    child's share of the lock (the parent keeps it) and leaves no descriptor number free to be
    reused by a later open."""
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for descriptor in _HELD:
        os.dup2(null, descriptor)
    os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def prepare_out(out: str | Path) -> Path:
    """Create OUT (not its parents: a mistyped parent is an error, not a new tree) and check
    that it is a writable folder. Raises StoreError with one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: not a folder")
    if not out.exists():
        parent = out.absolute().parent
        if not parent.is_dir():
            raise StoreError(f"{out}: its parent folder {parent} does not exist; create it first")
        try:
            out.mkdir()
        except FileExistsError:
            pass  # another shard made it first
        except OSError as error:
            raise StoreError(f"{out}: cannot create the folder ({error.strerror})") from error
    if not os.access(out, os.W_OK | os.X_OK):
        raise StoreError(f"{out}: the folder is not writable")
    return out


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def hold(target: str | Path) -> Iterator[None]:
    """Hold the lock of the output file `target` while the block runs; raises StoreError at
    once, naming the holder, when a live process holds it."""
    target = Path(target)
    lock = lock_path(target)
    try:
        handle = open(lock, "a+")  # noqa: SIM115 (closed below, after the block)
    except OSError as error:
        raise StoreError(f"{lock}: cannot create the lock file ({error.strerror})") from error
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputInUse(
                f"{target.parent} is in use: {target.name} is being written by {holder}; "
                "wait for it to end or stop it (--overwrite does not override this)"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        handle.flush()
        _HELD.add(handle.fileno())
        try:
            yield
        finally:
            _HELD.discard(handle.fileno())
            handle.seek(0)
            handle.truncate()
    finally:
        handle.close()  # releases the flock
