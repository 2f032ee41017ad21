"""Image decoding for a night's run: any file a folder of photos may hold becomes an RGB
float tensor or a one-line reason, never an exception that stops the run; and the torch
Dataset that decodes and resizes a run's images in DataLoader workers.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import one_line
from .datasets import Sample

# Decoded images above this many pixels are reduced (JPEG: DCT-domain draft at 1/2, 1/4 or
# 1/8 scale while decoding; other formats: box reduction after decoding) before becoming a
# float tensor. 4096² is larger than any ImageNet image and keeps a float copy under 200 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageDecodeError(Exception):
    """An image could not be decoded; `reason` is one line, without the path."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- decoding

_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def decode_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, int, int]:
    """Open an image file as RGB float32 3×H×W in [0, 1]; returns (tensor, width, height).

    Greyscale is repeated to 3 channels, CMYK/YCbCr/palette are converted, 16-bit data is
    scaled from [0, 65535], and alpha (also palette/tRNS transparency) is composited over
    white. ICC profiles and EXIF orientation are ignored (pixels as stored, which is what
    ImageNet boxes refer to); multi-frame files give their first frame. Images larger than
    `max_pixels` come back reduced (JPEG by DCT scaling while decoding, so a 12000×9000 photo
    never exists at full size in memory); width/height are always the ORIGINAL size. Images
    beyond PIL's decompression-bomb limit are refused. Raises ImageDecodeError on failure.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageDecodeError("dangling symlink" if os.path.islink(name) else "file not found")
    if os.path.isdir(name):
        raise ImageDecodeError("is a directory, not an image file")
    try:
        if os.path.getsize(name) == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings, odd EXIF, palette transparency
            with Image.open(name) as img:
                width, height = img.size
                if width < 1 or height < 1:
                    raise ImageDecodeError(f"invalid image size {width}x{height}")
                rgb = _to_rgb(img, max_pixels)
    except ImageDecodeError:
        raise
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            "image too large (over PIL's decompression-bomb limit of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not a recognised image (unknown format or corrupt header)"
        ) from None
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageDecodeError(f"cannot decode ({type(exc).__name__}: {one_line(exc)})") from None
    array = np.array(rgb, dtype=np.uint8)  # H×W×3, writable copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return tensor.to(torch.float32).div_(255.0), width, height


def _to_rgb(img: Image.Image, max_pixels: int) -> Image.Image:
    """Decode `img` (lazy PIL image) into an 8-bit RGB image of at most ~max_pixels."""
    width, height = img.size
    if img.format == "JPEG" and width * height > max_pixels:
        factor = 1
        while factor < 8 and (width // factor) * (height // factor) > max_pixels:
            factor *= 2
        img.draft(None, (max(1, width // factor), max(1, height // factor)))
    img.load()
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _high_bit_depth_to_l(img)
    elif mode == "P" or (mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = img.size[0] * img.size[1]
    if pixels > max_pixels:
        img = img.reduce(math.ceil(math.sqrt(pixels / max_pixels)))
    return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale (assumed range 0..65535) or float (assumed 0..1) → 8-bit L."""
    array = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(array.astype(np.float64), 0.0, 65535.0) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize 3×H×W (or B×3×H×W) in [0,1] to size×size: bilinear with antialiasing, aspect
    ratio ignored (this project's ImageNet evaluation convention)."""
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        x = x.clamp_(0.0, 1.0)
    return x if batched else x.squeeze(0)


# --------------------------------------------------------------------------- the Dataset


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decoded, resized images of `samples` (optionally only those at `indices`).

    Item i is a dict: "index" (position in `samples`), "image" (float32 3×size×size in [0,1],
    zeros on failure), "width"/"height" (original size, 0 on failure), "ok" (bool) and
    "error" ("" or the one-line reason). A bad image never raises, so a batch survives it.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        samples: list[Sample],
        size: int = 224,
        indices: Sequence[int] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.root = os.fspath(root)
        self.samples = samples
        self.size = int(size)
        if indices is None:
            self.indices: list[int] = list(range(len(samples)))
        else:
            self.indices = [int(i) for i in indices]
            bad = [i for i in self.indices if not 0 <= i < len(samples)]
            if bad:
                raise IndexError(f"indices out of range for {len(samples)} samples: {bad[:5]}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        sample = self.samples[index]
        path = os.path.join(self.root, *sample.path.split("/"))
        try:
            if sample.unusable:
                raise ImageDecodeError(sample.unusable)
            image, width, height = decode_image(path)
            image = resize_image(image, self.size)
            ok, error = True, ""
        except ImageDecodeError as exc:
            image = torch.zeros(3, self.size, self.size)
            width = height = 0
            ok, error = False, exc.reason
        return {
            "index": index,
            "image": image,
            "width": width,
            "height": height,
            "ok": ok,
            "error": error,
        }
