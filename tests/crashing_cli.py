"""`mpbatch` with fault injection, for the kill tests: `python -m crashing_cli run ...`.

MPBATCH_KILL_AT="stage:n" kills this process with SIGKILL the n-th time the store reaches
`stage` of its commit protocol ("base-write", "part-write", "main-write", "after-commit": see
pipeline.store.writer.STAGE_OBSERVERS). MPBATCH_SIGNAL_AT_REPORTS=SIGNAL sends this process that
signal as `run` starts writing its reports. Without them this is plain `mpbatch`.
"""

from __future__ import annotations

import os
import signal

from cli import main
from pipeline.commands import run
from pipeline.store import writer as store


def kill_at(spec: str):
    """An observer that kills the process at the n-th arrival at a stage ("stage:n")."""
    stage, count = spec.rsplit(":", 1)
    arrivals = {"n": 0}

    def observe(reached: str) -> None:
        if reached == stage:
            arrivals["n"] += 1
            if arrivals["n"] == int(count):
                os.kill(os.getpid(), signal.SIGKILL)

    return observe


def signal_at_reports(name: str) -> None:
    """Make `run` send itself the signal `name` as it starts writing its reports."""
    write_reports = run.write_run_reports

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, name))
        return write_reports(*args, **kwargs)

    run.write_run_reports = signalled


if __name__ == "__main__":
    if os.environ.get("MPBATCH_KILL_AT"):
        store.STAGE_OBSERVERS.append(kill_at(os.environ["MPBATCH_KILL_AT"]))
    if os.environ.get("MPBATCH_SIGNAL_AT_REPORTS"):
        signal_at_reports(os.environ["MPBATCH_SIGNAL_AT_REPORTS"])
    main()
