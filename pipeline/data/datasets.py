"""Dataset layouts, ImageNet labels and boxes.

`discover` turns a folder into a sorted list of `Sample` records (relative path, class index,
boxes in original-image pixels): class folders, the LOC csv of ImageNet's validation set,
box XMLs (ILSVRC / PASCAL VOC), or unlabelled. Decoding the images is pipeline.data.images'.

Class indices are always the torchvision/timm ones: the position of a wnid in the sorted list
of the 1000 ImageNet-1k wnids.

Longer than 300 lines: each layout's parser refuses what would make a label or a box wrong,
with a one-line reason naming the file; those checks are most of the module.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import pkgutil
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py

from ..errors import MpbatchError, one_line

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")


LOC_CSV_NAME = "LOC_val_solution.csv"
SYNSET_MAPPING_NAME = "LOC_synset_mapping.txt"

_WNID_RE = re.compile(r"^n\d{8}$")
_TIMM_INFO = ("data", "_info")


class DatasetError(MpbatchError):
    """A one-line, user-facing error naming the file and the reason."""


@dataclass(frozen=True)
class Box:
    """A bounding box in pixels of the original image, with its class index (0..999).

    Coordinates are mpbatch's internal convention, the one `pointing.pointing_hits` expects:
    0-based pixel indices, inclusive on both ends (pixel column x is inside when
    xmin <= x <= xmax). Sources in another convention are converted when read (see
    `parse_voc_xml`). `difficult` is PASCAL VOC's <difficult> flag (False elsewhere).
    """

    class_index: int
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False


@dataclass
class Sample:
    """One image: path relative to the data root (POSIX), class index (-1 if unknown), boxes.

    A file name that is not valid UTF-8 cannot be stored (HDF5 strings are UTF-8): its path
    is the name with each undecodable byte written as \\xNN, and `unusable` says why, so
    the image becomes one row of the failures and the run goes on."""

    path: str
    label: int
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    width: int | None = None
    height: int | None = None
    # why the image cannot be used, known before decoding (a name that is not UTF-8)
    unusable: str = ""


# --------------------------------------------------------------------------- ImageNet classes


def _read_timm_info(name: str) -> str:
    """Text of a file bundled in timm's `data/_info` folder, read without importing timm."""
    spec = importlib.util.find_spec("timm")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location, *_TIMM_INFO, name)
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8")
    try:  # zipped or otherwise unusual installs
        data = pkgutil.get_data("timm.data", f"_info/{name}")
    except (ImportError, OSError):
        data = None
    if data is None:
        raise RuntimeError(
            f"timm's bundled ImageNet class list ({name}) was not found; install timm >= 0.9"
        )
    return data.decode("utf-8")


@lru_cache(maxsize=1)
def _wnids() -> tuple[str, ...]:
    wnids = tuple(line.strip() for line in _read_timm_info("imagenet_synsets.txt").splitlines())
    wnids = tuple(w for w in wnids if w)
    if len(wnids) != 1000 or list(wnids) != sorted(wnids) or len(set(wnids)) != 1000:
        raise RuntimeError("timm's imagenet_synsets.txt is not the sorted list of 1000 wnids")
    return wnids


@lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(_wnids())}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids, sorted; position k is class index k of torchvision/timm."""
    return list(_wnids())


def imagenet_class_names() -> list[str]:
    """1000 human-readable class names (first WordNet lemma, e.g. 'tench'), in class order."""
    lemmas: dict[str, str] = {}
    for line in _read_timm_info("imagenet_synset_to_lemma.txt").splitlines():
        wnid, _, text = line.partition("\t")
        lemmas[wnid] = text
    return [lemmas.get(w, w).split(",")[0].strip() for w in _wnids()]


def read_synset_mapping(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Parse LOC_synset_mapping.txt ("wnid name, name2, ..." per line).

    Returns (wnids, names) in file order; each name is the whole text after the wnid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read synset mapping ({one_line(exc)})") from None
    wnids: list[str] = []
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not _WNID_RE.match(wnid):
            raise DatasetError(f"{path}: line {number} does not start with a wnid: {line[:60]!r}")
        wnids.append(wnid)
        names.append(name.strip())
    return wnids, names


# --------------------------------------------------------------------------- discovery


def discover(
    root: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    synset_mapping: str | os.PathLike | None = None,
    boxes_dir: str | os.PathLike | None = None,
    ground_truth_txt: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
) -> tuple[list[Sample], str]:
    """Find every image under `root` and its label/boxes; never under `exclude` (the run's
    output folder) or under any folder that holds an mpbatch mask file.

    Returns (samples sorted by path, layout name). Layout names: "class_folders" (root/<wnid>/),
    "loc_csv" (labels from LOC_val_solution.csv), "voc_xml" (labels from box XMLs only) or
    "unlabelled"; "+voc_xml" is appended when XML boxes were added to the first two.
    The csv may cover more images than `root` holds (a subset of ImageNet val with the
    official 50,000-row file): extra rows are ignored with one line on stderr, and images
    without a row are unlabelled (label -1: the target is the top-1 prediction). Boxes are
    0-based inclusive pixel indices whatever the source (VOC XMLs are 1-based and shifted);
    all-difficult classes of an XML lose their boxes, as in TorchRay (`pointing_boxes`).
    Raises DatasetError for anything that would make labels or boxes wrong.
    """
    root = Path(root)
    _check_root(root, ground_truth_txt)
    found = _find_images(root, exclude)
    if not found:
        raise DatasetError(f"no images found in {root}")
    samples = [
        Sample(path=_escaped(p), label=-1, boxes=(), unusable=_name_problem(p)) for p in found
    ]

    class_folders = [
        d.name for d in _list_dir(root) if d.is_dir() and _WNID_RE.match(d.name) is not None
    ]
    if class_folders:
        layout = "class_folders"
        _label_from_folders(root, samples)
    else:
        layout = "unlabelled"

    csv_path = _resolve_option(labels_csv, "labels_csv")
    if csv_path is None and layout != "class_folders":
        csv_path = _find_near(LOC_CSV_NAME, root)
    _check_synset_mapping(synset_mapping, csv_path, root)
    if csv_path is not None:
        _apply_loc_csv(root, csv_path, samples)
        if layout == "unlabelled":
            layout = "loc_csv"

    xml_dir = _resolve_option(boxes_dir, "boxes_dir", want_dir=True)
    if xml_dir is not None:
        _apply_xml_boxes(xml_dir, samples)
        layout = "voc_xml" if layout == "unlabelled" else f"{layout}+voc_xml"
    return samples, layout


def _check_root(root: Path, ground_truth_txt) -> None:
    """Refuse a folder that is not one, and the devkit's ground-truth file (wrong indices)."""
    if ground_truth_txt is not None:
        raise DatasetError(
            f"{ground_truth_txt}: ILSVRC2012_validation_ground_truth.txt holds 1-based devkit "
            "class IDs in meta.mat order, which are not the torchvision/timm class indices, and "
            "mpbatch does not map them; use LOC_val_solution.csv (labels_csv) or class folders "
            "(root/<wnid>/*.JPEG) instead"
        )
    if not root.exists():
        raise DatasetError(f"{root}: no such directory")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")


def _check_synset_mapping(given, csv_path: Path | None, root: Path) -> None:
    """A synset mapping (given, or found beside the csv) must list the wnids in the sorted
    order of the torchvision/timm class indices."""
    mapping_path = _resolve_option(given, "synset_mapping")
    if mapping_path is None and csv_path is not None:
        mapping_path = _find_near(SYNSET_MAPPING_NAME, csv_path.parent, root)
    if mapping_path is None:
        return
    wnids, _ = read_synset_mapping(mapping_path)
    if wnids != imagenet_wnids():
        raise DatasetError(
            f"{mapping_path}: wnid order differs from the sorted 1000 ImageNet wnids "
            "(torchvision/timm class indices); labels would be wrong"
        )


