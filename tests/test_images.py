"""Image decoding (every awkward file becomes an image or a one-line reason) and the
Dataset that decodes a run's images in DataLoader workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import discover
from pipeline.data.images import ImageDecodeError, ImageFolderDataset, decode_image


def make_image(path: Path, size=(8, 6), color=(200, 30, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


# ----------------------------------------------------------------------------- decoding


def test_decode_rgb_jpeg_and_sizes(tmp_path: Path) -> None:
    image, w, h = decode_image(make_image(tmp_path / "a.jpg", size=(9, 5), quality=95))
    assert (w, h) == (9, 5) and image.shape == (3, 5, 9) and image.dtype == torch.float32
    assert torch.allclose(image[:, 2, 4], torch.tensor([200, 30, 30]) / 255, atol=0.03)


def test_decode_greyscale_and_one_pixel(tmp_path: Path) -> None:
    image, w, h = decode_image(make_image(tmp_path / "g.png", size=(1, 1), color=77, mode="L"))
    assert (w, h) == (1, 1) and image.shape == (3, 1, 1)
    assert torch.allclose(image.flatten(), torch.full((3,), 77 / 255))


def test_decode_cmyk_jpeg(tmp_path: Path) -> None:
    path = make_image(tmp_path / "c.jpg", color=(0, 255, 255, 0), mode="CMYK", quality=95)
    image, _, _ = decode_image(path)
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=0.05)


def test_decode_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image, w, h = decode_image(path)
    assert (w, h) == (3, 2)
    assert torch.allclose(image[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(image[:, 0, 1], torch.ones(3))
    assert torch.allclose(image[:, 0, 2], torch.full((3,), 127 / 255), atol=1.5 / 255)


def test_decode_palette_png(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png")
    image, _, _ = decode_image(tmp_path / "p.png")
    assert torch.allclose(image[:, 1, 1], torch.tensor([10, 200, 30]) / 255)
    assert torch.allclose(image[:, 0, 0], torch.zeros(3))
    pal.save(tmp_path / "t.png", transparency=0)  # index 0 transparent -> white
    image, _, _ = decode_image(tmp_path / "t.png")
    assert torch.allclose(image[:, 0, 0], torch.ones(3))
    assert torch.allclose(image[:, 1, 1], torch.tensor([10, 200, 30]) / 255)


def test_decode_16_bit_png(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image, w, h = decode_image(path)
    assert (w, h) == (3, 1)
    assert torch.allclose(image[0, 0], torch.tensor([0.0, 0.5, 1.0]), atol=1 / 255)
    assert torch.equal(image[0], image[2])


def test_decode_large_images_are_reduced_but_report_original_size(tmp_path: Path) -> None:
    jpeg = make_image(tmp_path / "big.jpg", size=(400, 300))
    image, w, h = decode_image(jpeg, max_pixels=10_000)  # DCT draft, 1/4 scale
    assert (w, h) == (400, 300) and image.shape == (3, 75, 100)
    png = make_image(tmp_path / "big.png", size=(400, 300))
    image, w, h = decode_image(png, max_pixels=10_000)  # box reduction after decoding
    assert (w, h) == (400, 300) and image.shape[1] * image.shape[2] <= 10_000
    assert torch.allclose(image[:, 0, 0], torch.tensor([200, 30, 30]) / 255)


def test_decode_refuses_decompression_bombs(tmp_path: Path, monkeypatch) -> None:
    path = make_image(tmp_path / "bomb.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 × limit: PIL refuses
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(path)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = make_image(tmp_path / "good.jpg", size=(64, 64), quality=90).read_bytes()
    files = {
        "zero_byte": (tmp_path / "zero.jpg", "empty file"),
        "truncated": (tmp_path / "trunc.jpg", "truncated"),
        "text": (tmp_path / "text.jpg", "not a recognised image"),
        "dangling": (tmp_path / "dangling.jpg", "dangling symlink"),
        "garbage_tail": (tmp_path / "garbage.png", ""),
    }
    files["zero_byte"][0].write_bytes(b"")
    files["truncated"][0].write_bytes(good[: len(good) // 2])
    files["text"][0].write_text("this is not an image\n")
    os.symlink(tmp_path / "nowhere.jpg", files["dangling"][0])
    files["garbage_tail"][0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return files


def test_decode_failures_raise_one_line_reason(tmp_path: Path) -> None:
    for path, expected in _bad_files(tmp_path).values():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(path)
        assert expected in info.value.reason.lower() and "\n" not in info.value.reason


# ----------------------------------------------------------------------------- Dataset


def test_dataset_items_and_failures_survive_collation(tmp_path: Path) -> None:
    make_image(tmp_path / "a.jpg", size=(30, 20))
    make_image(tmp_path / "b.png", size=(7, 7), color=(0, 0, 255))
    _bad_files(tmp_path)
    samples, _ = discover(tmp_path)
    dataset = ImageFolderDataset(tmp_path, samples, size=16)
    assert len(dataset) == len(samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (len(samples), 3, 16, 16)
    assert batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["index"].tolist() == list(range(len(samples)))
    by_name = {s.path: i for i, s in enumerate(samples)}
    a, b = by_name["a.jpg"], by_name["b.png"]
    assert batch["ok"][a] and batch["error"][a] == ""
    assert (batch["width"][a].item(), batch["height"][a].item()) == (30, 20)
    blue = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(batch["image"][b], blue)
    for name in ("zero.jpg", "trunc.jpg", "text.jpg", "dangling.jpg", "garbage.png"):
        i = by_name[name]
        assert not batch["ok"][i] and batch["error"][i]
        assert batch["width"][i] == 0 and batch["height"][i] == 0
        assert batch["image"][i].abs().sum() == 0


def test_dataset_indices_select_a_subset(tmp_path: Path) -> None:
    for k in range(5):
        make_image(tmp_path / f"{k}.png", size=(3, 3), color=(k * 40, 0, 0))
    samples, _ = discover(tmp_path)
    dataset = ImageFolderDataset(tmp_path, samples, size=4, indices=[3, 4])
    assert len(dataset) == 2
    item = dataset[1]
    assert item["index"] == 4 and item["ok"]
    assert torch.allclose(item["image"][0], torch.full((4, 4), 160 / 255))
    with pytest.raises(IndexError):
        ImageFolderDataset(tmp_path, samples, indices=[5])
