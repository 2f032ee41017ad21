"""`mpbatch` with fault injection, for the kill tests: `python -m crashing_cli run ...`.

MPBATCH_KILL_AT="stage:n" kills this process with SIGKILL the n-th time the store reaches
`stage` of its commit protocol ("part-write", "main-write", "after-commit": see
pipeline.store.STAGE_OBSERVERS). Without it this is plain `mpbatch`.
"""

from __future__ import annotations

import os
import signal

from cli import main
from pipeline import store


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


if __name__ == "__main__":
    if os.environ.get("MPBATCH_KILL_AT"):
        store.STAGE_OBSERVERS.append(kill_at(os.environ["MPBATCH_KILL_AT"]))
    main()
