"""Tests for pipeline.metrics.deletion_insertion: deletion / insertion curves, AUC, baselines.

The curve tests compare against a deliberately slow reference written here: per image and
per step, pixels are changed one value at a time in Python loops, the blur is an explicit
loop with zero padding, and the order is Python's sort on (-saliency, raster index).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.metrics import deletion_insertion as M
from pipeline.metrics.pointing import pointing_points

IMNET_MEAN = (0.485, 0.456, 0.406)
IMNET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------


class Wrapped(nn.Module):
    """The model-wrapper contract: pixels in, logits out, normalisation inside."""

    def __init__(self, net: nn.Module, mean=IMNET_MEAN, std=IMNET_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def normalize(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def forward(self, pixels):
        return self.net(self.normalize(pixels))


def tiny_conv_model(dtype=torch.float32, seed=0, n_classes=5):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, n_classes),
    )
    with torch.no_grad():
        # Larger weights make the probabilities move a lot along the curves.
        net[0].weight.mul_(3.0)
        net[2].weight.mul_(3.0)
        net[-1].weight.mul_(6.0)
    return Wrapped(net).to(dtype).eval()


class RegionModel(nn.Module):
    """Two classes; softmax probability of class 0 = fraction of region R still 'intact'.

    A pixel of R is intact when its red channel is > 0.999 (the test images hold 1.0 on R,
    and neither substrate comes near 1.0 there). Logits [log f, log(1 - f)], clamped.
    """

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.bool())
        self.register_buffer("mean", torch.full((3,), 0.5))
        self.register_buffer("std", torch.full((3,), 0.5))

    def normalize(self, x):
        return (x - 0.5) / 0.5

    def forward(self, pixels):
        intact = (pixels[:, 0] > 0.999) & self.region
        f = intact.flatten(1).sum(1).double() / self.region.sum()
        eps = 1e-12
        return torch.stack([f.clamp(min=eps).log(), (1 - f).clamp(min=eps).log()], dim=1)


# --------------------------------------------------------------------------------------
# Slow reference
# --------------------------------------------------------------------------------------


def ref_order(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def scipy_gkern(k: int, sigma: float) -> np.ndarray:
    """RISE's gkern(k, sigma) (eclique/RISE evaluation.py), computed as it does with scipy."""
    gaussian_filter = pytest.importorskip("scipy.ndimage").gaussian_filter
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1
    return gaussian_filter(delta, sigma).astype("float32")


def ref_blur_pixels(img: torch.Tensor, mean, std, k: int, sigma: float) -> torch.Tensor:
    """Normalise, blur with RISE's kernel in explicit loops and zero padding, un-normalise
    (float64 arithmetic over the float32 kernel)."""
    c_n, h, w = img.shape
    r = k // 2
    kernel = scipy_gkern(k, sigma).astype(np.float64).tolist()
    x = img.double().tolist()
    out = torch.zeros(c_n, h, w, dtype=torch.float64)
    for c in range(c_n):
        m, sd = float(mean[c]), float(std[c])
        for i in range(h):
            for j in range(w):
                acc = 0.0
                for a in range(k):
                    ii = i + a - r
                    if ii < 0 or ii >= h:
                        continue  # zero padding (in normalised space)
                    for b in range(k):
                        jj = j + b - r
                        if jj < 0 or jj >= w:
                            continue
                        acc += kernel[a][b] * (x[c][ii][jj] - m) / sd
                out[c, i, j] = acc * sd + m
    return out


