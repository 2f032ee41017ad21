"""Tests for pipeline.metrics.pointing: the pointing game (tolerance, ties, several boxes, sizes),
its energy variant, the centre's points, and TorchRay's PointingGame side by side."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.metrics import pointing as P


def _one_hot(h, w, y, x):
    s = torch.zeros(1, h, w)
    s[0, y, x] = 1.0
    return s


@pytest.mark.parametrize(
    "box,hit",
    [
        ((64.9, 0.0, 90.0, 79.0), 1.0),  # 14.9 px to the right
        ((65.0, 0.0, 90.0, 79.0), 0.0),  # exactly 15 px: strict <
        ((0.0, 0.0, 35.1, 79.0), 1.0),  # 14.9 px to the left (xmax)
        ((0.0, 55.0, 99.0, 79.0), 0.0),  # exactly 15 px below
        ((59.0, 52.0, 70.0, 70.0), 0.0),  # corner at (9, 12): distance 15
        ((59.0, 51.9, 70.0, 70.0), 1.0),  # corner at (9, 11.9): distance < 15
        ((40.0, 30.0, 60.0, 50.0), 1.0),  # contains the point
        ((50.0, 40.0, 50.0, 40.0), 1.0),  # a one-pixel box on the point
    ],
)
def test_pointing_tolerance(box, hit):
    sal = _one_hot(80, 100, 40, 50)  # point (x=50, y=40)
    res = P.pointing_game(sal, [torch.tensor([box])], [(100, 80)])
    assert res.tolist() == [hit]


def test_pointing_several_boxes_union():
    sal = _one_hot(80, 100, 40, 50)
    far = [0.0, 0.0, 10.0, 10.0]
    near = [66.0, 40.0, 70.0, 45.0]  # 16 px: a miss on its own
    nearer = [64.0, 40.0, 70.0, 45.0]  # 14 px
    res = P.pointing_game(
        sal.expand(3, 80, 100),
        [torch.tensor([far, near]), torch.tensor([far, near, nearer]), torch.tensor([nearer])],
        [(100, 80)] * 3,
    )
    assert res.tolist() == [0.0, 1.0, 1.0]


def test_pointing_non_square_original_size():
    # Low-res map 4×8, maximum at cell (row 1, col 6); original size 40 wide × 20 high is a
    # 5× upsampling, so the cell centre lands exactly on pixel (row 7, col 32).
    sal = torch.zeros(1, 4, 8)
    sal[0, 1, 6] = 1.0
    pts = P.pointing_points(sal, [(40, 20)])
    assert pts.tolist() == [[32.0, 7.0]]
    hit = P.pointing_game(sal, [torch.tensor([[30.0, 5.0, 34.0, 9.0]])], [(40, 20)], tolerance=1.0)
    swapped = P.pointing_game(
        sal, [torch.tensor([[5.0, 30.0, 9.0, 34.0]])], [(40, 20)], tolerance=1.0
    )
    assert hit.tolist() == [1.0] and swapped.tolist() == [0.0]
    # Different original sizes in one batch.
    sal2 = torch.cat([sal, sal])
    pts2 = P.pointing_points(sal2, [(40, 20), (24, 12)])  # 3× upsampling: (3*6+1, 3*1+1)
    assert pts2.tolist() == [[32.0, 7.0], [19.0, 4.0]]


def test_pointing_ties_first_in_raster_order():
    sal = torch.zeros(1, 6, 9)
    sal[0, 2, 5] = 1.0
    sal[0, 1, 7] = 1.0
    sal[0, 4, 0] = 1.0
    assert P.pointing_points(sal, [(9, 6)]).tolist() == [[7.0, 1.0]]
    assert P.pointing_points(torch.zeros(1, 6, 9), [(9, 6)]).tolist() == [[0.0, 0.0]]
    res = P.pointing_game(sal, [torch.tensor([[7.0, 1.0, 7.0, 1.0]])], [(9, 6)], tolerance=0.5)
    assert res.tolist() == [1.0]


def test_pointing_nan_without_boxes():
    sal = _one_hot(10, 10, 5, 5).expand(3, 10, 10)
    res = P.pointing_game(
        sal, [None, torch.zeros(0, 4), torch.tensor([[4.0, 4.0, 6.0, 6.0]])], [(10, 10)] * 3
    )
    assert math.isnan(res[0]) and math.isnan(res[1]) and res[2] == 1.0
    en = P.pointing_energy(
        sal, [None, torch.zeros(0, 4), torch.tensor([[4.0, 4.0, 6.0, 6.0]])], [(10, 10)] * 3
    )
    assert math.isnan(en[0]) and math.isnan(en[1]) and en[2] == 1.0


def test_pointing_center_points_and_hits():
    pts = P.center_points([(227, 227), (100, 50)])
    assert pts.tolist() == [[113.0, 113.0], [49.5, 24.5]]
    boxes = [torch.tensor([[0.0, 0.0, 99.0, 120.0]]), torch.tensor([[64.5, 0.0, 99.0, 49.0]])]
    assert P.pointing_hits(pts, boxes).tolist() == [1.0, 0.0]


def test_pointing_energy_known_fractions():
    ones = torch.ones(1, 10, 10)
    box = torch.tensor([[2.0, 3.0, 4.0, 7.0]])  # 3 columns × 5 rows, inclusive
    assert P.pointing_energy(ones, [box], [(10, 10)]).item() == pytest.approx(0.15)
    weighted = torch.ones(1, 10, 10)
    weighted[0, 3:8, 2:5] = 2.0
    weighted[0, 0, 0] = -5.0  # negative saliency is clamped to 0
    assert P.pointing_energy(weighted, [box], [(10, 10)]).item() == pytest.approx(30 / 114)
    # Overlapping boxes count their union once.
    two = torch.tensor([[2.0, 3.0, 4.0, 7.0], [4.0, 3.0, 5.0, 7.0]])
    assert P.pointing_energy(ones, [two], [(10, 10)]).item() == pytest.approx(0.20)
    # Low-res saliency is resized to the (non-square) original size first.
    low = torch.ones(1, 2, 2)
    assert P.pointing_energy(
        low, [torch.tensor([[0.0, 0.0, 9.0, 4.0]])], [(20, 10)]
    ).item() == pytest.approx(0.25)
    assert math.isnan(P.pointing_energy(torch.zeros(1, 4, 4), [box], [(10, 10)]).item())
    cov = P.box_coverage([box, two, None], [(10, 10), (10, 10), (10, 10)])
    assert cov[:2].tolist() == pytest.approx([0.15, 0.20]) and math.isnan(cov[2])


def test_pointing_rejects_bad_boxes():
    with pytest.raises(ValueError):
        P.pointing_game(torch.zeros(1, 4, 4), [torch.tensor([[5.0, 0.0, 1.0, 2.0]])], [(4, 4)])
    with pytest.raises(ValueError):
        P.pointing_game(torch.zeros(2, 4, 4), [None], [(4, 4), (4, 4)])


@pytest.mark.parametrize("smooth", [0.0, 0.09])
def test_pointing_equals_torchray_pointing_game(smooth):
    """Side by side with TorchRay's PointingGame and its benchmark's point (resize_saliency,
    imsmooth with σ = smooth·min(H, W), argmax): random maps and boxes, several sizes."""
    pointing_game_module = pytest.importorskip("torchray.benchmark.pointing_game")
    from torchray.attribution.common import resize_saliency
    from torchray.utils import imsmooth

    g = torch.Generator().manual_seed(7)
    game = pointing_game_module.PointingGame(num_classes=1, tolerance=15)
    checked = hits = 0
    for width, height in [(60, 45), (37, 80), (100, 100)]:
        for _ in range(15):
            saliency = torch.rand(1, 7, 7, generator=g)
            corner = torch.rand(2, generator=g) * torch.tensor([width, height])
            extent = 1 + torch.rand(2, generator=g) * 12
            xmin, ymin = corner.floor().tolist()
            xmax = min(width - 1, int(xmin + extent[0]))
            ymax = min(height - 1, int(ymin + extent[1]))
            box = torch.tensor([[xmin, ymin, xmax, ymax]], dtype=torch.float64)
            points = P.pointing_points(saliency, [(width, height)], smooth=smooth)
            ours = P.pointing_hits(points, [box], tolerance=15.0)[0].item()
            # TorchRay: resize to (width, height), smooth, first maximum, PointingGame
            theirs_map = resize_saliency(None, saliency[None], (width, height), "bilinear")
            if smooth > 0:
                sigma = smooth * min(theirs_map.shape[2:])
                theirs_map = imsmooth(theirs_map, sigma=sigma, padding_mode="constant")
            flat = int(theirs_map.flatten().argmax())
            point = (flat % width, flat // width)
            assert tuple(points[0].long().tolist()) == point
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[int(ymin) : ymax + 1, int(xmin) : xmax + 1] = True
            theirs = game.evaluate(mask, point) == 1
            assert ours == float(theirs)
            checked, hits = checked + 1, hits + int(theirs)
    assert checked == 45 and 0 < hits < 45  # both outcomes occur
