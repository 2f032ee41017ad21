"""ROAD, Remove And Debias (Rong, Leemann, Nguyen, Fiedler, Rauschenberger, Kasneci &
Kasneci, ICML 2022), batched.

For a fraction f of the pixels, MoRF removes the f·H·W most salient pixels and LeRF the
f·H·W least salient ones; the removed pixels are filled by **noisy linear imputation** and
the model scores the filled image (softmax probability of the explained class).

Noisy linear imputation (road_evaluation's `NoisyLinearImputer`): every removed pixel i
takes the weighted mean of its 8 neighbours, direct ones weighing 1/6 and diagonal ones 1/12,
neighbours outside the image dropping out:

    D_i x_i − Σ_{removed j ∼ i} w_ij x_j = Σ_{kept k ∼ i} w_ik v_k,   D_i = Σ_{j ∼ i, in image} w_ij

one equation per removed pixel and colour, all solved together; then N(0, σ²) noise is added
to every imputed value (σ = 0.01, in pixel units: the images are in [0, 1]). The reference
solves the sparse system with scipy's `spsolve`, one image at a time on the CPU. mpbatch has
two solvers (`linear_imputation`):

* on a GPU, conjugate gradients: D − W is symmetric positive definite (diagonally dominant
  wherever a removed region touches a kept pixel), so Jacobi-preconditioned CG solves every
  image, fraction, order and colour at once on the device, W applied as a 3×3 depthwise
  convolution, started from the same problem solved at half resolution;
* on the CPU, scipy's sparse LU per image with the system built vectorised here: on 2 CPU
  cores CG needed 50-70 s an image for the 18 systems of one map (large holes converge
  slowly), the LU 2.5-3.3 s against the reference's 4.6 s (benchmarks/bench_road.py).

Fractions (road_evaluation's `ImputedDataset`): MoRF at f removes the first ⌊H·W·f⌋ pixels
of the saliency order; LeRF at f removes all but the first ⌊H·W·(1 − f)⌋ (the reference's
`th_p` for LeRF is the kept fraction, 1 − f). Where mpbatch differs on purpose:

* ties in the order go to the lower raster index (the order of deletion / insertion,
  `metrics.saliency_order`); the reference breaks them with unseeded 1e-4 noise;
* the noise comes from a generator seeded per image (`seeding.image_seed`), drawn as the
  reference draws it (a C×n block, n removed pixels in raster order), so a map's curves do
  not depend on its batch;
* the score is the explained class's probability (the reference also reports accuracy).

The area of a curve is its mean over the fractions; the gap is LeRF − MoRF (higher is better:
removing the least relevant pixels should hurt less than removing the most relevant).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix, csc_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor

from .deletion_insertion import saliency_order
from .maps import as_bhw, check_fits

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_NOISE = 0.01
ORDERS = ("morf", "lerf")
# weights of the 8 neighbours (the reference's `neighbors_weights`), as a 3×3 kernel
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def describe_road(fractions: Sequence[float] = ROAD_FRACTIONS, sigma: float = ROAD_NOISE) -> str:
    """One line naming ROAD's protocol, for the files' protocol attribute and summaries."""
    listed = ", ".join(f"{f:g}" for f in fractions)
    return (
        f"ROAD (Rong et al. 2022): MoRF and LeRF at fractions {listed} removed; noisy linear "
        f"imputation (8 neighbours, 1/6 direct, 1/12 diagonal; noise sigma {sigma:g}, seeded "
        "per image); score = softmax probability of the target; area = mean over the "
        "fractions; gap = LeRF − MoRF"
    )


def removed_pixels(saliency: Tensor, size: tuple[int, int], fraction: float, order: str) -> Tensor:
    """B×H×W bool: the pixels ROAD removes at `fraction` in `order` ("morf" or "lerf").

    saliency B×h×w (higher = more important) is ordered as `metrics.saliency_order` does;
    MoRF removes its first ⌊H·W·f⌋ pixels, LeRF all but its first ⌊H·W·(1 − f)⌋.
    """
    return _removed_by_rank(_ranks(saliency, size), size, fraction, order)


def _ranks(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """B×(H·W): each pixel's position in the saliency order (0 = most salient)."""
    h, w = int(size[0]), int(size[1])
    ranked = saliency_order(saliency, (h, w))
    positions = torch.arange(h * w, device=ranked.device).expand_as(ranked)
    return torch.empty_like(ranked).scatter_(1, ranked, positions)


