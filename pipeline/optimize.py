"""The batched meaningful-perturbation optimiser (Fong & Vedaldi, ICCV 2017).

For images x (pixels in [0, 1]), a classifier f and target classes c, each image b gets a
low-resolution mask m_b (1 = keep the pixel, 0 = replace it with the substrate) minimising

    loss_b(m) = l1 · |1 − m_b|  +  tv · TV_β(m_b)  +  softmax(f(x̃_b))[c_b]
    x̃_b       = up(m_b) · x_b + (1 − up(m_b)) · p(x_b)   (+ Gaussian noise each iteration)

All B masks are one parameter tensor optimised by one Adam. The total loss is the sum of the
per-image losses and Adam is elementwise, so image b's mask is the same whether it is
optimised alone or in a batch of 64; per-image randomness (noise, jitter) comes from a
generator seeded by (run seed, image key), so it does not depend on batch neighbours either.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .perturbations import gaussian_blur, make_substrate


@dataclass(frozen=True)
class MaskSettings:
    """Every hyperparameter of the mask optimisation (the defaults are the `seed` preset)."""

    iterations: int = 500
    lr: float = 0.1
    l1: float = 0.01
    l1_reduction: str = "mean"  # "mean" or "sum" of |1 - m| over the mask
    tv: float = 0.2
    tv_beta: float = 3.0
    mask_size: int = 28
    noise: float = 0.2  # std of the Gaussian noise, in the model's normalised space
    perturbation: str = "blur-median"
    blur_sigma: float = 5.0
    blur_kernel: int | None = 11  # None: 2·ceil(3σ)+1
    jitter: int = 0  # random shift of the perturbed image, up to this many pixels
    mask_blur_sigma: float = 0.0  # Gaussian blur of the upsampled mask (paper: 5)
    seed: int = 0

    def replace(self, **changes) -> MaskSettings:
        """A copy with some fields changed; None values are ignored (unset CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, MaskSettings] = {
    # The seed README: 500 iterations, l1 0.01 (mean), tv 0.2, β 3, noise σ 0.2, the mean of
    # an 11×11 Gaussian (σ 5) and an 11×11 median blur as the perturbation.
    "seed": MaskSettings(),
    # The paper (§4 and its released settings): 300 iterations, l1 1e-4 on the sum, tv 1e-2,
    # β 3, Gaussian blur σ 10, random jitter up to 4 px, upsampled mask blurred with σ 5.
    "paper": MaskSettings(
        iterations=300,
        l1=1e-4,
        l1_reduction="sum",
        tv=1e-2,
        noise=0.0,
        perturbation="blur",
        blur_sigma=10.0,
        blur_kernel=None,
        jitter=4,
        mask_blur_sigma=5.0,
    ),
}


@dataclass
class MaskResult:
    """Output of optimize_masks for a batch of B images."""

    masks: torch.Tensor  # B×1×h×w float32 in [0, 1], 1 = kept
    loss: torch.Tensor  # B, the final per-image loss (last iteration)
    prob_masked: torch.Tensor  # B, softmax prob of the target on the final x̃ without noise


def image_seed(run_seed: int, key: str) -> int:
    """A 63-bit seed for one image from the run seed and a stable key (its relative path)."""
    digest = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One torch.Generator per image, on the batch's device."""
    generators = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        generators.append(generator)
    return generators


