"""pipeline.store.lock: the output folder's lock is held by one process, and by none once its
holder is gone, whatever children it forked (DataLoader workers outlive a killed run)."""

from __future__ import annotations

import multiprocessing
import sys
import time

import pytest

from pipeline.store.lock import OutputInUse, hold


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_keeps_no_share_of_the_lock(tmp_path) -> None:
    target = tmp_path / "masks.h5"
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    try:
        with hold(target):
            child.start()
            time.sleep(0.2)  # the child has run its fork handlers
            with pytest.raises(OutputInUse), hold(target):  # the parent still holds it
                pass
        assert child.is_alive()
        with hold(target):  # the holder let go: free, although its child lives on
            pass
    finally:
        child.kill()
        child.join()
