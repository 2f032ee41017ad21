"""How alike two saliency maps are: the measures of the model-randomisation sanity check
(Adebayo et al., NeurIPS 2018) and of repeatability.

Each function takes two stacks of maps B×H×W (any real values) and returns B numbers, one
per pair; a pair with a constant map has no correlation and gets NaN.

- `spearman`: Spearman's rank correlation of the flattened maps, ties at their average rank
  (scipy.stats.spearmanr's rule, which Quantus's `correlation_spearman` calls). In [-1, 1].
- `ssim`: the structural similarity of the two maps as images (scikit-image's
  `structural_similarity`, 7×7 window), each map divided by its largest |value| first and
  `data_range` the spread of both maps together, as Quantus's `ssim` sets it. In [-1, 1].
  Quantus's MPRT flattens each map to one row before its similarity function, so its SSIM
  slides the window along a 1-D row; here, as in the paper, the window is 2-D.
- `hog_pearson`: Pearson's r of the maps' histograms of oriented gradients (scikit-image's
  `hog`, 9 orientations, 8×8-pixel cells, 3×3-cell blocks, L2-Hys), after the same
  max-normalisation: the paper's third measure. In [-1, 1].
- `pearson`: Pearson's r of the flattened maps (repeatability).

The two max-normalised measures use each map's own maximum; Quantus divides by the maximum
of the whole batch, which ties one image's score to the others' in its batch.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

SSIM_WINDOW = 7


def _rows(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """B×H×W maps as a float64 B×H×W array."""
    array = maps.detach().cpu().double().numpy() if torch.is_tensor(maps) else np.asarray(maps)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"maps must be B×H×W, got shape {array.shape}")
    return array


def _pair(first, second) -> tuple[np.ndarray, np.ndarray]:
    a, b = _rows(first), _rows(second)
    if a.shape != b.shape:
        raise ValueError(f"the two stacks of maps differ in shape: {a.shape} and {b.shape}")
    return a, b


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of a and b (B×D each); NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norms = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / norms
    return np.where(norms > 0, np.clip(r, -1.0, 1.0), np.nan)


def pearson(first, second) -> np.ndarray:
    """Pearson's r of each pair of flattened maps: B values in [-1, 1] (NaN: a constant map)."""
    a, b = _pair(first, second)
    return _row_pearson(a.reshape(len(a), -1), b.reshape(len(b), -1))


def spearman(first, second) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps (average ranks for ties): B values."""
    a, b = _pair(first, second)
    ranks_a = rankdata(a.reshape(len(a), -1), axis=1)
    ranks_b = rankdata(b.reshape(len(b), -1), axis=1)
    return _row_pearson(ranks_a, ranks_b)


def max_normalised(maps) -> np.ndarray:
    """Each map divided by its largest |value| (an all-zero map stays zero): B×H×W."""
    array = _rows(maps)
    peak = np.abs(array).reshape(len(array), -1).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)
    return array / peak[:, None, None]


def ssim(first, second) -> np.ndarray:
    """SSIM of each pair of max-normalised maps (2-D window of 7): B values in [-1, 1];
    NaN where both maps are one constant (no data range)."""
    from skimage.metrics import structural_similarity

    a, b = _pair(first, second)
    if min(a.shape[1:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs maps of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels")
    a, b = max_normalised(a), max_normalised(b)
    values = np.full(len(a), np.nan)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        both = np.concatenate([x.ravel(), y.ravel()])
        data_range = float(both.max() - both.min())
        if data_range > 0:
            values[i] = structural_similarity(x, y, win_size=SSIM_WINDOW, data_range=data_range)
    return values


def hog_features(maps) -> np.ndarray:
    """The histogram-of-oriented-gradients vector of each max-normalised map: B×D."""
    from skimage.feature import hog

    normalised = max_normalised(maps)
    return np.stack(
        [
            hog(
                m,
                orientations=9,
                pixels_per_cell=(8, 8),
                cells_per_block=(3, 3),
                block_norm="L2-Hys",
                feature_vector=True,
            )
            for m in normalised
        ]
    )


def hog_pearson(first, second) -> np.ndarray:
    """Pearson's r of each pair of maps' HOG vectors: B values (NaN: a flat map's HOG)."""
    a, b = _pair(first, second)
    return _row_pearson(hog_features(a), hog_features(b))


def similarities(original, other) -> dict[str, np.ndarray]:
    """The sanity check's three measures of each pair: {"spearman", "ssim", "hog"} -> B."""
    return {
        "spearman": spearman(original, other),
        "ssim": ssim(original, other),
        "hog": hog_pearson(original, other),
    }


def mean_pairwise_pearson(maps) -> np.ndarray:
    """Repeatability: maps K×B×H×W (K repeats of B images) -> B means of Pearson's r over
    the K(K-1)/2 pairs of repeats (NaN pairs skipped; NaN if every pair is)."""
    stack = maps.detach().cpu().double().numpy() if torch.is_tensor(maps) else np.asarray(maps)
    if stack.ndim != 4 or stack.shape[0] < 2:
        raise ValueError(f"maps must be K×B×H×W with K >= 2 repeats, got shape {stack.shape}")
    pairs = [
        pearson(stack[i], stack[j])
        for i in range(stack.shape[0])
        for j in range(i + 1, stack.shape[0])
    ]
    table = np.stack(pairs)
    finite = np.isfinite(table)
    counts = finite.sum(axis=0)
    sums = np.where(finite, table, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
