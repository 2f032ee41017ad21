"""Dataset layouts, labels, boxes, decoding of awkward files, the Dataset and sharding.

Every test builds its own tiny images in tmp_path; none needs the shared ImageNet sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import (
    IMAGE_EXTENSIONS,
    Box,
    DatasetError,
    Sample,
    discover,
    imagenet_class_names,
    imagenet_wnids,
    parse_voc_xml,
    pointing_boxes,
    read_synset_mapping,
)

TENCH, GOLDFISH, TOILET_TISSUE = "n01440764", "n01443537", "n15075141"  # classes 0, 1, 999


def make_image(path: Path, size=(8, 6), color=(200, 30, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def write_csv(path: Path, rows: dict[str, str]) -> Path:
    lines = ["ImageId,PredictionString"] + [f"{k},{v}" for k, v in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_xml(
    path: Path, width: int, height: int, objects: list[tuple], database: str | None = None
) -> Path:
    """Objects are (wnid, xmin, ymin, xmax, ymax) or (..., difficult) with difficult "0"/"1"."""
    objs = "".join(
        f"<object><name>{w}</name>"
        + (f"<difficult>{rest[0]}</difficult>" if rest else "")
        + f"<bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox>"
        "</object>"
        for w, a, b, c, d, *rest in objects
    )
    source = f"<source><database>{database}</database></source>" if database else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{path.stem}</filename>{source}<size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>"
    )
    return path


# ----------------------------------------------------------------------------- class lists


def test_imagenet_wnids_and_names_come_from_timm() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids[0] == TENCH and wnids[1] == GOLDFISH and wnids[999] == TOILET_TISSUE
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    wnids.append("x")  # callers get a copy
    assert len(imagenet_wnids()) == 1000


def test_read_synset_mapping(tmp_path: Path) -> None:
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text(f"{TENCH} tench, Tinca tinca\n{GOLDFISH} goldfish, Carassius auratus\n\n")
    assert read_synset_mapping(path) == (
        [TENCH, GOLDFISH],
        ["tench, Tinca tinca", "goldfish, Carassius auratus"],
    )
    path.write_text("tench n01440764\n")
    with pytest.raises(DatasetError, match="LOC_synset_mapping.txt: line 1"):
        read_synset_mapping(path)


# ----------------------------------------------------------------------------- class folders


def test_class_folders_use_global_imagenet_indices(tmp_path: Path) -> None:
    # Only two classes present: the labels must be 0 and 999, not 0 and 1.
    make_image(tmp_path / TOILET_TISSUE / "b.JPEG")
    make_image(tmp_path / TENCH / "a.JPEG")
    make_image(tmp_path / TENCH / "sub" / "c.png")
    (tmp_path / TENCH / "notes.txt").write_text("not an image")
    samples, layout = discover(tmp_path)
    assert layout == "class_folders"
    assert [(s.path, s.label) for s in samples] == [
        (f"{TENCH}/a.JPEG", 0),
        (f"{TENCH}/sub/c.png", 0),
        (f"{TOILET_TISSUE}/b.JPEG", 999),
    ]
    assert all(s.boxes == () and s.width is None for s in samples)


@pytest.mark.parametrize("folder", ["n99999999", "cats"])
def test_class_folders_reject_unknown_folder(tmp_path: Path, folder: str) -> None:
    make_image(tmp_path / TENCH / "a.JPEG")
    make_image(tmp_path / folder / "b.JPEG")
    with pytest.raises(DatasetError, match=folder):
        discover(tmp_path)


def test_class_folders_reject_loose_image_in_root(tmp_path: Path) -> None:
    make_image(tmp_path / TENCH / "a.JPEG")
    make_image(tmp_path / "loose.JPEG")
    with pytest.raises(DatasetError, match="loose.JPEG"):
        discover(tmp_path)


# ----------------------------------------------------------------------------- LOC csv


def test_loc_csv_in_root(tmp_path: Path) -> None:
    for name in ("ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002", "extra"):
        make_image(tmp_path / f"{name}.JPEG")
    write_csv(
        tmp_path / "LOC_val_solution.csv",
        {
            "ILSVRC2012_val_00000002": f"{TOILET_TISSUE} 1 2 5 6 {TOILET_TISSUE} 0 0 3.5 4",
            "ILSVRC2012_val_00000001": f"{GOLDFISH} 0 1 7 5 ",
        },
    )
    samples, layout = discover(tmp_path)
    assert layout == "loc_csv"
    by_path = {s.path: s for s in samples}
    assert [s.path for s in samples] == sorted(by_path)
    first = by_path["ILSVRC2012_val_00000001.JPEG"]
    assert first.label == 1 and first.boxes == (Box(1, 0.0, 1.0, 7.0, 5.0),)
    second = by_path["ILSVRC2012_val_00000002.JPEG"]
    assert second.label == 999
    assert second.boxes == (Box(999, 1, 2, 5, 6), Box(999, 0, 0, 3.5, 4))
    assert by_path["extra.JPEG"].label == -1 and by_path["extra.JPEG"].boxes == ()


def test_loc_csv_with_val_subfolder_and_next_to_root(tmp_path: Path) -> None:
    make_image(tmp_path / "val" / "img1.JPEG")
    make_image(tmp_path / "val" / "img2.JPEG")
    write_csv(tmp_path / "LOC_val_solution.csv", {"img1": f"{TENCH} 0 0 2 2", "img2": ""})
    samples, layout = discover(tmp_path)  # csv in root, images in root/val
    assert layout == "loc_csv"
    assert [(s.path, s.label) for s in samples] == [("val/img1.JPEG", 0), ("val/img2.JPEG", -1)]
    samples, layout = discover(tmp_path / "val")  # csv next to DATA
    assert layout == "loc_csv"
    assert [(s.path, s.label) for s in samples] == [("img1.JPEG", 0), ("img2.JPEG", -1)]


def test_loc_csv_given_by_option(tmp_path: Path) -> None:
    data = tmp_path / "deep" / "data"
    make_image(data / "img1.jpg")
    csv_path = write_csv(tmp_path / "labels.csv", {"img1": f"{GOLDFISH} 0 0 2 2"})
    samples, layout = discover(data, labels_csv=csv_path)
    assert layout == "loc_csv" and samples[0].label == 1
    with pytest.raises(DatasetError, match="missing.csv"):
        discover(data, labels_csv=tmp_path / "missing.csv")


def test_loc_csv_adds_boxes_to_class_folders(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / GOLDFISH / "img1.JPEG")
    csv_path = write_csv(tmp_path / "LOC_val_solution.csv", {"img1": f"{GOLDFISH} 0 0 2 2"})
    assert discover(tmp_path / "data")[0][0].boxes == ()  # not picked up automatically
    samples, layout = discover(tmp_path / "data", labels_csv=csv_path)
    assert layout == "class_folders" and samples[0].boxes == (Box(1, 0, 0, 2, 2),)
    write_csv(csv_path, {"img1": f"{TENCH} 0 0 2 2"})
    with pytest.raises(DatasetError, match="disagrees"):
        discover(tmp_path / "data", labels_csv=csv_path)


def test_loc_csv_unknown_wnid_names_file_and_wnid(tmp_path: Path) -> None:
    make_image(tmp_path / "img1.JPEG")
    write_csv(tmp_path / "LOC_val_solution.csv", {"img1": "n00000042 0 0 2 2"})
    with pytest.raises(DatasetError, match=r"LOC_val_solution\.csv.*n00000042"):
        discover(tmp_path)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_loc_csv_subset_folder_with_full_csv(tmp_path: Path, caplog) -> None:
    # A few images of ImageNet val with the official csv: rows without an image are ignored,
    # with one line on stderr that counts them.
    present = {3: TENCH, 17: GOLDFISH}
    for k in present:
        make_image(tmp_path / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
    rows = {
        f"ILSVRC2012_val_{k:08d}": f"{present.get(k, TOILET_TISSUE)} 0 1 5 4"
        for k in range(1, 2001)
    }
    write_csv(tmp_path / "LOC_val_solution.csv", rows)
    samples, layout = discover(tmp_path)
    assert layout == "loc_csv"
    assert [(s.path, s.label, s.boxes) for s in samples] == [
        ("val/ILSVRC2012_val_00000003.JPEG", 0, (Box(0, 0, 1, 5, 4),)),
        ("val/ILSVRC2012_val_00000017.JPEG", 1, (Box(1, 0, 1, 5, 4),)),
    ]
    (warning,) = _warnings(caplog)
    assert "LOC_val_solution.csv: 1,998 rows have no image under" in warning
    assert warning.endswith("; ignored")


def test_loc_csv_image_without_row_is_unlabelled(tmp_path: Path, caplog) -> None:
    make_image(tmp_path / "img1.JPEG")
    make_image(tmp_path / "no_row.JPEG")
    write_csv(tmp_path / "LOC_val_solution.csv", {"img1": f"{GOLDFISH} 0 0 2 2"})
    samples, layout = discover(tmp_path)
    assert layout == "loc_csv"
    by_path = {s.path: s for s in samples}
    assert by_path["img1.JPEG"].label == 1
    unlabelled = by_path["no_row.JPEG"]
    assert (unlabelled.label, unlabelled.boxes) == (-1, ())  # -1: target = top-1 prediction
    assert _warnings(caplog) == []  # every row has its image: nothing to report


def test_loc_csv_without_any_matching_image(tmp_path: Path, caplog) -> None:
    make_image(tmp_path / "photo.png")
    write_csv(tmp_path / "LOC_val_solution.csv", {"a": f"{TENCH} 0 0 2 2", "b": ""})
    samples, _ = discover(tmp_path)
    assert [(s.path, s.label) for s in samples] == [("photo.png", -1)]
    csv_path = tmp_path / "LOC_val_solution.csv"
    assert _warnings(caplog) == [
        f"{csv_path}: none of its 2 rows has an image under {tmp_path}; ignored"
    ]


def test_loc_csv_malformed_row_is_refused_even_without_its_image(tmp_path: Path) -> None:
    make_image(tmp_path / "img1.JPEG")
    write_csv(
        tmp_path / "LOC_val_solution.csv",
        {"img1": f"{TENCH} 0 0 2 2", "ILSVRC2012_val_00049999": f"{TENCH} 0 0 two 2"},
    )
    with pytest.raises(DatasetError, match=r"LOC_val_solution\.csv line 3: bad box") as info:
        discover(tmp_path)
    assert "\n" not in str(info.value)
    write_csv(tmp_path / "LOC_val_solution.csv", {"img1": f"{TENCH} 0 0 2 2", "gone": "n1 0 0"})
    with pytest.raises(DatasetError, match=r"line 3: box list has 3 fields"):
        discover(tmp_path)


def test_loc_csv_malformed_box_list(tmp_path: Path) -> None:
    make_image(tmp_path / "img1.JPEG")
    write_csv(tmp_path / "LOC_val_solution.csv", {"img1": f"{TENCH} 0 0 2"})
    with pytest.raises(DatasetError, match="line 2"):
        discover(tmp_path)


def test_synset_mapping_order_is_checked(tmp_path: Path) -> None:
    make_image(tmp_path / "img1.JPEG")
    write_csv(tmp_path / "LOC_val_solution.csv", {"img1": f"{TENCH} 0 0 2 2"})
    wnids = imagenet_wnids()
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{w} name {i}\n" for i, w in enumerate(wnids)))
    assert discover(tmp_path)[0][0].label == 0
    wnids[0], wnids[1] = wnids[1], wnids[0]
    mapping.write_text("".join(f"{w} name\n" for w in wnids))
    with pytest.raises(DatasetError, match="LOC_synset_mapping.txt"):
        discover(tmp_path)
    given = mapping.rename(tmp_path.parent / f"{tmp_path.name}_mapping.txt")
    assert discover(tmp_path)[0][0].label == 0  # nothing found automatically now
    with pytest.raises(DatasetError, match=given.name):
        discover(tmp_path, synset_mapping=given)


# ----------------------------------------------------------------------------- XML boxes


def test_xml_boxes(tmp_path: Path) -> None:
    data, xmls = tmp_path / "data", tmp_path / "Annotations" / "CLS-LOC" / "val"
    make_image(data / "ILSVRC2012_val_00000001.JPEG")
    make_image(data / "ILSVRC2012_val_00000002.JPEG")
    write_xml(
        xmls / "ILSVRC2012_val_00000001.xml",
        500,
        375,
        [(GOLDFISH, 10, 20, 110, 220), (GOLDFISH, 0, 0, 499, 374)],
    )
    write_xml(xmls / "ILSVRC2012_val_99999999.xml", 5, 5, [])  # no image: ignored
    samples, layout = discover(data, boxes_dir=tmp_path / "Annotations")
    assert layout == "voc_xml"
    first, second = samples
    assert (first.label, first.width, first.height) == (1, 500, 375)
    assert first.boxes == (Box(1, 10, 20, 110, 220), Box(1, 0, 0, 499, 374))
    assert (second.label, second.boxes, second.width) == (-1, (), None)


def test_xml_boxes_with_class_folders(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / TENCH / "a.JPEG")
    write_xml(tmp_path / "xml" / TENCH / "a.xml", 8, 6, [(TENCH, 1, 1, 4, 4)])
    samples, layout = discover(tmp_path / "data", boxes_dir=tmp_path / "xml")
    assert layout == "class_folders+voc_xml"
    assert samples[0].label == 0 and samples[0].boxes == (Box(0, 1, 1, 4, 4),)
    write_xml(tmp_path / "xml" / TENCH / "a.xml", 8, 6, [(GOLDFISH, 1, 1, 4, 4)])
    with pytest.raises(DatasetError, match="disagrees"):
        discover(tmp_path / "data", boxes_dir=tmp_path / "xml")


def test_xml_voc_boxes_are_1_based_and_converted(tmp_path: Path) -> None:
    # PASCAL VOC: xmin=1 is the first pixel (TorchRay subtracts 1); ILSVRC: already 0-based.
    make_image(tmp_path / "data" / "voc.jpg")
    make_image(tmp_path / "data" / "ilsvrc.JPEG")
    xmls = tmp_path / "xml"
    write_xml(xmls / "voc.xml", 8, 6, [(TENCH, 1, 1, 8, 6)], database="The VOC2007 Database")
    write_xml(xmls / "ilsvrc.xml", 8, 6, [(TENCH, 0, 0, 7, 5)], database="ILSVRC_2012")
    samples, _ = discover(tmp_path / "data", boxes_dir=xmls)
    whole_image = (Box(0, 0, 0, 7, 5),)  # 0-based inclusive: every pixel of an 8×6 image
    assert {s.path: s.boxes for s in samples} == {
        "ilsvrc.JPEG": whole_image,
        "voc.jpg": whole_image,
    }
    # The converted box holds exactly TorchRay's mask pixels: mask[ymin-1:ymax, xmin-1:xmax].
    write_xml(xmls / "voc.xml", 8, 6, [(TENCH, 3, 2, 5, 4)], database="The VOC2012 Database")
    boxes, _, _ = parse_voc_xml(xmls / "voc.xml")
    torchray = np.zeros((6, 8), dtype=bool)
    torchray[2 - 1 : 4, 3 - 1 : 5] = True  # voc_as_mask: mask[ymin:ymax + 1, xmin:xmax + 1]
    box = boxes[0]
    y, x = np.mgrid[0:6, 0:8]
    inside = (box.xmin <= x) & (x <= box.xmax) & (box.ymin <= y) & (y <= box.ymax)
    assert boxes == (Box(0, 2, 1, 4, 3),) and np.array_equal(inside, torchray)


def test_xml_voc_box_at_pixel_0_is_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / "img.jpg")
    write_xml(tmp_path / "xml" / "img.xml", 8, 6, [(TENCH, 0, 1, 4, 4)], database="PASCAL VOC")
    with pytest.raises(DatasetError, match=r"img\.xml: .*1-based") as info:
        discover(tmp_path / "data", boxes_dir=tmp_path / "xml")
    assert "\n" not in str(info.value)


def test_xml_difficult_objects_follow_torchray(tmp_path: Path) -> None:
    # TorchRay's pointing game skips a class whose boxes are all difficult and otherwise
    # scores against all boxes of the class, difficult ones included.
    make_image(tmp_path / "data" / "mixed.jpg")
    make_image(tmp_path / "data" / "only_difficult.jpg")
    xmls, voc = tmp_path / "xml", "The VOC2007 Database"
    objects = [
        (TENCH, 1, 1, 4, 4, "0"),
        (TENCH, 5, 5, 8, 6, "1"),  # kept: the class also has an easy box
        (GOLDFISH, 2, 2, 3, 3, "1"),  # dropped: all goldfish boxes are difficult
    ]
    write_xml(xmls / "mixed.xml", 8, 6, objects, database=voc)
    write_xml(xmls / "only_difficult.xml", 8, 6, [(GOLDFISH, 2, 2, 3, 3, "1")], database=voc)
    samples, _ = discover(tmp_path / "data", boxes_dir=xmls)
    mixed, only = samples
    assert mixed.label == 0
    assert mixed.boxes == (Box(0, 0, 0, 3, 3), Box(0, 4, 4, 7, 5, difficult=True))
    assert (only.label, only.boxes) == (1, ())  # labelled, but no box: pointing is skipped
    boxes, _, _ = parse_voc_xml(xmls / "mixed.xml")  # the parser itself keeps every object
    assert [b.difficult for b in boxes] == [False, True, True]
    assert pointing_boxes(boxes) == boxes[:2] and pointing_boxes(()) == ()


def test_xml_bad_difficult_flag_names_the_file(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / "img.jpg")
    write_xml(tmp_path / "xml" / "img.xml", 8, 6, [(TENCH, 1, 1, 4, 4, "yes")])
    with pytest.raises(DatasetError, match=r"img\.xml: malformed annotation \(bad <difficult>"):
        discover(tmp_path / "data", boxes_dir=tmp_path / "xml")


@pytest.mark.parametrize(
    "text",
    [
        "<annotation><size><width>5</width>",  # not well-formed
        "<annotation><size><width>x</width><height>5</height></size></annotation>",
        "<annotation><size><width>5</width><height>5</height></size>"
        "<object><name>n01440764</name><bndbox><xmin>1</xmin></bndbox></object></annotation>",
        "<annotation><size><width>5</width><height>5</height></size>"
        "<object><name>cat</name></object></annotation>",
    ],
)
def test_malformed_xml_names_the_file(tmp_path: Path, text: str) -> None:
    make_image(tmp_path / "data" / "img.JPEG")
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "img.xml").write_text(text)
    with pytest.raises(DatasetError, match=r"img\.xml"):
        discover(tmp_path / "data", boxes_dir=tmp_path / "xml")


# ----------------------------------------------------------------------------- other layouts


def test_ground_truth_txt_is_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "ILSVRC2012_val_00000001.JPEG")
    txt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    txt.write_text("490\n")
    with pytest.raises(DatasetError, match="devkit") as info:
        discover(tmp_path, ground_truth_txt=txt)
    assert "LOC_val_solution.csv" in str(info.value) and "\n" not in str(info.value)


def test_unlabelled_folder_is_recursive_and_case_insensitive(tmp_path: Path) -> None:
    make_image(tmp_path / "b" / "deep" / "x.PNG")
    make_image(tmp_path / "a.JpG")
    make_image(tmp_path / "c.bmp")
    (tmp_path / "broken.webp").write_bytes(b"")  # broken files are still discovered
    (tmp_path / "readme.txt").write_text("hi")
    make_image(tmp_path / ".hidden" / "y.jpg")
    make_image(tmp_path / "._z.jpg")
    samples, layout = discover(tmp_path)
    assert layout == "unlabelled"
    assert [s.path for s in samples] == ["a.JpG", "b/deep/x.PNG", "broken.webp", "c.bmp"]
    assert all(s.label == -1 and s.boxes == () for s in samples)
    assert {".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".webp"} == set(IMAGE_EXTENSIONS)


def test_empty_and_missing_roots(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"no images found in {tmp_path}"):
        discover(tmp_path)
    with pytest.raises(DatasetError, match="no such directory"):
        discover(tmp_path / "absent")
    with pytest.raises(DatasetError, match="not a directory"):
        discover(tmp_path / "notes.txt")


def test_sample_defaults() -> None:
    sample = Sample(path="a.JPEG", label=-1, boxes=())
    assert sample.width is None and sample.height is None
