"""The HTML gallery: its data, the page's text and escaping, the files written; the page in
headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.reports.gallery import GalleryMap, default_metrics
from pipeline.reports.pictures import thumbnail_size, thumbnails
from pipeline.reports.schema import METHOD_ROW
from pipeline.reports.writer import write_gallery_page

CHROMIUM = Path("/usr/bin/chromium")
NASTY_PATH = "val/<img src=x onerror=alert(1)>&amp;\"q'</script><b>x.JPEG"
DATA_RE = re.compile(r'<script type="application/json" id="gallery-data">(.*?)</script>', re.S)
MAPS = (
    GalleryMap(METHOD_ROW, "meaningful perturbation"),
    GalleryMap("gradcam", "Grad-CAM"),
    GalleryMap("center", "centre baseline", optional=True),
)
KINDS = ("image", "perturbed", "map:method", "map:gradcam", "map:center")


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
            "gradcam_deletion_auc": np.linspace(0.6, 0.1, n),
            "gradcam_pointing_hit": np.array([0.0, 1.0] * n)[:n],
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


def _thumbs(rows, h: int = 24, w: int = 32, thumb_size: int = 160):
    for row in rows:
        image, perturbed, sal = _picture(row, h, w)
        maps = {m.name: sal * (k + 1) for k, m in enumerate(MAPS)}
        yield row, thumbnails(image, perturbed, maps, thumb_size)


def write_gallery(dest, table, pictures, **options) -> Path:
    return write_gallery_page(Path(dest), table, pictures, MAPS, **options)


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


def test_writes_index_and_a_thumbnail_per_picture(tmp_path):
    page = write_gallery(tmp_path / "g", _table(), _thumbs([0, 3, 5]), title="run 1")
    assert page == tmp_path / "g" / "index.html" and page.is_file()
    written = sorted(p.name for p in (tmp_path / "g" / "thumbs").iterdir())
    names = [f"{r}-{k.replace(':', '-')}.jpg" for r in (0, 3, 5) for k in KINDS]
    assert written == sorted(names)
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
        row = record["row"]
        assert record["thumbs"] == {k: f"thumbs/{row}-{k.replace(':', '-')}.jpg" for k in KINDS}
    assert [m["name"] for m in data["maps"]] == ["method", "gradcam", "center"]
    assert [m["optional"] for m in data["maps"]] == [False, False, True]


def test_directions_and_labels_come_from_the_schema_for_every_map(tmp_path):
    data = _data(write_gallery(tmp_path, _table(), _thumbs([0])))
    better = {m["name"]: m["better"] for m in data["metrics"]}
    # Grad-CAM's columns had no hint before the schema (issue 25)
    assert better["deletion_auc"] == better["center_deletion_auc"] == "lower"
    assert better["gradcam_deletion_auc"] == "lower"
    assert better["gradcam_pointing_hit"] == better["insertion_auc"] == "higher"
    assert better["prob_clean"] is None
    labels = {m["name"]: m["label"] for m in data["metrics"]}
    assert labels["gradcam_deletion_auc"] == "gradcam: deletion AUC"
    assert labels["deletion_auc"] == "deletion AUC"
    keys = [k["name"] for k in data["key_metrics"]]
    assert keys == ["deletion_auc", "insertion_auc", "pointing_hit", "loc_hit"]


def test_differences_are_the_method_minus_each_comparison(tmp_path):
    table = _table()
    data = _data(write_gallery(tmp_path, table, _thumbs([0, 1, 2])))
    names = [d["name"] for d in data["differences"]]
    # only where both columns exist: Grad-CAM's deletion and pointing, the centre's deletion
    expected = ["diff:gradcam:deletion_auc", "diff:gradcam:pointing_hit"]
    assert names == [*expected, "diff:center:deletion_auc"]
    label = data["differences"][0]["label"]
    assert label == "meaningful perturbation − Grad-CAM: deletion AUC"
    assert data["differences"][0]["better"] == "lower"
    for record in data["rows"]:
        row = table.loc[record["row"]]
        got = record["values"]["diff:gradcam:deletion_auc"]
        want = row["deletion_auc"] - row["gradcam_deletion_auc"]
        assert got is None if np.isnan(want) else got == pytest.approx(want)
        assert record["values"]["diff:gradcam:pointing_hit"] == pytest.approx(
            row["pointing_hit"] - row["gradcam_pointing_hit"]
        )


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
    assert len(list((tmp_path / "thumbs").iterdir())) == 3 * len(KINDS)


def test_row_index_need_not_be_a_range(tmp_path):
    table = _table().set_axis([10, 11, 12, 13, 14, 15])
    data = _data(write_gallery(tmp_path, table, _thumbs([14, 10])))
    assert [r["path"] for r in data["rows"]] == [table.loc[14, "path"], table.loc[10, "path"]]


def test_thumbnails_fit_thumb_size_and_are_not_enlarged(tmp_path):
    pictures = [*_thumbs([0], 300, 200), *_thumbs([1], 24, 32)]
    data = _data(write_gallery(tmp_path, _table(), pictures, thumb_size=160))
    assert thumbnail_size(300, 200, 160) == (160, 107)
    expected = {0: (107, 160), 1: (32, 24)}  # PIL sizes are (width, height)
    for record in data["rows"]:
        assert record["size"] == list(expected[record["row"]][::-1])
        for kind in KINDS:
            with Image.open(tmp_path / record["thumbs"][kind]) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == expected[record["row"]]


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
    # filter columns and the maps' key metrics travel with the rows even when not listed
    values = set(data["rows"][0]["values"])
    assert {"insertion_auc", "pointing_hit", "deletion_auc", "small_object"} <= values
    assert {"gradcam_deletion_auc", "gradcam_pointing_hit", "center_deletion_auc"} <= values
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
    """Collects data-row of every <article class="item">, the count text, the value cells
    (data-metric) and which map figures are hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []
        self.cells: dict[tuple[int, str], str] = {}
        self.hidden_maps: set[tuple[int, str]] = set()
        self.count = ""
        self._where: tuple[int, str] | str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and a.get("class") == "item":
            self.rows.append(int(a["data-row"]))
        elif "data-metric" in a:
            self._where = (self.rows[-1], a["data-metric"])
        elif a.get("id") == "count":
            self._where = "count"
        elif tag == "figure" and "data-map" in a and "hidden" in a:
            self.hidden_maps.add((self.rows[-1], a["data-map"]))

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
    pictures = _thumbs(table.index, 96, 128, thumb_size=96)
    page = write_gallery(dest, table, pictures, title="browser <test>", thumb_size=96)
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
    assert shown.cells[(1, "gradcam_deletion_auc")] == f"{table.loc[1, 'gradcam_deletion_auc']:.3f}"


@pytest.mark.browser
def test_browser_sorts_by_a_difference_and_shows_chosen_columns(browser_gallery):
    page, table = browser_gallery
    table = table.assign(diff=table["deletion_auc"] - table["gradcam_deletion_auc"])
    shown = _render(page, "sort=diff:gradcam:deletion_auc&dir=asc&cols=box_coverage")
    assert shown.rows == _expected(table, "diff", ascending=True)
    assert shown.cells[(0, "box_coverage")] == f"{table.loc[0, 'box_coverage']:.3f}"
    # the baselines' thumbnails are hidden until asked for
    assert (0, "center") in shown.hidden_maps and (0, "gradcam") not in shown.hidden_maps
    shown = _render(page, "sort=row&dir=asc&baselines=1")
    assert not shown.hidden_maps


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