def _removed_by_rank(rank: Tensor, size: tuple[int, int], fraction: float, order: str):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a ROAD fraction must be in (0, 1), got {fraction}")
    h, w = int(size[0]), int(size[1])
    if order == "morf":
        removed = rank < int(h * w * fraction)
    else:
        removed = rank >= int(h * w * (1.0 - fraction))
    return removed.view(-1, h, w)


def _neighbour_sum(values: Tensor) -> Tensor:
    """Σ_j w_ij v_j over each pixel's in-image neighbours: N×C×H×W."""
    c = values.shape[1]
    kernel = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=values.dtype, device=values.device)
    return F.conv2d(values, kernel.expand(c, 1, 3, 3), padding=1, groups=c)


def linear_imputation(
    images: Tensor,
    removed: Tensor,
    *,
    solver: str = "auto",
    tolerance: float = 1e-7,
    max_iterations: int = 20_000,
) -> Tensor:
    """The noise-free linear imputation of `images` (N×C×H×W) where `removed` (N×H×W bool).

    solver "cg": Jacobi-preconditioned conjugate gradients in float64 on the images'
    device, every (image, colour) system at once, from a coarse-to-fine start, until each
    residual is below `tolerance` times its right-hand side (or `max_iterations`);
    "direct": scipy's sparse LU, one image at a time on the CPU (the reference's solver,
    with the system built here); "auto": "cg" on a GPU, "direct" on the CPU, where
    conjugate gradients were 10× slower than scipy (benchmarks/bench_road.py).
    Kept pixels are returned unchanged. Returns the images' dtype.
    """
    if images.dim() != 4 or removed.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"removed must be N×H×W for images N×C×H×W, got {tuple(removed.shape)} for "
            f"{tuple(images.shape)}"
        )
    if solver == "auto":
        solver = "direct" if images.device.type == "cpu" else "cg"
    if solver == "direct":
        return _direct_solve(images, removed)
    if solver != "cg":
        raise ValueError(f"solver must be auto, cg or direct, got {solver!r}")
    x64 = images.to(torch.float64)
    hole = removed[:, None].to(torch.float64)
    return _solve(x64, hole, tolerance, max_iterations).to(images.dtype)


_OFFSETS = tuple(
    ((dy, dx), NEIGHBOUR_WEIGHTS[dy + 1][dx + 1])
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dy, dx) != (0, 0)
)


def _direct_solve(images: Tensor, removed: Tensor) -> Tensor:
    """linear_imputation by scipy's sparse solver, one image at a time on the CPU."""
    n, c, h, w = images.shape
    pixels = images.detach().cpu().to(torch.float64).reshape(n, c, h * w).numpy()
    holes = removed.detach().cpu().reshape(n, h * w).numpy()
    out = pixels.copy()
    for i in range(n):
        where = np.flatnonzero(holes[i])
        if not len(where):
            continue
        matrix, rhs = _system(where, holes[i], pixels[i], (h, w))
        solution = spsolve(csc_matrix(matrix), rhs)
        out[i][:, where] = np.asarray(solution).reshape(len(where), c).T
    return torch.from_numpy(out).view(n, c, h, w).to(images.dtype).to(images.device)


