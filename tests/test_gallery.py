"""The HTML gallery: files, inline JSON, escaping, thumbnails; the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.gallery import (
    ALPHA,
    CMAP,
    THUMB_KINDS,
    default_metrics,
    saliency_overlay,
    thumbnail_size,
    write_gallery,
)

CHROMIUM = Path("/usr/bin/chromium")
NASTY_PATH = "val/<img src=x onerror=alert(1)>&amp;\"q'</script><b>x.JPEG"
DATA_RE = re.compile(r'<script type="application/json" id="gallery-data">(.*?)</script>', re.S)


def _table(n: int = 6) -> pd.DataFrame:
    """n rows with known metrics; row 2 has NaN deletion_auc, row 4 NaN pointing_hit."""
    rng = np.random.default_rng(0)
    deletion = np.array([0.30, 0.75, np.nan, 0.10, 0.55, 0.90] * (n // 6 + 1))[:n]
    hit = np.array([1.0, 0.0, 0.0, 1.0, np.nan, 0.0] * (n // 6 + 1))[:n]
    return pd.DataFrame(
        {
            "index": np.arange(n),
            "path": [f"val/img_{i:03d}.JPEG" for i in range(n)],
            "target": np.arange(n) % 4,
            "target_name": [f"class {i % 4}" for i in range(n)],
            "pred": (np.arange(n) + (np.arange(n) % 3 == 0)) % 4,
            "pred_name": [f"class {(i + (i % 3 == 0)) % 4}" for i in range(n)],
            "prob_clean": rng.random(n),
            "deletion_auc": deletion,
            "insertion_auc": np.linspace(0.8, 0.2, n),
            "pointing_hit": hit,
            "small_object": (np.arange(n) % 2).astype(float),
            "box_coverage": rng.random(n),
            "center_deletion_auc": rng.random(n),
        }
    )


def _picture(row: int, h: int = 24, w: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic image (coloured gradient + a disc), its darkened copy, an 7×7 saliency map."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    hue = (row * 0.17) % 1.0
    image = np.stack([x, y, np.full_like(x, hue)], axis=-1)
    disc = (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.06
    image[disc] = [1.0 - hue, hue, 0.5]
    sal = np.exp(-((np.mgrid[0:7, 0:7] - 3.0 - (row % 3 - 1)) ** 2).sum(0) / 4.0) * 5 - 2
    return image, image * 0.4, sal


def _thumbs(rows, h: int = 24, w: int = 32):
    for row in rows:
        yield (row, *_picture(row, h, w))


def _data(page: Path) -> dict:
    """The inline JSON of a written index.html (strict: NaN/Infinity would fail)."""
    match = DATA_RE.search(page.read_text(encoding="utf-8"))
    assert match, "no inline gallery-data script"

    def no_constants(name: str):
        raise AssertionError(f"non-JSON constant {name} in the inline data")

    return json.loads(match.group(1), parse_constant=no_constants)


def _cell(value):
    """A table value as the JSON should hold it."""
    return None if pd.isna(value) else value


# --------------------------------------------------------------------------------------
# Unit tests (no browser)
# --------------------------------------------------------------------------------------


def test_writes_index_and_three_thumbnails_per_row(tmp_path):
    page = write_gallery(tmp_path / "g", _table(), _thumbs([0, 3, 5]), title="run 1")
    assert page == tmp_path / "g" / "index.html" and page.is_file()
    written = sorted(p.name for p in (tmp_path / "g" / "thumbs").iterdir())
    assert written == sorted(f"{r}-{k}.jpg" for r in (0, 3, 5) for k in THUMB_KINDS)
    html = page.read_text(encoding="utf-8")
    assert "<title>run 1</title>" in html
    assert "fetch(" not in html and "http://" not in html and "https://" not in html
    assert "<link" not in html and "src=" not in html.split("<script", 1)[0]


def test_inline_json_matches_the_table(tmp_path):
    table = _table()
    order = [5, 1, 2, 4]
    data = _data(write_gallery(tmp_path, table, _thumbs(order)))
    assert [r["row"] for r in data["rows"]] == order
    assert data["table_rows"] == len(table)
    metrics = [m["name"] for m in data["metrics"]]
    assert metrics == default_metrics(table)
    assert {"deletion_auc", "insertion_auc", "pointing_hit", "center_deletion_auc"} <= set(metrics)
    assert not {"index", "target", "pred", "path"} & set(metrics)
    for record in data["rows"]:
        expected = table.loc[record["row"]]
        for field in ("path", "target", "target_name", "pred", "pred_name"):
            assert record[field] == expected[field]
        for metric in metrics:
            want, got = _cell(expected[metric]), record["values"][metric]
            assert got is None if want is None else got == pytest.approx(want)
        assert record["thumbs"] == {k: f"thumbs/{record['row']}-{k}.jpg" for k in THUMB_KINDS}
    better = {m["name"]: m["better"] for m in data["metrics"]}
    assert better["deletion_auc"] == "lower" and better["center_deletion_auc"] == "lower"
    assert better["insertion_auc"] == "higher" and better["prob_clean"] is None


def test_nan_becomes_null(tmp_path):
    table = _table()
    table.loc[3, "insertion_auc"] = np.inf
    data = _data(write_gallery(tmp_path, table, _thumbs([2, 3, 4])))
    values = {r["row"]: r["values"] for r in data["rows"]}
    assert values[2]["deletion_auc"] is None
    assert values[4]["pointing_hit"] is None
    assert values[3]["insertion_auc"] is None
    assert values[2]["pointing_hit"] == 0


def test_text_is_escaped(tmp_path):
    table = _table()
    table.loc[1, "path"] = NASTY_PATH
    table.loc[1, "target_name"] = "a & b <c>"
    page = write_gallery(tmp_path, table, _thumbs([1]), title='<b>"runs" & co</b>')
    html = page.read_text(encoding="utf-8")
    assert NASTY_PATH not in html and "<img src=x" not in html and "<b>" not in html
    assert html.count("</script>") == 2  # the data and the code, nothing injected
    assert "<title>&lt;b&gt;&quot;runs&quot; &amp; co&lt;/b&gt;</title>" in html
    record = _data(page)["rows"][0]
    assert record["path"] == NASTY_PATH and record["target_name"] == "a & b <c>"


def test_only_rows_with_thumbnails_appear(tmp_path):
    table = _table(50)
    data = _data(write_gallery(tmp_path, table, _thumbs([40, 7, 19])))
    assert [r["row"] for r in data["rows"]] == [40, 7, 19]
    assert data["table_rows"] == 50
    assert len(list((tmp_path / "thumbs").iterdir())) == 9


def test_row_index_need_not_be_a_range(tmp_path):
    table = _table().set_axis([10, 11, 12, 13, 14, 15])
    data = _data(write_gallery(tmp_path, table, _thumbs([14, 10])))
    assert [r["path"] for r in data["rows"]] == [table.loc[14, "path"], table.loc[10, "path"]]


def test_thumbnails_fit_thumb_size_and_are_not_enlarged(tmp_path):
    thumbs = [(0, *_picture(0, 300, 200)), (1, *_picture(1, 24, 32))]
    data = _data(write_gallery(tmp_path, _table(), thumbs, thumb_size=160))
    assert thumbnail_size(300, 200, 160) == (160, 107)
    expected = {0: (107, 160), 1: (32, 24)}  # PIL sizes are (width, height)
    for record in data["rows"]:
        assert record["size"] == list(expected[record["row"]][::-1])
        for kind in THUMB_KINDS:
            with Image.open(tmp_path / record["thumbs"][kind]) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == expected[record["row"]]


def test_saliency_is_normalised_per_map(tmp_path):
    image = np.random.default_rng(1).random((16, 20, 3))
    sal = np.random.default_rng(2).random((4, 5))
    overlay = saliency_overlay(image, sal)
    assert overlay.shape == (16, 20, 3) and overlay.min() >= 0.0 and overlay.max() <= 1.0
    np.testing.assert_allclose(saliency_overlay(image, sal * 1000.0 - 7.0), overlay, atol=1e-5)
    flat = saliency_overlay(image, np.full((4, 5), 3.0))
    colour = np.asarray(matplotlib.colormaps[CMAP](0.0)[:3])
    np.testing.assert_allclose(flat, (1 - ALPHA) * image + ALPHA * colour, atol=1e-6)
    with_nan = sal.copy()
    with_nan[0, 0] = np.nan
    assert np.isfinite(saliency_overlay(image, with_nan)).all()


def _filters(dest: Path, table: pd.DataFrame) -> list[str]:
    return [f["name"] for f in _data(write_gallery(dest, table, _thumbs([0])))["filters"]]


def test_filters_only_for_columns_that_exist(tmp_path):
    table = _table()
    assert _filters(tmp_path / "a", table) == ["all", "misses", "worst", "small"]
    table["loc_hit"] = [1.0, 0.0, 1.0, 0.0, np.nan, 1.0]
    assert _filters(tmp_path / "b", table[["path", "loc_hit"]]) == ["all", "loc"]


def test_metrics_argument_and_its_errors(tmp_path):
    table = _table()
    data = _data(write_gallery(tmp_path, table, _thumbs([0, 1]), metrics=["insertion_auc"]))
    assert [m["name"] for m in data["metrics"]] == ["insertion_auc"]
    # filter columns travel with the rows even when not shown
    assert set(data["rows"][0]["values"]) == {
        "insertion_auc",
        "pointing_hit",
        "deletion_auc",
        "small_object",
    }
    with pytest.raises(KeyError, match="nope"):
        write_gallery(tmp_path, table, _thumbs([0]), metrics=["nope"])
    with pytest.raises(KeyError, match="99"):
        write_gallery(tmp_path, table, _thumbs([99]))
    with pytest.raises(ValueError, match="twice"):
        write_gallery(tmp_path, table, _thumbs([1, 1]))


# --------------------------------------------------------------------------------------
# Headless Chromium: the page sorts, filters and reads its state from location.hash
# --------------------------------------------------------------------------------------


class _Rows(HTMLParser):
    """Collects data-row of every <tr class="item">, the count text and NaN cells."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []
        self.cells: dict[tuple[int, str], str] = {}
        self.count = ""
        self._where: tuple[int, str] | str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "item":
            self.rows.append(int(a["data-row"]))
        elif tag == "td" and "data-metric" in a:
            self._where = (self.rows[-1], a["data-metric"])
        elif a.get("id") == "count":
            self._where = "count"

    def handle_endtag(self, tag):
        self._where = None

    def handle_data(self, data):
        if self._where == "count":
            self.count += data
        elif self._where is not None:
            self.cells[self._where] = data


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=2000",
        ]
        done = subprocess.run(
            [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _render(page: Path, state: str) -> _Rows:
    parsed = _Rows()
    parsed.feed(_chromium("--dump-dom", f"{page.as_uri()}#{state}").stdout)
    return parsed


def _expected(table: pd.DataFrame, key: str, ascending: bool) -> list[int]:
    """Row order by pandas: stable, missing values last."""
    ordered = table.sort_values(key, ascending=ascending, na_position="last", kind="stable")
    return list(ordered.index)


@pytest.fixture(scope="module")
def browser_gallery(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    table = _table()
    table.loc[1, "path"] = NASTY_PATH
    dest = tmp_path_factory.mktemp("gallery")
    page = write_gallery(
        dest, table, _thumbs(table.index, 96, 128), title="browser <test>", thumb_size=96
    )
    return page, table


@pytest.mark.browser
def test_browser_sorts_by_the_hash(browser_gallery):
    page, table = browser_gallery
    shown = _render(page, "sort=deletion_auc&dir=desc&filter=all")
    assert shown.rows == _expected(table, "deletion_auc", ascending=False)
    assert shown.rows[-1] == 2  # NaN last
    assert shown.count.strip() == "showing 6 of 6"
    assert shown.cells[(2, "deletion_auc")] == "\u2013"
    assert shown.cells[(4, "pointing_hit")] == "\u2013"
    assert shown.cells[(3, "deletion_auc")] == "0.100"
    assert shown.cells[(0, "pointing_hit")] == "1"
    shown = _render(page, "sort=insertion_auc&dir=asc")
    assert shown.rows == _expected(table, "insertion_auc", ascending=True)


@pytest.mark.browser
def test_browser_filters(browser_gallery):
    page, table = browser_gallery
    misses = table[table["pointing_hit"] == 0]
    shown = _render(page, "sort=deletion_auc&dir=desc&filter=misses")
    assert shown.rows == _expected(misses, "deletion_auc", ascending=False) == [5, 1, 2]
    assert shown.count.strip() == "showing 3 of 6"
    worst = table.nlargest(3, "deletion_auc")
    shown = _render(page, "sort=insertion_auc&dir=asc&filter=worst&n=3")
    assert shown.rows == _expected(worst, "insertion_auc", ascending=True)
    small = table[table["small_object"] == 1]
    shown = _render(page, "sort=row&dir=desc&filter=small")
    assert shown.rows == sorted(small.index, reverse=True)


@pytest.mark.browser
def test_browser_escapes_text_and_screenshot_is_not_blank(browser_gallery, tmp_path):
    page, _ = browser_gallery
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;amp;" in dom
    assert "<img src=x" not in dom and "<b>x.JPEG" not in dom
    shot = tmp_path / "gallery.png"
    url = f"{page.as_uri()}#sort=deletion_auc&dir=desc&filter=all"
    _chromium(f"--screenshot={shot}", "--window-size=1200,900", url)
    with Image.open(shot) as im:
        assert im.size == (1200, 900)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot looks blank"
    if os.environ.get("GALLERY_SCREENSHOT"):
        shutil.copy(shot, os.environ["GALLERY_SCREENSHOT"])
