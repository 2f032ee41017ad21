"""Regenerate examples/val/*.JPEG from the photos bundled with scikit-image.

Run from the repository root: `python examples/make_examples.py` (needs scikit-image and
Pillow; not a dependency of mpbatch). Photos are kept at their native size; the greyscale
`camera` photo is written as RGB with three equal channels. The boxes in
LOC_val_solution.csv are in pixels of these files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")


def main(out: Path = Path(__file__).parent / "val") -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        a = getattr(data, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        Image.fromarray(a).save(out / f"{name}.JPEG", quality=95)


if __name__ == "__main__":
    main()