def _list_dir(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


# the files of an mpbatch run folder (pipeline.store.reader): masks.h5, its shards, scores.h5
_RUN_FILE_RE = re.compile(r"^(masks(-\d+-of-\d+)?|scores)\.h5$")


def _holds_run(dirpath: str, filenames: list[str]) -> bool:
    """Whether a folder is an mpbatch output folder: it holds an mpbatch mask file."""
    for name in filenames:
        if _RUN_FILE_RE.match(name):
            try:
                with h5py.File(os.path.join(dirpath, name), "r", locking=False) as file:
                    if str(file.attrs.get("format", "")).startswith("mpbatch"):
                        return True
            except OSError:
                continue
    return False


def _name_problem(path: str) -> str:
    """Why an image cannot be used because of its name alone ("" when it can)."""
    return "" if _utf8(path) else _NOT_UTF8


_NOT_UTF8 = "the file name is not valid UTF-8 (shown with \\xNN escapes): rename the file"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_images(root: Path, exclude: str | os.PathLike | None = None) -> list[str]:
    """Relative POSIX paths of image files under root (recursive, following directory
    symlinks once, skipping hidden entries, `exclude` and mpbatch output folders), sorted
    by their text. Broken files and dangling links count. A name that is not UTF-8 keeps
    os.walk's surrogate escapes (`_escaped` makes it storable)."""
    found: list[str] = []
    seen_dirs: set[str] = set()
    if exclude is not None:
        seen_dirs.add(os.path.realpath(exclude))  # as if walked already: never entered

    def unreadable(exc: OSError) -> None:
        raise DatasetError(f"{_escaped(exc.filename)}: cannot list folder ({exc.strerror or exc})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop, the same folder linked twice, or `exclude`
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        if real != os.path.realpath(root) and _holds_run(dirpath, filenames):
            log.warning("%s: skipped, it holds an mpbatch run's output", _escaped(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            found.append(Path(rel).as_posix())
    return sorted(found, key=_escaped)


def _escaped(name) -> str:
    """A file name as text: undecodable bytes (os.walk's surrogate escapes) as \\xNN."""
    name = os.fspath(name)
    if _utf8(name):
        return name
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _label_from_folders(root: Path, samples: list[Sample]) -> None:
    index = _wnid_index()
    for sample in samples:
        top, sep, _ = sample.path.partition("/")
        if not sep:
            raise DatasetError(
                f"{root / sample.path}: image directly in the root of a class-folder dataset "
                "(expected root/<wnid>/<image>)"
            )
        if top not in index:
            raise DatasetError(
                f"{root / top}: folder name is not one of the 1000 ImageNet wnids "
                "(class folders must be named like n01440764)"
            )
        sample.label = index[top]


def _resolve_option(value, option: str, want_dir: bool = False) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    ok = path.is_dir() if want_dir else path.is_file()
    if not ok:
        kind = "directory" if want_dir else "file"
        raise DatasetError(f"{path}: {option} is not an existing {kind}")
    return path


def _find_near(name: str, *folders: Path) -> Path | None:
    """First file `name` in the given folders, then in their parents (next to DATA)."""
    candidates = [*folders, *(f.resolve().parent for f in folders)]
    for folder in candidates:
        path = folder / name
        if path.is_file():
            return path
    return None


def _parse_boxes(tokens: list[str], where: str) -> tuple[Box, ...]:
    if len(tokens) % 5:
        raise DatasetError(f"{where}: box list has {len(tokens)} fields, not a multiple of 5")
    index = _wnid_index()
    boxes = []
    for k in range(0, len(tokens), 5):
        wnid = tokens[k]
        if wnid not in index:
            raise DatasetError(f"{where}: unknown wnid {wnid!r} (not an ImageNet-1k class)")
        boxes.append(_make_box(index[wnid], tokens[k + 1 : k + 5], where))
    return tuple(boxes)


def _make_box(
    class_index: int,
    coords: Sequence[str | None],
    where: str,
    origin: int = 0,
    difficult: bool = False,
) -> Box:
    """A Box from four coordinate strings whose first pixel is `origin` (0 or 1), converted
    to mpbatch's 0-based convention."""
    try:
        xmin, ymin, xmax, ymax = (float(c) for c in coords)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: bad box coordinates {list(coords)}") from None
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)) or xmax < xmin or ymax < ymin:
        raise DatasetError(f"{where}: bad box coordinates {[xmin, ymin, xmax, ymax]}")
    if min(xmin, ymin) < origin:
        raise DatasetError(
            f"{where}: box {[xmin, ymin, xmax, ymax]} starts before pixel {origin}, the first "
            f"pixel of this file's {origin}-based coordinates"
        )
    return Box(class_index, xmin - origin, ymin - origin, xmax - origin, ymax - origin, difficult)


def _by_stem(samples: list[Sample]) -> dict[str, list[Sample]]:
    table: dict[str, list[Sample]] = {}
    for sample in samples:
        name = sample.path.rsplit("/", 1)[-1]
        table.setdefault(name.rsplit(".", 1)[0], []).append(sample)
        table.setdefault(name, []).append(sample)
    return table


def _apply_loc_csv(root: Path, csv_path: Path, samples: list[Sample]) -> None:
    """Labels and boxes from a Kaggle LOC_val_solution.csv, matched by image file stem.

    The csv may describe more images than the folder holds (the official file has 50,000
    rows; DATA may be a subset): rows without an image are checked like the others, then
    ignored, and one line on stderr says how many. Images without a row keep what they had
    (label -1, i.e. unlabelled, unless a class folder gave one). Boxes are used as written:
    0-based pixel indices, mpbatch's convention (see `parse_voc_xml` for the evidence).
    """
    table = _by_stem(samples)
    rows = missing = 0
    for where, image_id, boxes in _read_loc_csv(csv_path):
        rows += 1
        matches = table.get(image_id, [])
        if not matches:
            missing += 1
            continue
        if len(matches) > 1:
            raise DatasetError(
                f"{where}: image {image_id!r} matches several files: "
                + ", ".join(s.path for s in matches[:3])
            )
        sample = matches[0]
        if boxes:
            _set_label(sample, boxes[0].class_index, where)
        sample.boxes = boxes
    if missing:
        what = f"{missing:,} rows have no image" if missing > 1 else "1 row has no image"
        if missing == rows:
            what = f"none of its {rows:,} rows has an image" if rows > 1 else what
        log.warning("%s: %s under %s; ignored", csv_path, what, root)


def _read_loc_csv(csv_path: Path) -> Iterator[tuple[str, str, tuple[Box, ...]]]:
    """(where, image id, boxes) for each row; DatasetError naming the line if one is bad."""
    seen: set[str] = set()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise DatasetError(f"{csv_path}: expected the header 'ImageId,PredictionString'")
            for number, row in enumerate(reader, start=2):
                if not row or not any(cell.strip() for cell in row):
                    continue
                where = f"{csv_path} line {number}"
                if len(row) < 2:
                    raise DatasetError(f"{where}: expected 'ImageId,PredictionString'")
                image_id = row[0].strip()
                if not image_id:
                    raise DatasetError(f"{where}: empty ImageId")
                if image_id in seen:
                    raise DatasetError(f"{where}: image {image_id!r} appears twice")
                seen.add(image_id)
                yield where, image_id, _parse_boxes(row[1].split(), where)
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot read ({one_line(exc)})") from None
    except csv.Error as exc:
        raise DatasetError(f"{csv_path}: malformed csv ({one_line(exc)})") from None


def _set_label(sample: Sample, label: int, where: str) -> None:
    if sample.label == -1:
        sample.label = label
    elif sample.label != label:
        raise DatasetError(
            f"{where}: class {label} disagrees with the label {sample.label} of {sample.path}"
        )


def _apply_xml_boxes(xml_dir: Path, samples: list[Sample]) -> None:
    """Boxes, size and (if missing) label from one VOC/ILSVRC XML per image, matched by stem.
    XMLs are searched recursively (train annotations live in per-wnid folders); images
    without an XML keep what they had. Difficult objects follow `pointing_boxes`."""
    xmls: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(xml_dir, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".xml"):
                xmls.setdefault(name[:-4], Path(dirpath, name))
    for sample in samples:
        stem = sample.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        xml_path = xmls.get(stem)
        if xml_path is None:
            continue
        boxes, width, height = parse_voc_xml(xml_path)
        if boxes:  # the image's class, even when all its boxes are difficult
            _set_label(sample, boxes[0].class_index, str(xml_path))
        sample.boxes = pointing_boxes(boxes)
        sample.width, sample.height = width, height


def pointing_boxes(boxes: Sequence[Box]) -> tuple[Box, ...]:
    """The boxes the pointing game scores, by TorchRay's rule for PASCAL VOC difficult objects.

    TorchRay's PointingGameBenchmark (torchray/benchmark/pointing_game.py lines 206-215,
    "Skip if all boxes for class_id are PASCAL difficult") skips an (image, class) pair whose
    objects of that class are ALL difficult; otherwise its mask (datasets.py voc_as_mask) is
    the union of ALL boxes of the class, difficult ones included. This is independent of its
    `difficult=` argument, which only selects the EBP "difficult" image subset. Here: the
    boxes of a class whose boxes are all difficult are dropped (the image then has no box of
    that class: pointing metrics are NaN, i.e. skipped); other boxes are kept, with their flag.
    """
    easy = {box.class_index for box in boxes if not box.difficult}
    return tuple(box for box in boxes if box.class_index in easy)


def xml_origin(root: ET.Element) -> int:
    """First pixel (0 or 1) of the box coordinates of a parsed VOC/ILSVRC annotation.

    PASCAL VOC (<source><database> naming VOC, e.g. "The VOC2007 Database"): 1-based, the
    VOC devkit's MATLAB convention; TorchRay subtracts 1 when reading them
    (torchray/benchmark/datasets.py, voc_as_mask: `int(bbox['xmin']) - 1`, lines 121-124).
    ImageNet (<database>ILSVRC_2012</database>, Kaggle's ILSVRC/Annotations/CLS-LOC): 0-based,
    as LOC_val_solution.csv which repeats their numbers; Microsoft's Deep Feature Flow reads
    ILSVRC XMLs without subtracting 1 and clips xmax to width - 1 (lib/dataset/imagenet_vid.py
    lines 157-160; line 239: "the imagenet expects 0-based indices"). The ILSVRC devkit only
    compares boxes by IoU, which does not depend on the origin. Any other or no <database>:
    0-based, as ImageNet (object names must be ImageNet wnids here).
    """
    database = (root.findtext("source/database") or "").upper()
    return 1 if "VOC" in database else 0


def parse_voc_xml(path: str | os.PathLike) -> tuple[tuple[Box, ...], int, int]:
    """Read an ILSVRC/PASCAL VOC annotation: (boxes, width, height) in original pixels.

    Boxes come back in mpbatch's 0-based convention: PASCAL VOC files (1-based) are shifted
    by -1, ILSVRC files (0-based) are kept; see `xml_origin`. Every object is returned, with
    its <difficult> flag; `pointing_boxes` applies TorchRay's rule for difficult objects.
    """
    path = Path(path)
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: malformed XML ({one_line(exc)})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({one_line(exc)})") from None
    node = tree.getroot()
    if node.tag != "annotation":
        raise DatasetError(f"{path}: malformed annotation (root element is <{node.tag}>)")
    width = _xml_int(path, node.findtext("size/width"), "size/width", minimum=1)
    height = _xml_int(path, node.findtext("size/height"), "size/height", minimum=1)
    origin = xml_origin(node)
    boxes = tuple(_xml_object(path, obj, origin) for obj in node.findall("object"))
    return boxes, width, height


def _xml_int(path: Path, text: str | None, what: str, minimum: int) -> int:
    try:
        value = int(float((text or "").strip()))
    except ValueError:
        raise DatasetError(f"{path}: malformed annotation (bad {what} {text!r})") from None
    if value < minimum:
        raise DatasetError(f"{path}: malformed annotation ({what} {value} < {minimum})")
    return value


def _xml_object(path: Path, obj: ET.Element, origin: int) -> Box:
    wnid = (obj.findtext("name") or "").strip()
    index = _wnid_index()
    if wnid not in index:
        raise DatasetError(f"{path}: unknown wnid {wnid!r} in <object><name>")
    flag = (obj.findtext("difficult") or "").strip() or "0"  # absent: not difficult
    if flag not in ("0", "1"):
        raise DatasetError(f"{path}: malformed annotation (bad <difficult> {flag!r})")
    coords = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
    where = f"{path}: malformed annotation"
    return _make_box(index[wnid], coords, where, origin, difficult=flag == "1")
