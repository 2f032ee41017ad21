"""pipeline.metrics.similarity against independent computations (scipy, numpy by hand, Quantus)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from pipeline.metrics.similarity import (
    hog_pearson,
    max_normalised,
    mean_pairwise_pearson,
    pearson,
    similarities,
    spearman,
    ssim,
)


def _maps(seed: int, count: int = 3, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.random((count, size // 4, size // 4)).repeat(4, axis=1).repeat(4, axis=2)
    return smooth + 0.1 * rng.random((count, size, size))


def _ssim_by_hand(x: np.ndarray, y: np.ndarray, data_range: float, window: int = 7) -> float:
    """SSIM (Wang et al. 2004) with a uniform window over every full window position and
    the sample covariance, K1 = 0.01, K2 = 0.03: the mean of the SSIM map."""
    count = window * window
    values = []
    for i in range(x.shape[0] - window + 1):
        for j in range(x.shape[1] - window + 1):
            a = x[i : i + window, j : j + window].ravel()
            b = y[i : i + window, j : j + window].ravel()
            mu_a, mu_b = a.mean(), b.mean()
            var_a, var_b = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - mu_a) * (b - mu_b)).sum() / (count - 1)
            c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
            values.append(
                ((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            )
    return float(np.mean(values))


def test_spearman_and_pearson_equal_scipy_with_ties() -> None:
    a, b = _maps(0), _maps(1)
    a[:, :8] = 0.0  # ties: a rectified map's zeros
    b[:, :, :5] = 0.25
    for i in range(len(a)):
        assert spearman(a, b)[i] == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel())[0])
        assert pearson(a, b)[i] == pytest.approx(pearsonr(a[i].ravel(), b[i].ravel())[0])
    assert np.allclose(spearman(torch.from_numpy(a), torch.from_numpy(a)), 1.0)
    assert np.isnan(spearman(np.zeros((1, 8, 8)), a[:1, :8, :8])[0])  # a constant map


def test_ssim_is_the_2d_ssim_of_max_normalised_maps() -> None:
    a, b = _maps(2, count=2, size=16), _maps(3, count=2, size=16)
    b[1] *= 5.0  # a scale that max-normalisation removes
    values = ssim(a, b)
    for i in range(2):
        x, y = max_normalised(a[i : i + 1])[0], max_normalised(b[i : i + 1])[0]
        both = np.concatenate([x.ravel(), y.ravel()])
        expected = _ssim_by_hand(x, y, float(both.max() - both.min()))
        assert values[i] == pytest.approx(expected, abs=1e-9)
    assert ssim(a, 3.0 * a) == pytest.approx(1.0)
    assert np.isnan(ssim(np.ones((1, 8, 8)), np.ones((1, 8, 8)))[0])


def test_ssim_differs_from_quantus_which_flattens_each_map_to_one_row() -> None:
    """Quantus's MPRT passes maps reshaped to B×(H·W) to its `ssim`, so its window slides
    along one row; the paper's SSIM (and mpbatch's) is 2-D. Same maps, other numbers."""
    quantus = pytest.importorskip("quantus")
    a, b = _maps(4, count=2, size=16), _maps(5, count=2, size=16)
    na, nb = max_normalised(a), max_normalised(b)
    flat = quantus.ssim(na.reshape(2, -1), nb.reshape(2, -1), batched=True)
    ours = ssim(a, b)
    assert np.all(np.abs(np.asarray(flat) - ours) > 0.01)


def test_hog_pearson_is_one_for_alike_maps_and_lower_for_others() -> None:
    a, b = _maps(6, count=2, size=32), _maps(7, count=2, size=32)
    assert np.allclose(hog_pearson(a, 2.0 * a), 1.0)
    assert np.all(hog_pearson(a, b) < 0.9)
    from skimage.feature import hog

    features = [hog(m, pixels_per_cell=(8, 8), cells_per_block=(3, 3)) for m in max_normalised(a)]
    other = [hog(m, pixels_per_cell=(8, 8), cells_per_block=(3, 3)) for m in max_normalised(b)]
    expected = [pearsonr(f, g)[0] for f, g in zip(features, other, strict=True)]
    np.testing.assert_allclose(hog_pearson(a, b), expected, atol=1e-9)
    assert set(similarities(a, b)) == {"spearman", "ssim", "hog"}


def test_mean_pairwise_pearson_by_hand() -> None:
    stack = np.stack([_maps(s, count=2, size=8) for s in (10, 11, 12)])  # K=3, B=2
    for image in range(2):
        pairs = [
            np.corrcoef(stack[i, image].ravel(), stack[j, image].ravel())[0, 1]
            for i, j in ((0, 1), (0, 2), (1, 2))
        ]
        assert mean_pairwise_pearson(stack)[image] == pytest.approx(np.mean(pairs))
    assert np.allclose(mean_pairwise_pearson(np.stack([stack[0]] * 3)), 1.0)
    with pytest.raises(ValueError, match="K >= 2"):
        mean_pairwise_pearson(stack[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        pearson(stack[0], stack[0, :, :4])
