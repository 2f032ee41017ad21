"""Batched extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019, arXiv 1910.08485),
computing what TorchRay's ``torchray.attribution.extremal_perturbation`` computes.

For an image x (pixels in [0, 1]), a classifier f, a target class c and an area a ∈ (0, 1), an
extremal perturbation is a smooth mask m (values in [0, 1], high = salient) of area a that
maximises a reward:

    preserve:  Φ(f(x ⊙ m))                    keep the mask, blur the rest
    delete:   −Φ(f(x ⊙ (1 − m)))              blur the mask
    dual:      Φ(f(x ⊙ m)) − Φ(f(x ⊙ (1 − m)))  both

where x ⊙ m is the mask-dependent blur of perturbations.apply_blur_pyramid (m = 1 the pixel as
it is, m = 0 the strongest blur; the pyramid blurs the normalised image with zero padding, as
TorchRay does) and Φ is the target's logit ("simple") or the target's logit minus the best
other logit ("contrastive"). The area is imposed with a ranking penalty on the mask m̄ of an
extended canvas (the image plus a margin of σ pixels all round, E×E' pixels): the sorted
values of m̄ are pulled towards a vector of ⌊(1 − a)·EE'⌋ zeros followed by ones,

    loss(m) = −reward(m) + λ_t · mean((sort(m̄) − r_a)²),   λ_t = λ_0 · g^t,

with a weight that grows geometrically over the iterations t (λ_0 = 300, g = 1.0035: ×16
over 800 iterations). m is the image's H×W window of m̄.

m̄ is a smooth-max combination of parameters p_i ∈ [0, 1] on a coarse grid (stride `step`):
m̄(u) = smax_i k(|u − u_i|) p_i over the (2R + 1)² grid points u_i near pixel u, with the
kernel k(d) = exp(−2 · max(d/σ − 1/2, 0)²) (flat within σ/2, then Gaussian) and
smax_T(v) = Σ v softmax(v / T), T = `temperature` (TorchRay's coldness 20 = 1/T; T = 0: a
plain max), clamped to [0, 1]. Masks can only be unions of σ-sized blobs.

Batching: all B images × A areas are B·A masks in one parameter tensor with one optimiser
(SGD with momentum, elementwise). The total loss is the sum of per-mask losses and nothing
couples masks, so image b's masks are the same whether it is optimised alone or in a batch of
64. The published jitter (a horizontal flip on even iterations) is deterministic; nothing
here draws random numbers, and the per-image seeds are checked and kept for interface parity
with optimize.py.

Where this differs from TorchRay on purpose: the contrastive reward masks the target with −∞
where TorchRay writes −100 (the same unless every other logit is below −100).

Two paths (`extremal_masks`'s `speed`): the reference, TorchRay's operations in their order
(smooth_masks.MaskGenerator; bitwise TorchRay's masks, tests/test_extremal_torchray.py), and
the fast path, whose generator makes the same masks to float32 rounding in another order
(smooth_masks.FastMaskGenerator) and whose model forward may run in bf16, channels_last,
compiled or as CUDA graphs. Over hundreds of iterations the two drift apart as any two
float orders do; benchmarks/results/fidelity_extremal_fast.csv measures by how much.

Longer than 300 lines: the area loss and the loop are TorchRay's one algorithm, kept together
so that each can be checked line by line against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import SettingsError
from ...models.speed import SpeedOptions, autocast_for, prepare_model, to_model_format
from ..perturbations import apply_blur_pyramid, blur_pyramid, smooth_zero_padded
from .mask_generators import FastMaskGenerator, MaskGenerator

VARIANTS = ("preserve", "delete", "dual")
REWARDS = ("simple", "contrastive")


@dataclass(frozen=True)
class ExtremalSettings:
    """Every hyperparameter of extremal perturbations; defaults are TorchRay's published code
    and the areas of its VOC pointing benchmark (examples/attribution_benchmark.py).

    areas:          target mask areas, fractions of the image (VOC benchmark: 0.025, 0.05,
                    0.1, 0.2; COCO: 0.018, 0.025, 0.05, 0.1).
    iterations, lr, momentum, dampening: SGD (TorchRay: 800, 0.01, 0.9 and dampening 0.9, so
                    a step is lr × the running mean of the gradients).
    variant:        "preserve" | "delete" | "dual".
    reward:         "simple" (target logit) | "contrastive" (target logit − best other logit).
    temperature:    of the smooth max over grid points (TorchRay's coldness 20 = 1/0.05); 0
                    gives a plain max.
    step:           stride of the parameter grid in pixels (7 → 32×32 parameters at 224²).
    sigma:          kernel size σ in pixels (TorchRay: 21 = 3·step).
    margin:         the extended canvas's margin in pixels (None: σ, as TorchRay).
    max_blur_sigma, pyramid_levels: the blur pyramid (σ_max 20, 8 levels).
    area_weight, area_weight_growth: λ_0 and its per-iteration factor g (300, 1.0035).
    jitter:         flip the perturbed images horizontally on even iterations (TorchRay).
    mask_size:      side of the stored masks (area-averaged from image resolution); 56 at
                    224² input = 4×4 pixel cells; 0 keeps the image resolution. The metrics
                    score the full-resolution masks rebuilt from the stored parameters.
    seed:           run seed (image seeds come from seeding.image_seed(seed, key)).
    """

    areas: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2)
    iterations: int = 800
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    variant: str = "preserve"
    reward: str = "simple"
    temperature: float = 0.05
    step: int = 7
    sigma: float = 21.0
    margin: float | None = None
    max_blur_sigma: float = 20.0
    pyramid_levels: int = 8
    area_weight: float = 300.0
    area_weight_growth: float = 1.0035
    jitter: bool = True
    mask_size: int = 56
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SettingsError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.reward not in REWARDS:
            raise SettingsError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if not self.areas or not all(0.0 < a < 1.0 for a in self.areas):
            raise SettingsError(f"areas must be fractions in (0, 1), got {self.areas}")
        if self.step < 1 or self.sigma <= 0 or self.temperature < 0:
            raise SettingsError("step must be ≥ 1, sigma > 0 and temperature ≥ 0")
        if self.margin is not None and self.margin < 0:
            raise SettingsError(f"margin must be ≥ 0, got {self.margin}")

    def replace(self, **changes) -> ExtremalSettings:
        """A copy with some fields changed; None values are ignored (unset CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "areas" in changes:
            changes["areas"] = tuple(float(a) for a in changes["areas"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# TorchRay's pointing benchmark (examples/attribution_benchmark.py): 800 iterations, step 7,
# σ 21, 8 levels, jitter, simple reward, preserve; the areas differ by dataset. Scoring sums
# the masks over the areas and smooths them with σ = 0.09·min(H, W) (EvalOptions.smooth).
EXTREMAL_PRESETS: dict[str, ExtremalSettings] = {
    "torchray-voc": ExtremalSettings(areas=(0.025, 0.05, 0.1, 0.2)),
    "torchray-coco": ExtremalSettings(areas=(0.018, 0.025, 0.05, 0.1)),
}


@dataclass
class ExtremalResult:
    """Output of extremal_masks for B images and A areas.

    masks:    B×A×s×s float32 in [0, 1] (s = settings.mask_size, area-averaged; image size if 0);
              high = salient (kept by preserve, blurred by delete). At s = 56 and 3 areas:
              3·56·56·4 = 37,632 bytes per image (1.9 GB for 50,000 images; half in float16).
    params:   B×A×h×w float32 in [0, 1], the grid parameters that made `full_masks`
              (h = ⌈H/step⌉; 16,384 bytes per image at 224², 4 areas);
              render_masks(params, (H, W), settings) rebuilds `full_masks`.
    full_masks: B×A×H×W float32 in [0, 1], the masks as applied to the image.
    rewards:  B×A, the final objective (higher is better for every variant).
    preserved: B×A, the reward function Φ on the image blurred outside the mask.
    deleted:  B×A, Φ on the image blurred inside the mask.
    area_loss: B×A, the final mean((sort(m) − r_a)²) (without its weight).
    """

    masks: torch.Tensor
    params: torch.Tensor
    full_masks: torch.Tensor
    rewards: torch.Tensor
    preserved: torch.Tensor
    deleted: torch.Tensor
    area_loss: torch.Tensor


def render_masks(
    params: torch.Tensor, size: tuple[int, int], settings: ExtremalSettings
) -> torch.Tensor:
    """The masks as applied to the image, from stored grid parameters: (...)×h×w -> (...)×H×W
    in [0, 1], 1 = salient."""
    lead = params.shape[:-2]
    generator = MaskGenerator(
        size, settings.step, settings.sigma, settings.temperature, params.device, settings.margin
    )
    with torch.no_grad():
        masks = generator.crop(generator(params.reshape(-1, *params.shape[-2:]).float()))
    return masks.reshape(*lead, *size)


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


def area_references(areas: Sequence[float], pixels: int, device=None) -> torch.Tensor:
    """Sorted target vectors: A×pixels, row i = ⌊(1 − a_i)·P⌋ zeros then ones (TorchRay
    truncates the count of zeros the same way)."""
    references = torch.ones(len(areas), pixels, device=device)
    for row, area in enumerate(areas):
        references[row, : int(pixels * (1 - area))] = 0
    return references


def area_loss(masks: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """The ranking penalty mean((sort(m) − r)²) per mask: masks N×E×E', references N×EE' -> N."""
    ordered = masks.flatten(1).sort(dim=1).values
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
        return apply_blur_pyramid(pyramid, masks, image_index, torchray_ends=True)
    if variant == "delete":
        return apply_blur_pyramid(pyramid, 1.0 - masks, image_index, torchray_ends=True)
    return torch.cat(
        [
            apply_blur_pyramid(pyramid, masks, image_index, torchray_ends=True),
            apply_blur_pyramid(pyramid, 1.0 - masks, image_index, torchray_ends=True),
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
    speed: SpeedOptions | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> ExtremalResult:
    """Extremal perturbation masks for every image and area of a batch, optimised together.

    model:   classifier taking pixels B×3×H×W in [0, 1] (it normalises itself: its `mean`
             attribute, 3 values, is the colour the blur pads with; 0.5 grey without one) and
             returning logits; put it in eval mode. Its weights get no gradients (the backward
             pass is restricted to the mask parameters), whatever their requires_grad.
    images:  B×3×H×W float in [0, 1], on the model's device.
    targets: B long, the class each mask explains.
    seeds:   B per-image seeds (seeding.image_seed); the published algorithm is deterministic,
             so they are only checked (one per image).
    speed:   None or SpeedOptions(reference=True): the reference path, TorchRay's operations
             in their order, float32 eager (the TorchRay tests run it). Any other SpeedOptions:
             the fast path, smooth_masks.FastMaskGenerator (the same masks to float32
             rounding, 3-4× faster on the CPU) and the options for the model's forward:
             bf16 autocast (the masks, pyramid, area loss and SGD stay float32),
             channels_last, torch.compile, CUDA graphs. "auto" precision is float32 here:
             extremal's bf16 fidelity has not been measured.
    All B·A masks (image-major: mask n is image n // A, area n % A) are one parameter tensor
    with one SGD optimiser; the loss is the sum of per-mask losses. As TorchRay returns, the
    result holds the masks of the last iteration's forward pass (before its SGD step).
    """
    settings = settings or ExtremalSettings()
    _check_inputs(images, targets, seeds)
    batch = images.shape[0]
    count = batch * len(settings.areas)
    fast = speed is not None and not speed.reference
    speed = resolved_speed(speed)
    network, pyramid, generator = _problem(model, images, settings, fast)
    forward = prepare_model(network, speed, images.device)
    autocast = autocast_for(speed, images.device)
    mark_step = speed.cuda_graphs and images.device.type == "cuda"
    image_index = torch.arange(batch, device=images.device).repeat_interleave(len(settings.areas))
    mask_targets = targets.to(images.device).repeat_interleave(len(settings.areas))
    pixels = generator.extended[0] * generator.extended[1]
    references = area_references(settings.areas, pixels, images.device).repeat(batch, 1)
    model_targets = mask_targets if settings.variant != "dual" else mask_targets.repeat(2)

    params = torch.ones(count, *generator.grid, device=images.device, requires_grad=True)
    optimizer = torch.optim.SGD(
        [params], lr=settings.lr, momentum=settings.momentum, dampening=settings.dampening
    )
    weight = settings.area_weight
    for iteration in range(settings.iterations):
        if mark_step:  # CUDA graph replays reuse their outputs' memory
            torch.compiler.cudagraph_mark_step_begin()
        extended = generator(params)
        masks = generator.crop(extended)
        perturbed = _perturbed(pyramid, masks, image_index, settings.variant)
        if settings.jitter and iteration % 2 == 0:
            perturbed = perturbed.flip(dims=(3,))
        with autocast:
            logits = forward(to_model_format(perturbed, speed))
        scores = reward_scores(logits, model_targets, settings.reward)
        reward = _rewards(scores, count, settings.variant)
        loss = (weight * area_loss(extended, references) - reward).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[params])
        if iteration == settings.iterations - 1:  # the masks TorchRay returns
            last = (params.detach().clone(), masks.detach(), extended.detach())
        optimizer.step()
        with torch.no_grad():
            params.clamp_(0, 1)
        weight *= settings.area_weight_growth
        if on_iteration is not None:
            on_iteration(iteration)
    if settings.iterations == 0:
        with torch.no_grad():
            extended = generator(params.detach())
        last = (params.detach().clone(), generator.crop(extended), extended)
    return _result(network, pyramid, image_index, mask_targets, references, last, settings, batch)


def resolved_speed(speed: SpeedOptions | None) -> SpeedOptions:
    """The speed options extremal_masks applies: None means the reference path; "auto"
    precision is float32 (bf16's fidelity for extremal masks is unmeasured)."""
    if speed is None:
        return SpeedOptions(reference=True)
    if speed.precision == "auto":
        return dataclasses.replace(speed, precision="fp32")
    return speed


def _problem(
    model: torch.nn.Module, images: torch.Tensor, settings: ExtremalSettings, fast: bool = False
):
    """The network on normalised inputs, the blur pyramid of the images in that space, and
    the mask generator at the images' size (the fast path's or the reference)."""
    network, inputs, fill = _normalised_space(model, images.float())
    pyramid = blur_pyramid(inputs, settings.max_blur_sigma, settings.pyramid_levels, fill=fill)
    generator = (FastMaskGenerator if fast else MaskGenerator)(
        tuple(images.shape[-2:]),
        settings.step,
        settings.sigma,
        settings.temperature,
        images.device,
        settings.margin,
    )
    return network, pyramid, generator


def _normalised_space(model: torch.nn.Module, images: torch.Tensor):
    """(network, inputs, fill) for the optimisation: TorchRay blurs and blends the normalised
    image and feeds the network directly. With a models.NormalizedClassifier (it has
    `normalize` and the wrapped `model`) mpbatch does the same, so every float operation is
    TorchRay's; with any other pixel model, the blur pads with its `mean` colour (0.5 grey
    without one): the same values up to rounding."""
    network = getattr(model, "model", None)
    if callable(getattr(model, "normalize", None)) and isinstance(network, torch.nn.Module):
        return network, model.normalize(images), torch.zeros(3, device=images.device)
    mean = getattr(model, "mean", None)
    fill = torch.full((3,), 0.5) if mean is None else torch.as_tensor(mean).float()
    return model, images, fill.to(images.device)


def _result(model, pyramid, image_index, targets, references, last, settings, batch):
    """The ExtremalResult of the masks the last iteration applied."""
    final, masks, extended = last
    with torch.no_grad():
        preserved = reward_scores(
            model(apply_blur_pyramid(pyramid, masks, image_index, torchray_ends=True)),
            targets,
            settings.reward,
        )
        deleted = reward_scores(
            model(apply_blur_pyramid(pyramid, 1 - masks, image_index, torchray_ends=True)),
            targets,
            settings.reward,
        )
        rewards = {"preserve": preserved, "delete": -deleted}.get(
            settings.variant, preserved - deleted
        )
        final_area = area_loss(extended, references)
        stored = masks
        if settings.mask_size > 0:
            stored = F.adaptive_avg_pool2d(masks[:, None], settings.mask_size)[:, 0]

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(batch, len(settings.areas), *values.shape[1:]).float()

    return ExtremalResult(
        masks=per_image(stored).contiguous(),
        params=per_image(final),
        full_masks=per_image(masks),
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
    [0, A]; an index: that area's mask alone, in [0, 1]. smooth > 0 blurs the result as
    TorchRay's benchmark does, σ = smooth · min(h, w), zero padding (it used 0.09).
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be B×A×h×w, got {tuple(masks.shape)}")
    saliency = masks.sum(dim=1) if area_index is None else masks[:, area_index]
    if smooth > 0:
        sigma = smooth * min(saliency.shape[-2:])
        saliency = smooth_zero_padded(saliency[:, None], sigma)[:, 0]
    return saliency
