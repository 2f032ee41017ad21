from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pipeline.reports.pictures import (
    ALPHA,
    CMAP,
    curve_auc,
    curves_figure,
    saliency_overlay,
    saliency_panel,
    thumbnails,
    upsample_bilinear,
)
from pipeline.reports.writer import save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((3, h, w)).astype(np.float32)


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking signature and IHDR CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc
    width, height = struct.unpack(">II", body[:8])
    return width, height


def test_panel_has_three_panels_and_a_colorbar():
    img = _image()
    fig = saliency_panel(img, img * 0.5, np.random.rand(48, 64), "cat → tabby")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4  # image, perturbed, saliency overlay, colorbar
    assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "perturbed", "saliency"]
    assert fig.get_suptitle() == "cat → tabby"
    assert len(fig.axes[2].get_images()) == 2  # the image and the heatmap over it


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (1, 1, 7, 9), (48, 64), (200, 10)])
def test_panel_upsamples_saliency_of_any_resolution(shape):
    img = _image()
    fig = saliency_panel(img, img, np.random.rand(*shape), "t")
    heat = fig.axes[2].get_images()[1].get_array()
    assert heat.shape == (48, 64)


def test_panel_accepts_hwc_and_torch_tensors():
    img = torch.rand(3, 30, 40, requires_grad=True)
    sal = torch.rand(1, 1, 28, 28)
    fig = saliency_panel(img, img.detach().permute(1, 2, 0).numpy(), sal, "t")
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (30, 40, 3)
    np.testing.assert_allclose(shown, img.detach().permute(1, 2, 0).numpy(), atol=1e-6)


def test_panel_constant_saliency_and_greyscale():
    img = np.full((1, 20, 20), 0.5)
    fig = saliency_panel(img, img, np.zeros((5, 5)), "flat")
    assert len(fig.axes) == 4


def test_panel_rejects_mismatched_perturbed():
    with pytest.raises(ValueError):
        saliency_panel(_image(48, 64), _image(32, 32), np.zeros((28, 28)), "t")


def test_upsample_matches_torch_bilinear():
    rng = np.random.default_rng(1)
    for h, w, out in [(28, 28, (224, 224)), (7, 5, (48, 64)), (50, 40, (20, 30)), (1, 1, (3, 4))]:
        a = rng.random((h, w))
        ref = F.interpolate(
            torch.from_numpy(a)[None, None], size=out, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(upsample_bilinear(a, out), ref, atol=1e-10)


def test_save_figure_writes_png(tmp_path):
    img = _image(60, 90)
    fig = saliency_panel(img, img, np.random.rand(28, 28), "t")
    path = tmp_path / "sub" / "panel.png"
    save_figure(fig, path)
    data = path.read_bytes()
    assert len(data) > 10_000  # three image panels, not a blank canvas
    width, height = _png_size(data)
    assert width > 300 and height > 200
    assert len(fig.axes) == 0  # closed: contents released


def test_save_figure_does_not_leak_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    save_figure(fig, tmp_path / "p.png")
    assert len(plt.get_fignums()) == before
    assert _png_size((tmp_path / "p.png").read_bytes())[0] > 0


def test_visualize_does_not_import_pyplot():
    import subprocess

    code = "import sys, pipeline.reports.pictures; print('matplotlib.pyplot' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"


def test_curve_auc_trapezoid():
    assert curve_auc(np.ones(225)) == pytest.approx(1.0)
    assert curve_auc(np.linspace(1, 0, 101)) == pytest.approx(0.5)
    assert curve_auc([0.0, 1.0, 0.0]) == pytest.approx(0.5)
    y = np.random.default_rng(2).random(57)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    assert curve_auc(y) == pytest.approx(trapezoid(y, np.linspace(0, 1, 57)))


def test_curves_figure_two_axes_and_auc_legend(tmp_path):
    x = np.linspace(0, 1, 225)
    curves = {
        "mp": (np.exp(-5 * x), 1 - np.exp(-5 * x)),
        "center": (torch.tensor(1 - x), np.sqrt(x)[::2]),  # tensors and other lengths are fine
    }
    fig = curves_figure(curves, title="sample")
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["deletion", "insertion"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == f"mp (AUC {curve_auc(np.exp(-5 * x)):.3f})"
    assert labels[1] == "center (AUC 0.500)"
    assert len(fig.axes[1].get_lines()) == 2
    save_figure(fig, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5_000


def test_curves_figure_empty_and_bad_input():
    assert len(curves_figure({}).axes) == 2
    with pytest.raises(ValueError):
        curves_figure({"m": (np.ones(5),)})
    with pytest.raises(ValueError):
        curves_figure({"m": (np.ones(1), np.ones(5))})


# ------------------------------------------------------------------ thumbnails
def test_saliency_overlay_is_normalised_per_map():
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


def test_thumbnails_of_one_image_share_a_size_and_overlay_each_map():
    image = np.random.default_rng(3).random((30, 40, 3))
    maps = {"method": np.eye(5), "gradcam": np.ones((3, 3))}
    pictures = thumbnails(image, image * 0.5, maps, thumb_size=20)
    assert list(pictures) == ["image", "perturbed", "map:method", "map:gradcam"]
    assert {p.shape for p in pictures.values()} == {(15, 20, 3)}
    assert all(p.dtype == np.uint8 for p in pictures.values())
    # a constant map is drawn as the colour map's lowest colour over the image
    base = pictures["image"].astype(np.float64) / 255.0
    colour = np.asarray(matplotlib.colormaps[CMAP](0.0)[:3])
    expected = np.round(255 * ((1 - ALPHA) * base + ALPHA * colour))
    assert np.abs(pictures["map:gradcam"].astype(float) - expected).max() <= 1.0
