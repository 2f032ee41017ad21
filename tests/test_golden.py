"""The byte-identity test of the output side: every text report of a fixed run, rewritten
from its frozen mask files, equals what main wrote on 2026-12-07 byte for byte.

tests/golden/make_golden_run.py made the run (a tiny model, 8 photos with boxes and one
broken file, scored with the centre, random and Grad-CAM comparisons; a seed run and a paper
run). Nothing here runs a model, so no CPU's kernels can move a byte: a difference is a
change of a number, a label, a column or its order on the output side.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.reports.writer import write_failures_csv, write_report_csv, write_summary

GOLDEN = Path(__file__).parent / "golden"
RUNS = ("seed", "paper")
REPORTS = ("report.csv", "failures.csv", "summary.csv", "summary.md", "localization.csv")


def _rewrite_reports(masks_file: Path, out: Path) -> None:
    """What `mpbatch run` writes beside a finished single-process run's mask file."""
    write_report_csv(masks_file, out / "report.csv")
    failures = write_failures_csv(masks_file, out / "failures.csv")
    write_summary(masks_file, out, skipped=len(failures))


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    for name in RUNS:
        (root / name).mkdir()
        shutil.copy(GOLDEN / name / "masks.h5", root / name / "masks.h5")
        _rewrite_reports(root / name / "masks.h5", root / name)
    return root


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize("run", RUNS)
def test_reports_are_byte_identical(rewritten, run, report) -> None:
    expected = (GOLDEN / "expected" / run / report).read_bytes()
    assert (rewritten / run / report).read_bytes() == expected


def test_comparison_of_runs_is_byte_identical(rewritten, tmp_path) -> None:
    output = tmp_path / "comparison.csv"
    args = ["report", *(str(rewritten / run) for run in RUNS), "-o", str(output)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("comparison.csv", "comparison.md"):
        assert (tmp_path / name).read_bytes() == (GOLDEN / "expected" / name).read_bytes()