def ref_curve(model, img, sal_full, target, mode, step, k=11, sigma=5.0):
    """One image: N+1 scores, changing pixels one by one in Python."""
    _, h, w = img.shape
    hw = h * w
    order = ref_order(sal_full.reshape(-1).tolist())
    mean = [float(v) for v in model.mean]
    if mode == "deletion":
        current = img.clone()
        source = [[[mean[c]] * w for _ in range(h)] for c in range(3)]
    else:
        current = ref_blur_pixels(img, model.mean, model.std, k, sigma).to(img.dtype)
        source = img.tolist()
    n = -(-hw // step)
    scores = []
    for s in range(n + 1):
        with torch.no_grad():
            p = torch.softmax(model(current[None]).double(), dim=1)[0, target]
        scores.append(float(p))
        for idx in order[s * step : (s + 1) * step]:
            y, x = divmod(idx, w)
            for c in range(3):
                current[c, y, x] = source[c][y][x]
    return scores


# --------------------------------------------------------------------------------------
# Protocol, order, substrates
# --------------------------------------------------------------------------------------


def test_protocol_defaults_and_steps():
    p = M.CurveProtocol()
    assert (p.step, p.blur_kernel, p.blur_sigma) == (224, 11, 5.0)
    assert p.n_steps(224 * 224) == 224
    assert p.n_steps(227 * 227) == 231
    assert M.CurveProtocol(step=5).n_steps(64) == 13
    assert M.CurveProtocol(step=4).n_steps(64) == 16
    assert "224" in p.describe()
    with pytest.raises(ValueError):
        M.CurveProtocol(step=0)
    with pytest.raises(ValueError):
        M.CurveProtocol(blur_kernel=10)
    with pytest.raises(ValueError):
        M.CurveProtocol(blur_sigma=0.0)


def test_saliency_order_ties_by_raster_index():
    g = torch.Generator().manual_seed(1)
    sal = torch.randint(0, 3, (3, 6, 5), generator=g).float()
    order = M.saliency_order(sal, (6, 5))
    assert order.shape == (3, 30) and order.dtype == torch.long
    for b in range(3):
        assert order[b].tolist() == ref_order(sal[b].reshape(-1).tolist())
    const = M.saliency_order(torch.zeros(2, 3, 4), (9, 8))
    assert torch.equal(const, torch.arange(72).expand(2, 72))


def test_saliency_order_hand_case_and_b1hw():
    sal = torch.tensor([[[0.1, 0.9, 0.5], [0.9, 0.2, 0.5]]])
    assert M.saliency_order(sal, (2, 3)).tolist() == [[1, 3, 2, 5, 4, 0]]
    assert M.saliency_order(sal[:, None], (2, 3)).tolist() == [[1, 3, 2, 5, 4, 0]]
    with pytest.raises(ValueError):
        M.saliency_order(torch.full((1, 2, 2), float("nan")), (2, 2))


def ref_bilinear(vals: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Bilinear, align_corners=False, written out (source coordinate clamped at 0)."""
    in_h, in_w = len(vals), len(vals[0])

    def coord(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    out = []
    for i in range(out_h):
        y0, y1, ly = coord(i, in_h, out_h)
        row = []
        for j in range(out_w):
            x0, x1, lx = coord(j, in_w, out_w)
            top = (1 - lx) * vals[y0][x0] + lx * vals[y0][x1]
            bot = (1 - lx) * vals[y1][x0] + lx * vals[y1][x1]
            row.append((1 - ly) * top + ly * bot)
        out.append(row)
    return out


def test_saliency_order_upsamples_bilinearly():
    g = torch.Generator().manual_seed(2)
    sal = torch.rand(2, 5, 7, generator=g, dtype=torch.float64)
    order = M.saliency_order(sal, (12, 20))
    for b in range(2):
        ref = ref_bilinear(sal[b].tolist(), 12, 20)
        flat = [v for row in ref for v in row]
        ordered = [flat[i] for i in order[b].tolist()]
        assert sorted(order[b].tolist()) == list(range(240))
        assert all(a >= c - 1e-12 for a, c in zip(ordered[:-1], ordered[1:], strict=True))


def test_deletion_substrate_is_mean_colour():
    model = tiny_conv_model()
    images = torch.rand(2, 3, 8, 9)
    sub = M.deletion_substrate(model, images)
    assert sub.shape == images.shape
    assert torch.allclose(sub, model.mean.view(1, 3, 1, 1).expand_as(images))
    assert torch.allclose(model.normalize(sub), torch.zeros_like(sub), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_insertion_substrate_matches_loop_blur(dtype, tol):
    model = tiny_conv_model(dtype)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 13, 16, generator=g).to(dtype)
    sub = M.insertion_substrate(model, images, M.CurveProtocol())
    assert sub.dtype == dtype and sub.shape == images.shape
    for b in range(2):
        ref = ref_blur_pixels(images[b], model.mean.double(), model.std.double(), 11, 5.0)
        assert torch.allclose(sub[b].double(), ref, atol=tol, rtol=0)


def test_insertion_substrate_constant_image_zero_padding():
    model = tiny_conv_model(torch.float64)
    c = 0.9
    images = torch.full((1, 3, 16, 16), c, dtype=torch.float64)
    sub = M.insertion_substrate(model, images, M.CurveProtocol())
    mean = model.mean.double()
    # Interior (>= 5 px from the border): the kernel sums to 1, so the value is unchanged.
    assert torch.allclose(sub[0, :, 5:11, 5:11], images[0, :, 5:11, 5:11], atol=1e-7)
    # Corner: only the kernel's lower-right quarter sees the image; the rest sees zeros
    # in normalised space, i.e. the mean colour.
    g = M.rise_kernel1d(11, 5.0)
    w = float(g[5:].sum()) ** 2
    expected = mean + (c - mean) * w
    assert torch.allclose(sub[0, :, 0, 0], expected, atol=1e-7)  # the kernel is float32
    # An image equal to the mean colour is left alone.
    flat = mean.view(1, 3, 1, 1).expand(1, 3, 16, 16).clone()
    assert torch.allclose(M.insertion_substrate(model, flat), flat, atol=1e-12)


@pytest.mark.parametrize("k,sigma", [(11, 5.0), (7, 1.5), (5, 3.0), (21, 2.0)])
def test_insertion_kernel_equals_rise_gkern(k, sigma):
    """RISE's kernel folds the Gaussian's tails back in (reflect mode, truncate 4): for
    gkern(11, 5) the corner is 0.0077 against the centre's 0.0088, nearly flat, where the
    truncated, renormalised sampled Gaussian has 0.0044 against 0.0120."""
    g = M.rise_kernel1d(k, sigma)
    ours = (g[:, None] * g[None, :]).float().numpy()
    assert np.abs(ours - scipy_gkern(k, sigma)).max() <= 1e-7


# --------------------------------------------------------------------------------------
# Curves against the slow reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("tied", [False, True])
def test_curves_match_slow_reference(dtype, tol, mode, tied):
    model = tiny_conv_model(dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    b, h, w, step = 2, 16, 16, 7
    images = torch.rand(b, 3, h, w, generator=g).to(dtype)
    if tied:
        sal = torch.randint(0, 4, (b, h, w), generator=g).to(dtype)
    else:
        sal = torch.rand(b, h, w, generator=g).to(dtype)
    targets = torch.tensor([1, 3])
    proto = M.CurveProtocol(step=step)
    curves = M.perturbation_curves(
        model, images, sal, targets, mode=mode, protocol=proto, eval_batch_size=9
    )
    n = proto.n_steps(h * w)
    assert curves.shape == (b, n + 1)
    assert curves.dtype == dtype
    for i in range(b):
        ref = torch.tensor(
            ref_curve(model, images[i], sal[i], int(targets[i]), mode, step), dtype=torch.float64
        )
        assert ref.max() - ref.min() > 0.05  # the curve actually moves: a meaningful check
        assert torch.allclose(curves[i].double(), ref, atol=tol, rtol=0)


def test_curves_low_res_saliency_equal_pre_upsampled_and_ends():
    model = tiny_conv_model(torch.float64, seed=6)
    g = torch.Generator().manual_seed(7)
    images = torch.rand(3, 3, 12, 20, generator=g, dtype=torch.float64)
    low = torch.rand(3, 5, 7, generator=g, dtype=torch.float64)
    full = F.interpolate(low[:, None], size=(12, 20), mode="bilinear", align_corners=False)[:, 0]
    targets = [0, 2, 4]
    proto = M.CurveProtocol(step=11)
    for mode in ("deletion", "insertion"):
        a = M.perturbation_curves(model, images, low, targets, mode=mode, protocol=proto)
        b = M.perturbation_curves(model, images, full, targets, mode=mode, protocol=proto)
        c = M.perturbation_curves(model, images, low[:, None], targets, mode=mode, protocol=proto)
        assert torch.equal(a, b) and torch.equal(a, c)
        assert a.shape == (3, 23)  # ceil(240 / 11) = 22 steps
        with torch.no_grad():
            p_img = torch.softmax(model(images), 1)[range(3), targets]
            if mode == "deletion":
                p_end = torch.softmax(model(M.deletion_substrate(model, images)), 1)
                assert torch.allclose(a[:, 0], p_img, atol=1e-12)
                assert torch.allclose(a[:, -1], p_end[range(3), targets], atol=1e-12)
            else:
                p_start = torch.softmax(model(M.insertion_substrate(model, images, proto)), 1)
                assert torch.allclose(a[:, 0], p_start[range(3), targets], atol=1e-12)
                assert torch.allclose(a[:, -1], p_img, atol=1e-12)


def test_curves_do_not_depend_on_eval_batch_size():
    model = tiny_conv_model(torch.float64, seed=8)
    g = torch.Generator().manual_seed(9)
    images = torch.rand(3, 3, 10, 10, generator=g, dtype=torch.float64)
    sal = torch.rand(3, 4, 4, generator=g, dtype=torch.float64)
    proto = M.CurveProtocol(step=9)
    runs = [
        M.perturbation_curves(
            model, images, sal, [1, 1, 0], mode="insertion", protocol=proto, eval_batch_size=e
        )
        for e in (1, 7, 1000)
    ]
    for r in runs[1:]:
        assert torch.allclose(r, runs[0], atol=1e-12, rtol=0)
    # Alone or in a batch: the same curve.
    alone = M.perturbation_curves(
        model, images[1:2], sal[1:2], [1], mode="insertion", protocol=proto
    )
    assert torch.allclose(alone[0], runs[0][1], atol=1e-12, rtol=0)


def test_curves_default_protocol_at_224_has_225_scores():
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    model = Wrapped(net).eval()
    images = torch.rand(1, 3, 224, 224)
    sal = torch.rand(1, 28, 28)
    curves = M.perturbation_curves(model, images, sal, [2], mode="deletion")
    assert curves.shape == (1, 225)
    curves[0, 0] = 0.0  # an ordinary tensor, not an inference tensor


def test_curves_reject_bad_arguments():
    model = tiny_conv_model()
    images = torch.rand(2, 3, 8, 8)
    sal = torch.rand(2, 8, 8)
    with pytest.raises(ValueError):
        M.perturbation_curves(model, images, sal, [0, 1], mode="del")
    with pytest.raises(ValueError):
        M.perturbation_curves(model, images, sal[:1], [0, 1], mode="deletion")
    with pytest.raises(ValueError):
        M.perturbation_curves(model, images, sal, [0], mode="deletion")


# --------------------------------------------------------------------------------------
# Hand case: probability = fraction of a region still intact
# --------------------------------------------------------------------------------------


def _region_setup():
    h = w = 8
    region = torch.zeros(h, w, dtype=torch.bool)
    region[2:5, 3:7] = True  # 12 pixels
    images = torch.full((1, 3, h, w), 0.3, dtype=torch.float64)
    images[0, :, region] = 1.0
    perfect = region.double()[None]
    reverse = 1.0 - perfect
    return RegionModel(region), images, perfect, reverse


def test_hand_case_curves_and_auc():
    model, images, perfect, reverse = _region_setup()
    proto = M.CurveProtocol(step=5)
    n = proto.n_steps(64)
    assert n == 13
    done = [min(5 * k, 64) for k in range(n + 1)]  # pixels changed at each step
    region_first = [min(d, 12) / 12 for d in done]
    region_last = [max(0, d - 52) / 12 for d in done]

    expect = {
        ("deletion", "perfect"): [1 - f for f in region_first],
        ("deletion", "reverse"): [1 - f for f in region_last],
        ("insertion", "perfect"): region_first,
        ("insertion", "reverse"): region_last,
    }
    got = {}
    for mode in ("deletion", "insertion"):
        for name, sal in (("perfect", perfect), ("reverse", reverse)):
            c = M.perturbation_curves(model, images, sal, [0], mode=mode, protocol=proto)
            assert torch.allclose(
                c[0], torch.tensor(expect[mode, name], dtype=torch.float64), atol=1e-9, rtol=0
            ), (mode, name, c)
            got[mode, name] = float(M.auc(c)[0])

    # Perfect deletion by hand: 1, 7/12, 2/12, then zeros -> (sum - 1/2 - 0) / 13.
    assert got["deletion", "perfect"] == pytest.approx((1 + 7 / 12 + 2 / 12 - 0.5) / 13, abs=1e-9)
    assert got["deletion", "perfect"] < got["deletion", "reverse"]
    assert got["insertion", "perfect"] > got["insertion", "reverse"]


# --------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------


def test_auc_hand_values():
    assert float(M.auc(torch.tensor([1.0, 0.5, 0.0]))) == pytest.approx(0.5)
    assert float(M.auc(torch.tensor([1.0, 1.0, 1.0, 1.0]))) == pytest.approx(1.0)
    assert float(M.auc(torch.tensor([0.0, 1.0, 0.0]))) == pytest.approx(0.5)
    batch = torch.tensor([[0.2, 0.4], [1.0, 0.0], [0.0, 0.3]])
    assert torch.allclose(M.auc(batch), torch.tensor([0.3, 0.5, 0.15]))
    # Trapezoid on x in [0, 1] agrees with numpy.
    s = np.random.default_rng(0).random((4, 17))
    expect = (
        np.trapezoid(s, dx=1 / 16, axis=1)
        if hasattr(np, "trapezoid")
        else np.trapz(s, dx=1 / 16, axis=1)
    )
    assert np.allclose(M.auc(torch.from_numpy(s)).numpy(), expect)
    with pytest.raises(ValueError):
        M.auc(torch.tensor([1.0]))


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


def test_center_saliency():
    c = M.center_saliency(3, (9, 13))
    assert c.shape == (3, 9, 13) and c.dtype == torch.float32
    assert torch.equal(c, M.center_saliency(3, (9, 13)))
    assert torch.equal(c[0], c[2])
    assert int(c[0].argmax()) == 4 * 13 + 6  # the centre pixel of an odd-sized map
    assert torch.allclose(c[0], c[0].flip(0)) and torch.allclose(c[0], c[0].flip(1))
    assert c.max() == pytest.approx(1.0)
    # sigma_fraction = 0.25: one sigma from the centre along the width -> exp(-1/2).
    c2 = M.center_saliency(1, (1, 5), sigma_fraction=0.25)  # u = -0.4 .. 0.4
    assert c2[0, 0, 0].item() == pytest.approx(math.exp(-(0.4**2) / (2 * 0.25**2)))
    assert torch.allclose(
        M.center_saliency(1, (28, 28), 0.1)[0], M.center_saliency(1, (28, 28), 0.1)[0].T
    )


def test_random_saliency_reproducible_per_image():
    a = M.random_saliency([3, 7, 9], (5, 6), seed=1)
    assert a.shape == (3, 5, 6) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert torch.equal(a, M.random_saliency([3, 7, 9], (5, 6), seed=1))
    assert torch.equal(a[1], M.random_saliency([7], (5, 6), seed=1)[0])
    assert torch.equal(a[2], M.random_saliency([9, 3], (5, 6), seed=1)[0])
    assert torch.equal(a, M.random_saliency(torch.tensor([3, 7, 9]), (5, 6), seed=1))
    assert torch.equal(a[0], M.random_saliency([np.int64(3)], (5, 6), seed=1)[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, M.random_saliency([3, 7, 9], (5, 6), seed=2))
    s = M.random_saliency(["ILSVRC2012_val_00000001.JPEG"], (4, 4), seed=0)
    assert torch.equal(s, M.random_saliency(["ILSVRC2012_val_00000001.JPEG"], (4, 4), seed=0))
    # Independent of the global RNG.
    torch.manual_seed(123)
    assert torch.equal(a, M.random_saliency([3, 7, 9], (5, 6), seed=1))
    assert M.random_saliency([], (2, 2)).shape == (0, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny_conv_model(torch.float64, seed=10)
    g = torch.Generator().manual_seed(11)
    images = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    sal = torch.randint(0, 3, (2, 8, 8), generator=g).double()
    proto = M.CurveProtocol(step=13)
    for mode in ("deletion", "insertion"):
        cpu = M.perturbation_curves(model, images, sal, [0, 1], mode=mode, protocol=proto)
        gpu = M.perturbation_curves(
            model.cuda(), images.cuda(), sal, [0, 1], mode=mode, protocol=proto, eval_batch_size=5
        )
        model.cpu()
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-10)
    ties = torch.zeros(1, 6, 9, device="cuda")
    ties[0, 2, 5] = ties[0, 1, 7] = 1.0
    assert pointing_points(ties, [(9, 6)]).tolist() == [[7.0, 1.0]]
    assert torch.equal(
        M.saliency_order(sal.cuda(), (16, 16)).cpu(), M.saliency_order(sal, (16, 16))
    )


def test_curves_refuse_maps_that_would_be_stretched_over_their_images():
    model = tiny_conv_model()
    images, targets = torch.rand(2, 3, 16, 24), [0, 1]
    with pytest.raises(ValueError, match=r"saliency maps of 4×4 do not fit images of 16×24"):
        M.perturbation_curves(model, images, torch.rand(2, 4, 4), targets, mode="deletion")
    with pytest.raises(ValueError, match="1 saliency maps for 2 images"):
        M.perturbation_curves(model, images, torch.rand(1, 16, 24), targets, mode="deletion")
    curves = M.perturbation_curves(model, images, torch.rand(2, 2, 3), targets, mode="deletion")
    assert curves.shape[0] == 2 and bool(torch.isfinite(curves).all())
