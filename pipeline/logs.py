"""Telling the user, one way: every module logs to `logging.getLogger(__name__)` (the
"pipeline" hierarchy); the CLI shows those records as one `mpbatch: ...` line each on
stderr, through tqdm so a progress bar is not torn.

Levels: WARNING for what a user must see even with --quiet (images skipped, a changed
folder, a repaired file, a retry after running out of memory, nothing left to do); INFO
for routine notices (the batch size chosen); DEBUG (--verbose) for per-batch timings.
A program that imports pipeline gets Python's default: warnings on stderr, nothing else.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

ROOT = "pipeline"


class TqdmHandler(logging.Handler):
    """Writes each record as its own line above any live tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=_stderr())
        except Exception:  # a logging handler must never raise
            self.handleError(record)


def _stderr():
    import sys

    return sys.stderr  # looked up per record: click's test runner swaps it


def configure(verbosity: int = 0) -> None:
    """Show pipeline's records on stderr: -1 (--quiet) warnings only, 0 notices, 1
    (--verbose) also debug. Replaces what an earlier call set up."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(handler)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("mpbatch: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
