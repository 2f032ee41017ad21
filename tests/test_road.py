"""ROAD (pipeline.metrics.road): which pixels go, the batched imputation against the reference's
scipy solve, the noise drawn as the reference draws it, and the MoRF/LeRF curves against the
reference's imputer composed with road_evaluation's fraction rule.

The reference is grad-cam 1.5.7's `pytorch_grad_cam/metrics/road.py`, a port of
road_evaluation's `imputations.py` (`make install` installs grad-cam without its
dependencies; only that file and its base module are loaded, with OpenCV stubbed, as the
imputer needs numpy, scipy and torch only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.road_reference import load_road_reference
from pipeline.metrics.road import (
    ROAD_FRACTIONS,
    imputation_noise,
    linear_imputation,
    noisy_linear_imputation,
    removed_pixels,
    road_curves,
)

# the reference's scipy lil_matrix code warns under numpy 2; not ours to change
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")


def _reference():
    """grad-cam's road module (benchmarks/road_reference.py), or a skip without grad-cam."""
    module = load_road_reference()
    if module is None:
        pytest.skip("grad-cam is not installed (make references adds it, without dependencies)")
    return module


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _images(n: int, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([x, y, (x + y) / 2])[None].repeat(n, 1, 1, 1)
    return (0.6 * smooth + 0.4 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


def _saliency(n: int, h: int = 20, w: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ which pixels go
def test_removed_pixels_follow_the_reference_fraction_rule():
    saliency = _saliency(2, 5, 4)
    for fraction in (0.1, 0.3, 0.7, 0.9):
        morf = removed_pixels(saliency, (5, 4), fraction, "morf")
        lerf = removed_pixels(saliency, (5, 4), fraction, "lerf")
        for i in range(2):
            order = np.argsort(-saliency[i].flatten().numpy(), kind="stable")
            expected = np.zeros(20, dtype=bool)
            expected[order[: int(20 * fraction)]] = True  # MoRF: the most salient go
            assert morf[i].flatten().numpy().tolist() == expected.tolist()
            expected = np.ones(20, dtype=bool)
            expected[order[: int(20 * (1.0 - fraction))]] = False  # LeRF: the top 1 − f stay
            assert lerf[i].flatten().numpy().tolist() == expected.tolist()


def test_removed_pixels_refuses_bad_fractions_and_orders():
    saliency = _saliency(1, 4, 4)
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
            removed_pixels(saliency, (4, 4), fraction, "morf")
    with pytest.raises(ValueError, match="order"):
        removed_pixels(saliency, (4, 4), 0.5, "both")


# ------------------------------------------------------------------ the imputation
def _keep_mask(removed: torch.Tensor) -> torch.Tensor:
    """The reference's mask: 1 where the pixel stays, 0 where it is imputed."""
    return (~removed).to(torch.float32)


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_linear_imputation_equals_the_reference_solve(reference, order, solver):
    images = _images(3)
    saliency = _saliency(3)
    imputer = reference.NoisyLinearImputer(noise=0.0)
    worst = 0.0
    for fraction in (0.1, 0.5, 0.9):
        removed = removed_pixels(saliency, (20, 24), fraction, order)
        ours = linear_imputation(images, removed, solver=solver)
        for i in range(3):
            theirs = imputer(images[i].clone(), _keep_mask(removed[i]))
            worst = max(worst, float((ours[i] - theirs).abs().max()))
            assert torch.equal(ours[i][:, ~removed[i]], images[i][:, ~removed[i]])
    assert worst < 1e-5, worst


def test_noise_is_drawn_as_the_reference_draws_it(reference):
    images = _images(2, seed=3)
    removed = removed_pixels(_saliency(2, seed=4), (20, 24), 0.4, "morf")
    seeds = [11, 12]
    ours = noisy_linear_imputation(
        images, removed, [torch.Generator().manual_seed(s) for s in seeds], sigma=0.01
    )
    imputer = reference.NoisyLinearImputer(noise=0.01)
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)  # the reference draws from torch's global generator
        theirs = imputer(images[i].clone(), _keep_mask(removed[i]))
        assert float((ours[i] - theirs).abs().max()) < 1e-5
    noise = imputation_noise(removed, 3, [torch.Generator().manual_seed(0)] * 2, 0.01)
    assert bool((noise[:, :, ~removed[0]][0] == 0).all())
    spread = float(noise[0][:, removed[0]].std())
    assert 0.007 < spread < 0.013


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_imputation_of_smooth_images(solver):
    # a constant image is filled with its constant; a linear ramp stays close to linear
    images = torch.full((1, 3, 32, 30), 0.3)
    removed = torch.zeros(1, 32, 30, dtype=torch.bool)
    removed[0, 3:29, 2:25] = True  # a large hole: the coarse-to-fine start of CG is used
    filled = linear_imputation(images, removed, solver=solver)
    torch.testing.assert_close(filled, images)
    ramp = torch.linspace(0, 1, 30).expand(1, 3, 32, 30).contiguous()
    filled = linear_imputation(ramp, removed, solver=solver)
    assert float((filled - ramp).abs().max()) < 0.02
    other = "cg" if solver == "direct" else "direct"
    torch.testing.assert_close(filled, linear_imputation(ramp, removed, solver=other))


def test_imputation_refuses_mismatched_shapes_and_unknown_solvers():
    with pytest.raises(ValueError, match="N×H×W"):
        linear_imputation(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="solver"):
        linear_imputation(torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), solver="x")


# ------------------------------------------------------------------ the curves
class _Scores(torch.nn.Module):
    """A smooth classifier whose probabilities follow the image's colours."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=generator) * 3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.stack(
            [pixels.mean((2, 3)), (pixels[:, :, :10] - pixels[:, :, 10:]).mean((2, 3))]
        ).sum(0)
        return pooled @ self.weight.T


def test_curves_equal_the_reference_imputer_with_the_reference_fraction_rule(reference):
    model = _Scores().eval()
    images, saliency = _images(2, seed=6), _saliency(2, seed=7)
    targets = torch.tensor([1, 3])
    seeds = [21, 22]
    fractions = (0.1, 0.5, 0.9)
    curves = road_curves(model, images, saliency, targets, seeds, fractions=fractions)
    imputer = reference.NoisyLinearImputer(noise=0.01)
    hw = 20 * 24
    for i in range(2):
        torch.manual_seed(seeds[i])  # one stream per image: MoRF's fractions, then LeRF's
        order = np.argsort(-saliency[i].flatten().numpy(), kind="stable")
        for name in ("morf", "lerf"):
            for k, fraction in enumerate(fractions):
                keep = torch.ones(hw)
                if name == "morf":
                    keep[order[: int(hw * fraction)]] = 0
                else:
                    keep[order[int(hw * (1.0 - fraction)) :]] = 0
                filled = imputer(images[i].clone(), keep.view(20, 24))
                with torch.no_grad():
                    prob = model(filled[None]).softmax(1)[0, targets[i]].item()
                assert curves[name][i, k].item() == pytest.approx(prob, abs=1e-4)


def test_curves_do_not_depend_on_the_batch():
    model = _Scores().eval()
    images, saliency = _images(3, seed=8), _saliency(3, seed=9)
    targets, seeds = torch.tensor([0, 1, 2]), [1, 2, 3]
    together = road_curves(model, images, saliency, targets, seeds)
    alone = road_curves(model, images[1:2], saliency[1:2], targets[1:2], seeds[1:2])
    assert together["morf"].shape == (3, len(ROAD_FRACTIONS))
    torch.testing.assert_close(together["morf"][1:2], alone["morf"], atol=1e-6, rtol=0)
    torch.testing.assert_close(together["lerf"][1:2], alone["lerf"], atol=1e-6, rtol=0)


def test_curves_refuse_maps_that_do_not_fit_and_bad_fractions():
    model = _Scores().eval()
    images, targets = _images(2, seed=8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"saliency maps of 10×6 do not fit images of 20×24"):
        road_curves(model, images, torch.rand(2, 10, 6), targets, [1, 2])
    with pytest.raises(ValueError, match="3 saliency maps for 2 images"):
        road_curves(model, images, torch.rand(3, 20, 24), targets, [1, 2])
    with pytest.raises(ValueError, match=r"in \(0, 1\), got 1.0"):
        road_curves(model, images, torch.rand(2, 5, 6), targets, [1, 2], fractions=(0.5, 1.0))
    curves = road_curves(model, images, torch.rand(2, 5, 6), targets, [1, 2], fractions=(0.5,))
    assert curves["morf"].shape == (2, 1)  # a coarse map of the images' aspect is upsampled


# ------------------------------------------------------------------ through `mpbatch run`
def test_run_with_road_reports_every_map(tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from tiny_models import TINY_OPTIONS

    from cli import main

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        pixels = rng.integers(0, 255, (30, 34, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"p{i}.png")
    out = tmp_path / "out"
    args = ["run", str(data), "-o", str(out), *TINY_OPTIONS, "--target", "predicted"]
    args += ["--iterations", "2", "--mask-size", "8", "--step", "256", "--road"]
    result = CliRunner().invoke(main, [*args, "--baselines", "center,gradcam"])
    assert result.exit_code == 0, result.output

    import pandas as pd

    from pipeline.store.reader import read_columns

    report = pd.read_csv(out / "report.csv")
    for prefix in ("", "center_", "gradcam_"):
        for name in ("road_morf_area", "road_lerf_area", "road_gap"):
            assert report[prefix + name].between(-1, 1).all(), prefix + name
        gap = report[prefix + "road_lerf_area"] - report[prefix + "road_morf_area"]
        np.testing.assert_allclose(report[prefix + "road_gap"], gap, atol=1e-6)
    columns, attrs = read_columns(out / "masks.h5")
    assert columns["road_morf_curve"].shape == (3, len(ROAD_FRACTIONS))
    np.testing.assert_allclose(
        columns["road_morf_area"], columns["road_morf_curve"].mean(1), atol=1e-6
    )
    assert "ROAD" in attrs["protocol"]["road"]
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["gradcam", "road_gap"] == pytest.approx(report["gradcam_road_gap"].mean())
    assert {"road_morf_low", "road_gap_high"} <= set(summary.columns)
    assert "ROAD gap ↑" in (out / "summary.md").read_text()