def total_variation(masks: torch.Tensor, beta: float) -> torch.Tensor:
    """TV_β per mask: mean|Δrow|^β + mean|Δcol|^β. masks B×1×h×w -> B."""
    rows = (masks[:, :, 1:, :] - masks[:, :, :-1, :]).abs().pow(beta).flatten(1).mean(1)
    cols = (masks[:, :, :, 1:] - masks[:, :, :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return rows + cols


def upsample_masks(masks: torch.Tensor, size: tuple[int, int], blur_sigma: float = 0.0):
    """B×1×h×w -> B×1×H×W, bilinear with aligned corners (the seed's UpsamplingBilinear2d),
    then optionally Gaussian-blurred (the paper's smoothing of the upsampled mask)."""
    up = F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
    if blur_sigma > 0:
        up = gaussian_blur(up, blur_sigma, padding_mode="replicate")
    return up


def jitter_images(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by its own (dy, dx) in [-max_shift, max_shift], replicating borders.

    images B×C×H×W, shifts B×2 long.
    """
    if max_shift <= 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    out = []
    for b in range(images.shape[0]):
        top = max_shift + int(shifts[b, 0])
        left = max_shift + int(shifts[b, 1])
        out.append(padded[b, :, top : top + height, left : left + width])
    return torch.stack(out)


def _mask_losses(masks: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    """l1 · |1 − m| + tv · TV_β(m), per image. masks B×1×h×w -> B."""
    area = (1.0 - masks).abs().flatten(1)
    area = area.sum(1) if settings.l1_reduction == "sum" else area.mean(1)
    return settings.l1 * area + settings.tv * total_variation(masks, settings.tv_beta)


def _target_probs(model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    return logits.float().softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


def optimize_masks(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    seeds: list[int],
    settings: MaskSettings = PRESETS["seed"],
    substrate: torch.Tensor | None = None,
) -> MaskResult:
    """Learn one deletion mask per image, all images of the batch at once.

    model:     frozen classifier taking pixels B×3×H×W in [0, 1] (it normalises itself);
               its `std` attribute (3,) converts `settings.noise` to pixel space.
    images:    B×3×H×W float in [0, 1], on the model's device.
    targets:   B long, the class each mask explains.
    seeds:     B per-image seeds (see image_seed) for the noise and jitter.
    substrate: B×3×H×W perturbed images p(x); computed from settings when None.
    """
    batch, _, height, width = images.shape
    device = images.device
    if substrate is None:
        substrate = make_substrate(
            images,
            settings.perturbation,
            blur_sigma=settings.blur_sigma,
            blur_kernel=settings.blur_kernel,
            mean_colour=getattr(model, "mean", None),
        )
    std = getattr(model, "std", None)
    std = torch.ones(3) if std is None else torch.as_tensor(std)
    noise_scale = std.detach().to(device=device, dtype=torch.float32).view(1, 3, 1, 1)
    noise_scale = noise_scale * settings.noise
    generators = make_generators(list(seeds), device)
    max_shift = settings.jitter

    masks = torch.ones(batch, 1, settings.mask_size, settings.mask_size, device=device)
    masks.requires_grad_(True)
    optimizer = torch.optim.Adam([masks], lr=settings.lr)
    per_image_loss = torch.zeros(batch, device=device)

    for _ in range(settings.iterations):
        up = upsample_masks(masks, (height, width), settings.mask_blur_sigma)
        perturbed = images * up + substrate * (1.0 - up)
        if max_shift > 0:
            shifts = torch.stack(
                [
                    torch.randint(-max_shift, max_shift + 1, (2,), generator=g, device=device)
                    for g in generators
                ]
            )
            perturbed = jitter_images(perturbed, shifts, max_shift)
        if settings.noise > 0:
            noise = torch.stack(
                [torch.randn(3, height, width, generator=g, device=device) for g in generators]
            )
            perturbed = perturbed + noise_scale * noise
        probs = _target_probs(model, perturbed, targets)
        per_image_loss = _mask_losses(masks, settings) + probs
        optimizer.zero_grad(set_to_none=True)
        per_image_loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            masks.clamp_(0.0, 1.0)

    final = masks.detach()
    with torch.inference_mode():
        up = upsample_masks(final, (height, width), settings.mask_blur_sigma)
        prob_masked = _target_probs(model, images * up + substrate * (1.0 - up), targets)
    return MaskResult(masks=final.clone(), loss=per_image_loss.detach(), prob_masked=prob_masked)
