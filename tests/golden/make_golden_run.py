"""Make the fixed run behind tests/test_golden.py (run once, on the main of 2026-12-07).

A tiny model explains 8 synthetic 40×48 photos with boxes (one of them broken), scored with
the centre, random and Grad-CAM comparisons; a second run with the paper preset gives
`mpbatch report` two runs to compare. The mask files are frozen here, with the reports main
wrote from them: the test rewrites every report from the frozen files and compares bytes,
so a change on the output side that changes a number, a label or a column order shows.

    cd tests && ../.venv/bin/python golden/make_golden_run.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from tiny_models import TINY  # noqa: E402

from cli import main  # noqa: E402

# what `mpbatch run` writes beside masks.h5, compared byte for byte (the pictures are not:
# PNG bytes follow matplotlib's version)
REPORTS = ("report.csv", "failures.csv", "summary.csv", "summary.md", "localization.csv")
WNIDS = ("n01440764", "n01443537")  # ImageNet classes 0 and 1: classes of the tiny model


def write_data(data: Path, boxes: Path) -> None:
    rng = np.random.default_rng(25)
    for i in range(8):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, 30)), int(rng.integers(0, 22))
        w, h = int(rng.integers(6, 18)), int(rng.integers(6, 18))
        pixels[y0 : y0 + h, x0 : x0 + w] = (250, 240, 60)
        data.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(data / f"{name}.png")
        wnid = WNIDS[i % 2]
        x1, y1 = x0 + w - 1, y0 + h - 1
        box = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        boxes.mkdir(parents=True, exist_ok=True)
        (boxes / f"{name}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>48</width>"
            f"<height>40</height><depth>3</depth></size><object><name>{wnid}</name>"
            f"<bndbox>{box}</bndbox></object></annotation>"
        )
    (data / "ILSVRC2012_val_00000009.png").write_bytes(b"not an image")


def main_() -> None:
    for stale in ("data", "boxes", "seed", "paper", "expected"):
        shutil.rmtree(HERE / stale, ignore_errors=True)
    write_data(HERE / "data", HERE / "boxes")
    common = ["--model", TINY, "--size", "32", "--workers", "0", "--quiet", "--batch-size", "3"]
    common += ["--boxes", str(HERE / "boxes"), "--step", "64", "--mask-size", "8"]
    runs = {"seed": ["--iterations", "4"], "paper": ["--preset", "paper", "--iterations", "3"]}
    for name, extra in runs.items():
        args = ["run", str(HERE / "data"), "-o", str(HERE / name), *common, *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    expected = HERE / "expected"
    args = ["report", *(str(HERE / name) for name in runs), "-o", str(expected / "comparison.csv")]
    expected.mkdir()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in runs:  # the text reports are expected; the mask file is the frozen input
        (expected / name).mkdir()
        for report in REPORTS:
            (HERE / name / report).rename(expected / name / report)
        for left in (HERE / name).iterdir():
            if left.name != "masks.h5":
                left.unlink()


if __name__ == "__main__":
    main_()
