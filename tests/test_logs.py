"""Telling the user: one `mpbatch: ...` line per record, levels by --quiet / --verbose."""

from __future__ import annotations

import logging

import pytest

from pipeline.logs import ROOT, TqdmHandler, configure


@pytest.fixture
def restore_pipeline_logger():
    logger = logging.getLogger(ROOT)
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.mark.parametrize(
    ("verbosity", "shown"),
    [(-1, ["careful"]), (0, ["chose 4", "careful"]), (1, ["batch took 1 s", "chose 4", "careful"])],
)
def test_levels_and_format(verbosity, shown, capsys, restore_pipeline_logger) -> None:
    configure(verbosity)
    configure(verbosity)  # set up twice: still one line per record
    log = logging.getLogger("pipeline.commands.run")
    log.debug("batch took %d s", 1)
    log.info("chose %d", 4)
    log.warning("careful")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"mpbatch: {text}" for text in shown]
    handlers = [h for h in logging.getLogger(ROOT).handlers if isinstance(h, TqdmHandler)]
    assert len(handlers) == 1
