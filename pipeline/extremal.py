"""Batched extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019, arXiv 1910.08485).

For an image x (pixels in [0, 1]), a classifier f, a target class c and an area a ∈ (0, 1), an
extremal perturbation is a smooth mask m (values in [0, 1], high = salient) of area a that
maximises a reward:

    preserve:  Φ(f(x ⊙ m))                    keep the mask, blur the rest
    delete:   −Φ(f(x ⊙ (1 − m)))              blur the mask
    dual:      Φ(f(x ⊙ m)) − Φ(f(x ⊙ (1 − m)))  both

where x ⊙ m is the mask-dependent blur of perturbations.apply_blur_pyramid (m = 1 the pixel as
it is, m = 0 the strongest blur) and Φ is the target's logit ("simple") or the target's logit
minus the best other logit ("contrastive"). The area is imposed with a ranking penalty: the
sorted mask values are pulled towards a vector of (1 − a)·HW zeros followed by a·HW ones,

    loss(m) = −reward(m) + λ_t · mean((sort(m) − r_a)²),   λ_t = λ_0 · g^t,

with a weight that grows geometrically over the iterations t (λ_0 = 300, g = 1.0035: the
published code's schedule, ×16 over 800 iterations).

The mask is a smooth-max combination of parameters p_i ∈ [0, 1] on a coarse grid (stride
`step` pixels): m(u) = smax_i k(|u − u_i|) p_i over the grid points u_i near pixel u, with the
published kernel k(d) = exp(−2 · max(d/σ − 1/2, 0)²) (flat within σ/2, then Gaussian) and
smax_T(v) = Σ v softmax(v / T), T = `smooth` (T = 0: a plain max). Masks can only be unions of
σ-sized blobs, which is what keeps them smooth.

Batching: all B images × A areas are B·A masks in one parameter tensor with one optimiser
(SGD with momentum, elementwise). The total loss is the sum of per-mask losses and nothing
couples masks, so image b's masks are the same whether it is optimised alone or in a batch of
64. The published jitter (a horizontal flip on even iterations) is deterministic; nothing
here draws random numbers, and the per-image seeds are checked and kept for interface parity
with optimize.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .perturbations import apply_blur_pyramid, blur_pyramid, gaussian_blur

VARIANTS = ("preserve", "delete", "dual")
REWARDS = ("simple", "contrastive")


@dataclass(frozen=True)
class ExtremalSettings:
    """Every hyperparameter of extremal perturbations; defaults follow TorchRay's published code.

    areas:          target mask areas, fractions of the image (TorchRay's VOC benchmark:
                    0.025, 0.05, 0.1, 0.2).
    iterations, lr, momentum, dampening: SGD (TorchRay: 800, 0.01, 0.9 and dampening 0.9, so
                    a step is lr × the running mean of the gradients).
    variant:        "preserve" | "delete" | "dual".
    reward:         "simple" (target logit) | "contrastive" (target logit − best other logit).
    smooth:         temperature of the smooth max over grid points (TorchRay's coldness 20 =
                    0.05); 0 gives a plain max.
    step:           stride of the parameter grid in pixels (7 → 32×32 parameters at 224²).
    sigma:          kernel size σ in pixels (TorchRay: 21 = 3·step).
    max_blur_sigma, pyramid_levels: the blur pyramid (σ_max 20, 8 levels).
    area_weight, area_weight_growth: λ_0 and its per-iteration factor g (300, 1.0035).
    jitter:         flip the perturbed images horizontally on even iterations (TorchRay).
    mask_size:      side of the returned masks (area-averaged from image resolution); 56 at
                    224² input = 4×4 pixel cells; 0 keeps the image resolution.
    seed:           run seed (image seeds come from seeding.image_seed(seed, key)).
    """

    areas: tuple[float, ...] = (0.05, 0.1, 0.2)
    iterations: int = 800
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    variant: str = "preserve"
    reward: str = "simple"
    smooth: float = 0.05
    step: int = 7
    sigma: float = 21.0
    max_blur_sigma: float = 20.0
    pyramid_levels: int = 8
    area_weight: float = 300.0
    area_weight_growth: float = 1.0035
    jitter: bool = True
    mask_size: int = 56
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if not self.areas or not all(0.0 < a < 1.0 for a in self.areas):
            raise ValueError(f"areas must be fractions in (0, 1), got {self.areas}")
        if self.step < 1 or self.sigma <= 0 or self.smooth < 0:
            raise ValueError("step must be ≥ 1, sigma > 0 and smooth ≥ 0")

    def replace(self, **changes) -> ExtremalSettings:
        """A copy with some fields changed; None values are ignored (unset CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "areas" in changes:
            changes["areas"] = tuple(float(a) for a in changes["areas"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ExtremalResult:
    """Output of extremal_masks for B images and A areas.

    masks:    B×A×s×s float32 in [0, 1] (s = settings.mask_size, area-averaged; image size if 0);
              high = salient (kept by preserve, blurred by delete). At s = 56 and 3 areas:
              3·56·56·4 = 37,632 bytes per image (1.9 GB for 50,000 images; half in float16).
    params:   B×A×h×w float32 in [0, 1], the grid parameters (h = ⌈H/step⌉; 12,288 bytes per
              image at 224², 3 areas); render_masks(params, (H, W), settings) rebuilds the
              full-resolution masks exactly.
    rewards:  B×A, the final objective (higher is better for every variant).
    preserved: B×A, the reward function Φ on the image blurred outside the mask.
    deleted:  B×A, Φ on the image blurred inside the mask.
    area_loss: B×A, the final mean((sort(m) − r_a)²) (without its weight).
    """

    masks: torch.Tensor
    params: torch.Tensor
    rewards: torch.Tensor
    preserved: torch.Tensor
    deleted: torch.Tensor
    area_loss: torch.Tensor


# ----------------------------------------------------------------------------- mask generator
def grid_shape(size: tuple[int, int], step: int) -> tuple[int, int]:
    """The parameter grid (h, w) = (⌈H/step⌉, ⌈W/step⌉) for images of size (H, W)."""
    return math.ceil(size[0] / step), math.ceil(size[1] / step)


def mask_kernel(distance: torch.Tensor, sigma: float) -> torch.Tensor:
    """The published smooth-mask kernel: 1 within σ/2, then exp(−2 (d/σ − 1/2)²)."""
    return torch.exp(-2.0 * (distance / sigma - 0.5).clamp(min=0.0) ** 2)


def _axis_neighbours(length: int, cells: int, step: int, radius: int, device) -> tuple:
    """For each pixel along one axis: indices of the 2·radius + 1 nearest grid points in the
    zero-padded grid (length × K1, long) and the signed pixel distances to them (float).

    Grid point i sits at offset + step·i, the grid centred on the image."""
    offset = (length - 1 - step * (cells - 1)) / 2.0
    pixels = torch.arange(length, dtype=torch.float64, device=device)
    nearest = torch.round((pixels - offset) / step).clamp(0, cells - 1)
    shifts = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    grid = nearest[:, None] + shifts[None, :]
    distance = pixels[:, None] - (offset + step * grid)
    return (grid + radius).long(), distance


class MaskGenerator:
    """Turns grid parameters N×h×w into smooth masks N×H×W (see the module docstring).

    Each pixel combines its (2R + 1)² nearest grid points, R = ⌈1.5σ/step − 1/2⌉, so every
    grid point left out is at least 1.5σ away (kernel ≤ e⁻² ≈ 0.14). Grid points outside the
    image count as 0. Memory: N·H·W·(2R + 1)² floats per intermediate (81 per pixel at step 7,
    σ 21: 16 MB per mask at 224²); autograd keeps two of them per mask (about 32 MB), so
    B = 64 images × 3 areas hold about 6 GB for the masks besides the model's activations.
    """

    def __init__(self, size: tuple[int, int], step: int, sigma: float, smooth: float, device):
        self.size = size
        self.grid = grid_shape(size, step)
        self.smooth = smooth
        self.radius = max(1, math.ceil(1.5 * sigma / step - 0.5))
        rows, dy = _axis_neighbours(size[0], self.grid[0], step, self.radius, device)
        cols, dx = _axis_neighbours(size[1], self.grid[1], step, self.radius, device)
        self.rows = rows.flatten()  # H·Ky, y-major
        self.cols = cols.flatten()  # W·Kx, x-major
        self.taps = rows.shape[1]
        distance = torch.sqrt(dy[:, :, None, None] ** 2 + dx[None, None, :, :] ** 2)
        weight = mask_kernel(distance, sigma).to(torch.float32)  # H×Ky×W×Kx
        # with a smooth max, fold its 1/T into the weights (one pass less per call)
        self.weight = weight / smooth if smooth > 0 else weight

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        """params N×h×w in [0, 1] -> masks N×H×W in [0, 1]."""
        count = params.shape[0]
        height, width = self.size
        padded = F.pad(params, (self.radius,) * 4)
        # two separable gathers: values[n, y, ky, x, kx] = padded[n, rows[y, ky], cols[x, kx]]
        values = padded.index_select(1, self.rows).index_select(2, self.cols)
        values = values.view(count, height, self.taps, width, self.taps) * self.weight
        taps = (2, 4)
        if self.smooth <= 0:
            return values.amax(dim=taps)
        # values are k·p/T here: smax_T = T · Σ v e^v / Σ e^v, shifted by the (constant) max
        odds = torch.exp(values - values.amax(dim=taps, keepdim=True).detach())
        return self.smooth * (values * odds).sum(dim=taps) / odds.sum(dim=taps)


def render_masks(
    params: torch.Tensor, size: tuple[int, int], settings: ExtremalSettings
) -> torch.Tensor:
    """Full-resolution masks from stored grid parameters: (...)×h×w -> (...)×H×W in [0, 1]."""
    lead = params.shape[:-2]
    generator = MaskGenerator(size, settings.step, settings.sigma, settings.smooth, params.device)
    with torch.no_grad():
        masks = generator(params.reshape(-1, *params.shape[-2:]).float())
    return masks.clamp(0.0, 1.0).reshape(*lead, *size)


# ----------------------------------------------------------------------------- losses
def reward_scores(logits: torch.Tensor, targets: torch.Tensor, reward: str) -> torch.Tensor:
    """Φ per row: the target's logit ("simple") or minus the best other logit ("contrastive").

    logits N×C, targets N long -> N float32.
    """
    logits = logits.float()
    target = logits.gather(1, targets.view(-1, 1))[:, 0]
    if reward == "simple":
        return target
    if reward == "contrastive":
        others = logits.scatter(1, targets.view(-1, 1), float("-inf"))
        return target - others.amax(dim=1)
    raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")


def area_references(areas: torch.Tensor, pixels: int) -> torch.Tensor:
    """Sorted target vectors: N×pixels, row n = (1 − a_n)·P zeros then round(a_n·P) ones."""
    ones = torch.round(areas * pixels).long()
    ranks = torch.arange(pixels, device=areas.device)
    return (ranks[None, :] >= pixels - ones[:, None]).float()


def area_loss(masks: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """The ranking penalty mean((sort(m) − r)²) per mask: masks N×H×W, references N×HW -> N."""
    ordered = masks.flatten(1).sort(dim=1, stable=True).values
    return (ordered - references).pow(2).mean(dim=1)


# ----------------------------------------------------------------------------- optimisation
def _check_inputs(images: torch.Tensor, targets: torch.Tensor, seeds: list[int]) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be B×3×H×W, got {tuple(images.shape)}")
    batch = images.shape[0]
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    if len(seeds) != batch:
        raise ValueError(f"need one seed per image: {len(seeds)} for {batch} images")


def _perturbed(pyramid, masks, image_index, variant: str) -> torch.Tensor:
    """The images the model sees: N (preserve, delete) or 2N (dual: preserved then deleted)."""
    if variant == "preserve":
        return apply_blur_pyramid(pyramid, masks, image_index)
    if variant == "delete":
        return apply_blur_pyramid(pyramid, 1.0 - masks, image_index)
    return torch.cat(
        [
            apply_blur_pyramid(pyramid, masks, image_index),
            apply_blur_pyramid(pyramid, 1.0 - masks, image_index),
        ]
    )


def _rewards(scores: torch.Tensor, count: int, variant: str) -> torch.Tensor:
    if variant == "preserve":
        return scores
    if variant == "delete":
        return -scores
    return scores[:count] - scores[count:]


def extremal_masks(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    seeds: list[int],
    settings: ExtremalSettings | None = None,
    *,
    on_iteration: Callable[[int], None] | None = None,
) -> ExtremalResult:
    """Extremal perturbation masks for every image and area of a batch, optimised together.

    model:   classifier taking pixels B×3×H×W in [0, 1] (it normalises itself) and returning
             logits; put it in eval mode. Its weights get no gradients (the backward pass is
             restricted to the mask parameters), whatever their requires_grad.
    images:  B×3×H×W float in [0, 1], on the model's device.
    targets: B long, the class each mask explains.
    seeds:   B per-image seeds (seeding.image_seed); the published algorithm is deterministic,
             so they are only checked (one per image).
    All B·A masks (image-major: mask n is image n // A, area n % A) are one parameter tensor
    with one SGD optimiser; the loss is the sum of per-mask losses.
    """
    settings = settings or ExtremalSettings()
    _check_inputs(images, targets, seeds)
    batch, _, height, width = images.shape
    device = images.device
    num_areas = len(settings.areas)
    count = batch * num_areas

    pyramid = blur_pyramid(images.float(), settings.max_blur_sigma, settings.pyramid_levels)
    generator = MaskGenerator(
        (height, width), settings.step, settings.sigma, settings.smooth, device
    )
    image_index = torch.arange(batch, device=device).repeat_interleave(num_areas)
    mask_targets = targets.to(device).repeat_interleave(num_areas)
    areas = torch.tensor(settings.areas, dtype=torch.float32, device=device).repeat(batch)
    references = area_references(areas, height * width)
    model_targets = mask_targets if settings.variant != "dual" else mask_targets.repeat(2)

    params = torch.ones(count, *generator.grid, device=device, requires_grad=True)
    optimizer = torch.optim.SGD(
        [params], lr=settings.lr, momentum=settings.momentum, dampening=settings.dampening
    )
    weight = settings.area_weight
    for iteration in range(settings.iterations):
        masks = generator(params)
        perturbed = _perturbed(pyramid, masks, image_index, settings.variant)
        if settings.jitter and iteration % 2 == 0:
            perturbed = perturbed.flip(dims=(3,))
        scores = reward_scores(model(perturbed), model_targets, settings.reward)
        reward = _rewards(scores, count, settings.variant)
        loss = (weight * area_loss(masks, references) - reward).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[params])
        optimizer.step()
        with torch.no_grad():
            params.clamp_(0.0, 1.0)
        weight *= settings.area_weight_growth
        if on_iteration is not None:
            on_iteration(iteration)

    with torch.no_grad():
        final = params.detach()
        masks = generator(final).clamp_(0.0, 1.0)
        preserved = reward_scores(
            model(apply_blur_pyramid(pyramid, masks, image_index)), mask_targets, settings.reward
        )
        deleted = reward_scores(
            model(apply_blur_pyramid(pyramid, 1.0 - masks, image_index)),
            mask_targets,
            settings.reward,
        )
        if settings.variant == "preserve":
            rewards = preserved
        elif settings.variant == "delete":
            rewards = -deleted
        else:
            rewards = preserved - deleted
        final_area = area_loss(masks, references)
        stored = masks
        if settings.mask_size > 0:
            stored = F.adaptive_avg_pool2d(masks[:, None], settings.mask_size)[:, 0]

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(batch, num_areas, *values.shape[1:]).float()

    return ExtremalResult(
        masks=per_image(stored).contiguous(),
        params=per_image(final).clone(),
        rewards=per_image(rewards),
        preserved=per_image(preserved),
        deleted=per_image(deleted),
        area_loss=per_image(final_area),
    )


def extremal_saliency(
    masks: torch.Tensor, area_index: int | None = None, smooth: float = 0.0
) -> torch.Tensor:
    """Saliency maps B×h×w from extremal masks B×A×h×w.

    area_index None: the sum over areas (TorchRay's pointing-game benchmark), values in
    [0, A]; an index: that area's mask alone, in [0, 1]. smooth > 0 blurs the result with a
    Gaussian of σ = smooth · min(h, w) and zero padding (the benchmark used 0.09).
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be B×A×h×w, got {tuple(masks.shape)}")
    saliency = masks.sum(dim=1) if area_index is None else masks[:, area_index]
    if smooth > 0:
        sigma = smooth * min(saliency.shape[-2:])
        saliency = gaussian_blur(saliency[:, None], sigma, padding_mode="zeros")[:, 0]
    return saliency