def _system(where: np.ndarray, hole: np.ndarray, pixels: np.ndarray, size: tuple[int, int]):
    """(D − W, W·v): the sparse matrix (k×k, COO parts) and right-hand side (k×C) of the
    removed pixels `where` (raster indices) of one image."""
    h, w = size
    k = len(where)
    variable = np.full(h * w, -1)
    variable[where] = np.arange(k)
    rows, cols, values = [], [], []
    degree = np.zeros(k)
    rhs = np.zeros((k, pixels.shape[0]))
    y, x = where // w, where % w
    for (dy, dx), weight in _OFFSETS:
        inside = (y + dy >= 0) & (y + dy < h) & (x + dx >= 0) & (x + dx < w)
        source = np.flatnonzero(inside)
        neighbour = (y[inside] + dy) * w + (x[inside] + dx)
        degree[source] += weight
        missing = hole[neighbour]
        rows.append(source[missing])
        cols.append(variable[neighbour[missing]])
        values.append(np.full(int(missing.sum()), -weight))
        rhs[source[~missing]] += weight * pixels[:, neighbour[~missing]].T
    rows.append(np.arange(k))
    cols.append(np.arange(k))
    values.append(degree)
    matrix = coo_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(k, k)
    )
    return matrix, rhs


def _solve(x64: Tensor, hole: Tensor, tolerance: float, max_iterations: int) -> Tensor:
    """The imputed N×C×H×W float64 images (`hole` N×1×H×W: 1 where removed).

    Cascadic: the problem is first solved at half the resolution (a coarse pixel is
    removed when its four pixels are; else it holds their kept pixels' mean), and that
    solution, upsampled, starts the conjugate gradients here. The coarse levels carry the
    smooth part of a large hole's fill, which plain conjugate gradients would need thousands
    of iterations to propagate; the result is the same system's solution.
    """
    degree = _neighbour_sum(torch.ones_like(hole))
    degree = torch.where(hole > 0, degree, torch.ones_like(degree))  # kept: unused, safe

    def operator(v: Tensor) -> Tensor:
        return hole * (degree * v - _neighbour_sum(hole * v))

    rhs = hole * _neighbour_sum((1.0 - hole) * x64)
    start = torch.zeros_like(x64)
    if min(x64.shape[-2:]) >= 16 and bool((hole > 0).any()):
        start = hole * _coarse_start(x64, hole, tolerance, max_iterations)
    solution = _conjugate_gradients(operator, rhs, degree, start, tolerance, max_iterations)
    return torch.where(hole > 0, solution, x64)


def _coarse_start(x64: Tensor, hole: Tensor, tolerance: float, max_iterations: int) -> Tensor:
    """The half-resolution solution, upsampled to x64's size (a starting guess)."""
    h, w = x64.shape[-2:]
    kept = 1.0 - hole
    pad = (0, w % 2, 0, h % 2)
    kept_sum = F.avg_pool2d(F.pad(kept, pad), 2, divisor_override=1)
    value_sum = F.avg_pool2d(F.pad(x64 * kept, pad), 2, divisor_override=1)
    coarse_hole = (kept_sum == 0).to(x64.dtype)
    coarse = value_sum / kept_sum.clamp_min(1.0)
    filled = _solve(coarse, coarse_hole, tolerance, max_iterations)
    return F.interpolate(filled, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w]


def _conjugate_gradients(
    operator, rhs: Tensor, diagonal: Tensor, start: Tensor, tolerance, max_iterations
):
    """Solve operator(x) = rhs for every N×C system of N×C×H×W at once from `start`
    (Jacobi preconditioner `diagonal`); systems whose right-hand side is zero stay put."""
    dims = (2, 3)
    x = start.clone()
    residual = rhs - operator(x)
    z = residual / diagonal
    direction = z.clone()
    rz = (residual * z).sum(dims, keepdim=True)
    limit = (tolerance * rhs.norm(dim=dims, keepdim=True)) ** 2
    for iteration in range(int(max_iterations)):
        if iteration % 25 == 0 and bool(((residual**2).sum(dims, keepdim=True) <= limit).all()):
            break
        applied = operator(direction)
        curvature = (direction * applied).sum(dims, keepdim=True)
        step = torch.where(curvature > 0, rz / curvature.clamp_min(1e-300), 0.0)
        x = x + step * direction
        residual = residual - step * applied
        z = residual / diagonal
        rz_next = (residual * z).sum(dims, keepdim=True)
        direction = z + torch.where(rz > 0, rz_next / rz.clamp_min(1e-300), 0.0) * direction
        rz = rz_next
    return x


