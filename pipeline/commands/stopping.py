"""Stopping a run on request: SIGTERM or SIGUSR1 (SLURM's `--signal`) set a flag that the
optimisation checks between iterations and the scoring between chunks, so a stop is honoured
within seconds. The unfinished batch is thrown away; a resumed run recomputes it."""

from __future__ import annotations

import signal
import threading

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later", i.e. requeue and resume


class Interrupted(Exception):
    """The run stopped early on SIGTERM/SIGUSR1 after flushing; rerun to resume."""


class StopRequested(Exception):
    """Raised by StopSignals.check() inside a batch; the batch is abandoned."""


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM and SIGUSR1. SLURM and a terminal
    signal the whole process group; a worker killed by it fails the main process's next
    batch ("DataLoader worker is killed by signal") before the run can stop cleanly. The
    main process ends its workers itself when it stops (and they exit when it dies)."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """While active, SIGTERM and SIGUSR1 only set a flag; `check()` raises StopRequested once
    one has arrived."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def check(self, *_: object) -> None:
        """Raise StopRequested if a stop signal has arrived (usable as an iteration callback)."""
        if self.received:
            raise StopRequested(self.received)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
