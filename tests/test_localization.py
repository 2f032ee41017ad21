"""Tests for pipeline.metrics.localization: thresholds, boxes, IoU, hits (Fong & Vedaldi 2017).

Hand cases give their expected values worked out in comments. The fast many-α path is
checked against a loop over the one-α functions, and the threshold-first box against an
actual ``F.interpolate`` of the thresholded map.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.metrics import localization as L

# A 6×8 map (rows y 0..5, columns x 0..8): a 3×3 blob at x 2..4, y 1..3 of 0.5 with a 1.0
# centre at (x 3, y 2), and a lone 0.2 at (x 6, y 4). min 0, max 1, sum 8·0.5 + 1 + 0.2
# = 5.2, mean 5.2 / 48 = 0.10833.
BLOB = np.zeros((6, 8))
BLOB[1:4, 2:5] = 0.5
BLOB[2, 3] = 1.0
BLOB[4, 6] = 0.2
BLOB_BOX = (2, 1, 4, 3)
CENTRE_BOX = (3, 2, 3, 2)
ALL_POSITIVE_BOX = (2, 1, 6, 4)  # blob + the 0.2 pixel
WHOLE = (0, 0, 7, 5)


def box_of(saliency, rule, alpha):
    return L.bounding_box(L.threshold_map(saliency, rule, alpha))


# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------


def test_paper_constants():
    assert L.RULES == {"value": 0.10, "energy": 0.95, "mean": 0.5}
    assert L.DEFAULT_RULE == "energy"
    assert L.IOU_THRESHOLD == 0.5
    np.testing.assert_array_equal(L.ALPHA_GRID["value"], np.arange(20) / 20)
    np.testing.assert_array_equal(L.ALPHA_GRID["energy"], np.arange(20) / 20)
    np.testing.assert_array_equal(L.ALPHA_GRID["mean"], np.arange(21) / 2)
    with pytest.raises(ValueError):
        L.ALPHA_GRID["value"][0] = 1.0  # read-only


# --------------------------------------------------------------------------------------
# Thresholding rules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.1, ALL_POSITIVE_BOX),  # s >= 0.1: blob and the 0.2
        (0.4, BLOB_BOX),  # s >= 0.4: the 0.5s and 1.0
        (0.6, CENTRE_BOX),  # s >= 0.6: only the 1.0
        (1.0, CENTRE_BOX),  # s >= 1.0: the maximum itself survives
    ],
)
def test_value_rule(alpha, expected):
    assert box_of(BLOB, "value", alpha) == expected


def test_value_rule_is_alpha_of_the_min_max_range():
    # Shift by 0.1 (min 0.1, max 1.1). Min-max rule at α = 0.25: s - 0.1 >= 0.25 · 1.0, so
    # the 0.2 (now 0.3, 0.2 above the min) fails: the blob box. A plain α·max rule would
    # keep s >= 0.275 and take the 0.3 pixel in. All pixels are now > 0.
    shifted = BLOB + 0.1
    keep = L.threshold_map(shifted, "value", 0.25)
    assert keep.sum() == 9
    assert L.bounding_box(keep) == BLOB_BOX
    # α = 0: every pixel passes (s - min >= 0) and is > 0: the whole image.
    assert box_of(shifted, "value", 0.0) == WHOLE


def test_zero_pixels_never_survive():
    # Value at α = 0: s - 0 >= 0 holds everywhere, but the reference boxes only non-zero
    # pixels, so the box is that of the positive pixels, not the whole image.
    keep = L.threshold_map(BLOB, "value", 0.0)
    assert keep.sum() == 10
    assert L.bounding_box(keep) == ALL_POSITIVE_BOX
    assert box_of(BLOB, "mean", 0.0) == ALL_POSITIVE_BOX
    # Negative values are never kept either.
    signed = BLOB - 0.05  # the zeros become -0.05; every positive pixel stays positive
    assert box_of(signed, "value", 0.0) == ALL_POSITIVE_BOX


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.5, ALL_POSITIVE_BOX),  # t = 0.0542: every positive pixel
        (3.0, BLOB_BOX),  # t = 0.325: the 0.5s and 1.0
        (5.0, CENTRE_BOX),  # t = 0.5417: only the 1.0
        (10.0, WHOLE),  # t = 1.0833: nothing survives -> whole image
    ],
)
def test_mean_rule(alpha, expected):
    assert box_of(BLOB, "mean", alpha) == expected


# Energy on distinct values: total 4 + 3 + 2 + 1 = 10, sorted cumulative sums 4, 7, 9, 10.
# The reference keeps the pixels before the first whose cumulative sum reaches α·10.
ENERGY = np.array(
    [
        [0.0, 0.0, 0.0, 1.0],
        [4.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 3.0, 2.0],
    ]
)


@pytest.mark.parametrize(
    ("alpha", "kept", "expected"),
    [
        (0.0, 0, (0, 0, 3, 2)),  # target 0: reached at the 4 already -> nothing -> whole
        (0.4, 0, (0, 0, 3, 2)),  # target 4.0: reached AT the 4 (cum 4 >= 4) -> nothing
        (0.41, 1, (0, 1, 0, 1)),  # target 4.1: reached at the 3 (cum 7) -> keep {4}
        (0.65, 1, (0, 1, 0, 1)),  # target 6.5: reached at the 3 -> keep {4}
        (0.75, 2, (0, 1, 2, 2)),  # target 7.5: reached at the 2 (cum 9) -> keep {4, 3}
        (0.95, 3, (0, 1, 3, 2)),  # target 9.5: reached at the 1 -> keep {4, 3, 2}
        (1.0, 3, (0, 1, 3, 2)),  # target 10: reached at the 1 -> the 1 is still left out
        (1.5, 4, (0, 0, 3, 2)),  # never reached -> every positive pixel
    ],
)
def test_energy_rule_keeps_the_pixels_before_the_crossing_one(alpha, kept, expected):
    keep = L.threshold_map(ENERGY, "energy", alpha)
    assert int(keep.sum()) == kept
    assert L.bounding_box(keep) == expected


def test_energy_rule_keeps_a_tie_group_whole():
    # Values 3, 2, 2, 1 (total 8; sorted cumulative sums 3, 5, 7, 8). α = 0.7: target 5.6
    # is first reached at the second 2 (cum 7), so 2 pixels are kept: the 3 and ONE of the
    # 2s. The cut value is 2, so both 2s are kept: box over (0,0), (1,1), (3,2) =
    # (0, 0, 3, 2). Raster order among ties would give (0, 0, 1, 1); reverse raster
    # (1, 1, 3, 2). α = 0.5: target 4, reached at the first 2 (cum 5): keep {3} alone.
    tie = np.array(
        [
            [2.0, 0.0, 0.0, 0.0],
            [0.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 2.0],
            [1.0, 0.0, 0.0, 0.0],
        ]
    )
    keep = L.threshold_map(tie, "energy", 0.7)
    assert int(keep.sum()) == 3
    assert L.bounding_box(keep) == (0, 0, 3, 2)
    assert box_of(tie, "energy", 0.5) == (1, 1, 1, 1)
    # A flat blob (all ties): α = 0.5 would keep half the pixels in any order; the whole
    # group is kept, as the reference's scattered quicksort order yields for its box.
    assert box_of(BLOB > 0.4, "energy", 0.5) == BLOB_BOX


def test_energy_on_the_blob():
    # Sorted 1.0, 0.5 × 8, 0.2; cumulative 1, 1.5, ..., 5.0, 5.2. α = 0.95: target 4.94,
    # reached at the 8th 0.5 (cum 5.0): kept = 1.0 and seven 0.5s, cut 0.5 -> all 0.5s;
    # the 0.2 is out. α = 0.1: target 0.52, reached at the 1.0 -> nothing -> whole image.
    assert box_of(BLOB, "energy", 0.95) == BLOB_BOX
    assert box_of(BLOB, "energy", 0.1) == WHOLE
    # α = 0.2: target 1.04 is reached at the first 0.5 (cum 1.5): keep {1.0}.
    assert box_of(BLOB, "energy", 0.2) == CENTRE_BOX


def test_default_alpha_is_the_rules_paper_value():
    for rule, alpha in L.RULES.items():
        np.testing.assert_array_equal(
            L.threshold_map(BLOB, rule), L.threshold_map(BLOB, rule, alpha)
        )


def test_all_zero_map_keeps_nothing():
    zero = np.zeros((6, 8))
    for rule in L.RULES:
        for alpha in (0.0, 0.5, 1.0):
            assert not L.threshold_map(zero, rule, alpha).any()
            assert box_of(zero, rule, alpha) == WHOLE


def test_torch_input_equals_numpy():
    t = torch.tensor(BLOB, dtype=torch.float32)
    for rule in L.RULES:
        np.testing.assert_array_equal(L.threshold_map(t, rule), L.threshold_map(BLOB, rule))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown rule"):
        L.threshold_map(BLOB, "otsu", 0.5)
    with pytest.raises(ValueError, match="NaN"):
        L.threshold_map(np.full((2, 2), np.nan), "value", 0.5)
    with pytest.raises(ValueError, match="H×W"):
        L.threshold_map(np.zeros((1, 2, 2)), "value", 0.5)
    with pytest.raises(ValueError, match="min <= max"):
        L.localization_hit(BLOB, [[4, 0, 2, 3]], "value", 0.5)


# --------------------------------------------------------------------------------------
# Boxes and IoU
# --------------------------------------------------------------------------------------


def test_bounding_box_hand_cases():
    keep = np.zeros((6, 8), dtype=bool)
    assert L.bounding_box(keep) == WHOLE  # nothing survives -> whole image
    keep[5, 7] = True
    assert L.bounding_box(keep) == (7, 5, 7, 5)  # one pixel: xmin = xmax, ymin = ymax
    keep[0, 1] = True
    assert L.bounding_box(keep) == (1, 0, 7, 5)  # ALL survivors, not one component
    assert L.bounding_box(torch.from_numpy(keep)) == (1, 0, 7, 5)


def test_iou_pixel_inclusive_convention():
    assert L.box_iou((2, 3, 10, 7), (2, 3, 10, 7)) == 1.0
    # Adjacent, no shared pixel: iw = 4 - 5 + 1 = 0 -> 0.
    assert L.box_iou((0, 0, 4, 4), (5, 0, 9, 4)) == 0.0
    # Far apart (the reference says -1; both miss).
    assert L.box_iou((0, 0, 1, 1), (10, 10, 12, 12)) == 0.0
    # Sharing column 4: inter 1·5 = 5, union 25 + 25 - 5 = 45 -> 1/9.
    assert L.box_iou((0, 0, 4, 4), (4, 0, 8, 4)) == pytest.approx(1 / 9)
    # (0,0,3,3) and (2,2,5,5): 16 px each, inter 2·2 = 4, union 28 -> 1/7 (the continuous
    # convention would give 1/17).
    assert L.box_iou((0, 0, 3, 3), (2, 2, 5, 5)) == pytest.approx(1 / 7)
    # A single pixel against itself is a full overlap, not 0/0.
    assert L.box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 1.0


def test_iou_broadcasts():
    a = np.array([[0, 0, 3, 3], [2, 3, 10, 7]])
    b = np.array([[2, 2, 5, 5], [2, 3, 10, 7], [5, 0, 9, 4]])
    got = L.box_iou(a[:, None, :], b[None, :, :])
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert got[i, j] == L.box_iou(a[i], b[j])
    assert got[0, 0] == pytest.approx(1 / 7) and got[1, 1] == 1.0


# --------------------------------------------------------------------------------------
# Hits
# --------------------------------------------------------------------------------------


def test_hit_with_any_of_several_boxes():
    # Value α = 0.4 gives the blob box (2,1,4,3), 9 px.
    far = (5, 0, 7, 5)  # IoU 0
    near = (2, 1, 5, 3)  # inter 9, union 12 -> 0.75
    assert L.localization_hit(BLOB, [far, near], "value", 0.4) == 1.0
    assert L.localization_hit(BLOB, [far], "value", 0.4) == 0.0
    # The whole image: 9 / 48 = 0.1875 -> miss.
    assert L.localization_hit(BLOB, [far, WHOLE], "value", 0.4) == 0.0
    # Exactly 0.5 is a hit: (2,0,4,5) is 3×6 = 18 px containing the 9 -> 9/18.
    assert L.localization_hit(BLOB, [(2, 0, 4, 5)], "value", 0.4) == 1.0
    # (2,0,5,5): 24 px -> 0.375, a miss.
    assert L.localization_hit(BLOB, [(2, 0, 5, 5)], "value", 0.4) == 0.0
    # Tensor boxes work too.
    assert L.localization_hit(BLOB, torch.tensor([near]), "value", 0.4) == 1.0


def test_no_boxes_is_nan():
    for boxes in (None, [], np.zeros((0, 4))):
        assert math.isnan(L.localization_hit(BLOB, boxes, "energy"))
        hits = L.localization_hits(BLOB, boxes, "energy", [0.1, 0.5])
        assert hits.shape == (2,) and np.isnan(hits).all()


def test_hits_over_alphas_on_the_blob():
    # Ground truth = the blob box. Value: α 0.1 -> (2,1,6,4) 20 px, IoU 9/20 = 0.45 miss;
    # 0.4 -> blob, 1.0 hit; 0.6 -> centre pixel, 1/9 miss.
    got = L.localization_hits(BLOB, [BLOB_BOX], "value", [0.1, 0.4, 0.6])
    np.testing.assert_array_equal(got, [0.0, 1.0, 0.0])
    boxes = L.localization_boxes(BLOB, "value", [0.1, 0.4, 0.6])
    np.testing.assert_array_equal(boxes, [ALL_POSITIVE_BOX, BLOB_BOX, CENTRE_BOX])
    # Default grids.
    assert L.localization_hits(BLOB, [BLOB_BOX], "mean").shape == (21,)
    assert L.localization_boxes(BLOB).shape == (20, 4)


def _random_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth blob plus noise, some exact zeros, and (half the time) quantised values so
    ties are common."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    sy, sx = rng.uniform(1, h / 2), rng.uniform(1, w / 2)
    s = np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2)) + 0.3 * rng.random((h, w))
    s[rng.random((h, w)) < 0.3] = 0.0
    if rng.random() < 0.5:
        s = np.round(s * 4) / 4
    return s


def _random_boxes(rng: np.random.Generator, width: int, height: int, near) -> np.ndarray:
    """1-3 boxes: one jittered around `near` (so hits happen), the others random."""
    out = []
    x0, y0, x1, y1 = near
    jitter = max(1, (x1 - x0 + y1 - y0) // 4)
    j = rng.integers(-jitter, jitter + 1, size=4)
    xmin, ymin = max(0, min(x0 + j[0], x1)), max(0, min(y0 + j[1], y1))
    out.append([xmin, ymin, max(xmin, x1 + j[2]), max(ymin, y1 + j[3])])
    for _ in range(rng.integers(0, 3)):
        a, b = np.sort(rng.integers(0, width, 2))
        c, d = np.sort(rng.integers(0, height, 2))
        out.append([a, c, b, d])
    return np.array(out)


@pytest.mark.parametrize("rule", ["value", "energy", "mean"])
def test_fast_path_equals_the_one_alpha_loop(rule):
    rng = np.random.default_rng(7)
    alphas = np.concatenate([L.ALPHA_GRID[rule], rng.uniform(0, L.ALPHA_GRID[rule][-1], 10)])
    hit_values = set()
    for trial in range(30):
        h, w = int(rng.integers(3, 25)), int(rng.integers(3, 25))
        s = _random_map(rng, h, w)
        # Threshold first to an original size that grows, shrinks (some map pixels are
        # skipped) or keeps the map size; or resize-first semantics (None).
        sizes = [None, (w, h), (int(rng.integers(w, 4 * w)), int(rng.integers(h, 4 * h)))]
        sizes.append((int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))))
        size = sizes[trial % 4]
        width, height = (w, h) if size is None else size
        mid = L.localization_boxes(s, rule, [alphas[len(alphas) // 2]], original_size=size)[0]
        gt = _random_boxes(rng, width, height, tuple(int(v) for v in mid))

        fast_boxes = L.localization_boxes(s, rule, alphas, original_size=size)
        fast_hits = L.localization_hits(s, gt, rule, alphas, original_size=size)
        for k, alpha in enumerate(alphas):
            keep = L.threshold_map(s, rule, alpha)
            slow_box = L.bounding_box(keep) if size is None else L.original_box(keep, *size)
            assert tuple(fast_boxes[k]) == slow_box, (trial, alpha)
            slow_hit = L.localization_hit(s, gt, rule, alpha, original_size=size)
            assert fast_hits[k] == slow_hit, (trial, alpha)
            hit_values.add(slow_hit)
    assert hit_values == {0.0, 1.0}  # the comparison saw both outcomes


# --------------------------------------------------------------------------------------
# Resolution: threshold first (reference) and resize first
# --------------------------------------------------------------------------------------


def _interpolated_box(keep: np.ndarray, values: np.ndarray, width: int, height: int):
    """The reference's order done literally: zero the rejected pixels, resize bilinearly,
    box the non-zero pixels."""
    zeroed = torch.from_numpy(np.where(keep, values, 0.0))[None, None]
    up = F.interpolate(zeroed, size=(height, width), mode="bilinear", align_corners=False)
    return L.bounding_box(up[0, 0].numpy() != 0)


def test_original_box_equals_interpolating_the_thresholded_map():
    rng = np.random.default_rng(3)
    for _ in range(200):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        keep = rng.random((h, w)) < rng.choice([0.03, 0.2, 0.6])
        values = rng.uniform(0.01, 1.0, (h, w))
        width, height = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        assert L.original_box(keep, width, height) == _interpolated_box(
            keep, values, width, height
        ), (keep.astype(int), width, height)


def test_original_box_hand_case():
    # Map 4 wide, kept column 1 only, resized to 8 wide (scale 0.5): output x samples the
    # map at s = (x + 0.5)/2 - 0.5 = -0.25, 0.25, 0.75, 1.25, 1.75, 2.25, ... (clamped at
    # 0). Column 1 has weight in x = 1 (s 0.25), 2 (0.75), 3 (1.25), 4 (1.75): box 1..4,
    # one output pixel wider per side than its 2-pixel footprint (x 2..3).
    keep = np.zeros((1, 4), dtype=bool)
    keep[0, 1] = True
    assert L.original_box(keep, 8, 2) == (1, 0, 4, 1)
    # At the same size the box is the plain one.
    assert L.original_box(keep, 4, 1) == L.bounding_box(keep) == (1, 0, 1, 0)
    # Nothing kept -> the whole ORIGINAL image.
    assert L.original_box(np.zeros((1, 4), dtype=bool), 8, 2) == (0, 0, 7, 1)


def test_threshold_first_hit_matches_the_literal_reference_order():
    rng = np.random.default_rng(11)
    for trial in range(20):
        s = _random_map(rng, 14, 14)
        width, height = int(rng.integers(20, 50)), int(rng.integers(20, 50))
        for rule in L.RULES:
            keep = L.threshold_map(s, rule)
            box = _interpolated_box(keep, s, width, height)
            got = L.localization_boxes(s, rule, [L.RULES[rule]], original_size=(width, height))
            assert tuple(got[0]) == box, (trial, rule)
            assert L.localization_hit(s, [box], rule, original_size=(width, height)) == 1.0


def test_resize_to_original():
    s = np.arange(6, dtype=np.float32).reshape(2, 3)
    up = L.resize_to_original(s, width=6, height=4)
    assert up.shape == (4, 6) and up.dtype == np.float32
    ref = F.interpolate(torch.from_numpy(s)[None, None], size=(4, 6), mode="bilinear")
    np.testing.assert_array_equal(up, ref[0, 0].numpy())
    # Hand value: output (y 0, x 1) samples s at (row -0.25 -> 0, column 0.25): 0.25.
    assert up[0, 1] == pytest.approx(0.25)
    np.testing.assert_array_equal(L.resize_to_original(s, 3, 2), s)
    assert L.resize_to_original(s.astype(np.float64), 6, 4).dtype == np.float64