def imputation_noise(
    removed: Tensor, channels: int, generators: Sequence[torch.Generator], sigma: float
) -> Tensor:
    """N×C×H×W noise, σ·N(0, 1) at removed pixels (0 elsewhere): image n draws a C×k block
    from generators[n] (k removed pixels, raster order), as the reference's
    `noise * torch.randn_like(...)` does. Drawn on the CPU in float32."""
    n, h, w = removed.shape
    noise = torch.zeros(n, channels, h * w)
    flat = removed.reshape(n, -1).cpu()
    for i in range(n):
        where = torch.nonzero(flat[i]).flatten()
        draws = torch.randn(channels, len(where), generator=generators[i])
        noise[i][:, where] = sigma * draws
    return noise.view(n, channels, h, w).to(removed.device)


def noisy_linear_imputation(
    images: Tensor,
    removed: Tensor,
    generators: Sequence[torch.Generator],
    *,
    sigma: float = ROAD_NOISE,
    solver: str = "auto",
) -> Tensor:
    """ROAD's imputation: `linear_imputation`, then `imputation_noise` on the removed
    pixels. images N×C×H×W in [0, 1], removed N×H×W bool, one generator per image."""
    filled = linear_imputation(images, removed, solver=solver)
    if sigma == 0:
        return filled
    noise = imputation_noise(removed, images.shape[1], generators, sigma)
    return filled + noise.to(filled.dtype)


def road_curves(
    model,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor,
    seeds: Sequence[int],
    *,
    fractions: Sequence[float] = ROAD_FRACTIONS,
    sigma: float = ROAD_NOISE,
    eval_batch_size: int = 64,
) -> dict[str, Tensor]:
    """MoRF and LeRF curves of one batch: {"morf": B×F, "lerf": B×F} probabilities of
    `targets` on the imputed images, F = len(fractions), on the CPU (float32).

    images B×3×H×W in [0, 1]; saliency B×h×w (higher = more important); seeds: one per image
    (its noise generator; the same image and seed give the same curves in any batch). Every
    image, fraction and order is imputed in one solve, then scored `eval_batch_size` at a
    time.
    """
    b, c, h, w = images.shape
    check_fits(as_bhw(saliency), images)
    if len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for {b} images")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rank = _ranks(saliency, (h, w))  # one sort for every fraction and order
    removed = torch.stack(
        [_removed_by_rank(rank, (h, w), f, o) for o in ORDERS for f in fractions], dim=1
    )  # B×(2F)×H×W, in each image's draw order
    removed = removed.view(b * 2 * len(fractions), h, w)
    per_system = [g for g in generators for _ in range(2 * len(fractions))]
    repeated = images.repeat_interleave(2 * len(fractions), dim=0)
    filled = noisy_linear_imputation(repeated, removed, per_system, sigma=sigma)
    scores = []
    chosen = targets.repeat_interleave(2 * len(fractions))
    with torch.inference_mode():
        for lo in range(0, len(filled), int(eval_batch_size)):
            logits = model(filled[lo : lo + int(eval_batch_size)])
            probs = logits.float().softmax(dim=1)
            scores.append(probs.gather(1, chosen[lo : lo + int(eval_batch_size), None])[:, 0])
    curves = torch.cat(scores).view(b, 2, len(fractions)).cpu()
    return {"morf": curves[:, 0].clone(), "lerf": curves[:, 1].clone()}
