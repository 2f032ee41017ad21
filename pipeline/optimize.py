"""The batched meaningful-perturbation optimiser (Fong & Vedaldi, ICCV 2017).

For images x (pixels in [0, 1]), a classifier f and target classes c, each image b gets a
low-resolution mask m_b (1 = keep the pixel, 0 = replace it with the substrate) minimising

    loss_b(m) = l1 · |1 − m_b|  +  tv · TV_β(m_b)  +  softmax(f(x̃_b))[c_b]
    x̃_b       = up(m_b) · x_b + (1 − up(m_b)) · p(x_b)   (+ Gaussian noise each iteration)

All B masks are one parameter tensor optimised by one Adam. The total loss is the sum of the
per-image losses and Adam is elementwise, so image b's mask is the same whether it is
optimised alone or in a batch of 64; per-image randomness (noise, jitter) comes from a
generator seeded by (run seed, image key), so it does not depend on batch neighbours either.

Speed options (`SpeedOptions`) change how an iteration is computed, never what is optimised:
bf16 autocast of the model forward (mask, noise, loss and Adam stay float32), channels_last
memory format, the Adam implementation, and torch.compile of the model. `benchmarks/
bench_optimize.py` measures each; `SpeedOptions.recommended` picks the ones that won there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .perturbations import apply_blur_pyramid, blur_pyramid, gaussian_blur, make_substrate

GAMES = ("delete", "preserve")
PERTURBATIONS = ("blur-median", "blur", "constant", "noise", "blur-pyramid")


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
    game: str = "delete"  # "delete": smallest region whose removal drops the score;
    #                       "preserve": smallest region that alone keeps it
    pyramid_levels: int = 8  # blur-pyramid perturbation: levels up to σ = blur_sigma

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
    # The paper (Fong & Vedaldi 2017, §3–4): 300 iterations of Adam (lr 0.1), l1 1e-4 on the
    # sum |1 − m|, tv 1e-2 with β 3, a 28×28 mask upsampled ×8 and blurred with σ 5, random
    # jitter of up to 4 px each iteration, Gaussian blur σ 10 as the perturbation.
    # These follow the paper's text (objective, coefficients, iterations, mask size, jitter,
    # σ 10 blur). The text's perturbation blurs each pixel by a mask-dependent σ: that is
    # `--perturbation blur-pyramid`; this preset uses one σ 10 blur composited through the
    # mask, the simpler form most re-implementations use. Not yet checked line by line
    # against the authors' released code. Noise is off: the paper fights artifacts with
    # jitter and the mask blur; the seed script added noise instead.
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


PRECISIONS = ("fp32", "bf16", "auto")
ADAM_IMPLEMENTATIONS = ("default", "foreach", "fused")

# Model families whose FLOPs are mostly depthwise convolutions. On an AMX Xeon, bf16 did not
# win for EfficientNet-Lite0 in bench_optimize.py (0.8-1.4x, within that run's noise), while
# resnet50 and vgg19 gained 3-7x from bf16 + channels_last.
_DEPTHWISE_FAMILIES = ("efficientnet", "mobilenet", "mnasnet", "ghostnet", "lcnet")
# On an H100 (benchmarks/results/bench_optimize_cuda.csv, batch 64) bf16 + channels_last gave
# vgg19 20.9x the reference loop against 14.6x for bf16 alone, but resnet50 28.9x against
# 37.9x and lite0 50.4x against 60.3x: channels_last is kept on CUDA for VGG only.
_CUDA_CHANNELS_LAST_FAMILIES = ("vgg",)


def resolve_precision(device: torch.device | str, model_name: str = "") -> str:
    """The precision that won in bench_optimize.py for this device and model: "fp32" or "bf16".

    CPU with AMX tiles (bf16 matrix units): "bf16", except for depthwise-heavy families
    (EfficientNet, MobileNet, ...), which stay "fp32" (measured). CUDA with bf16 support:
    "bf16" (on an H100 at batch 64 it beat fp32 for lite0, resnet50 and vgg19). Anything
    else: "fp32".
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        name = model_name.lower()
        if any(family in name for family in _DEPTHWISE_FAMILIES):
            return "fp32"
        return "bf16" if _cpu_has_amx() else "fp32"
    return "fp32"


def _cpu_has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


@dataclass(frozen=True)
class SpeedOptions:
    """How the iterations are computed; none of these changes the mask hyperparameters.

    precision:     "fp32" (exact path), "bf16" (autocast of the model forward only; the mask,
                   noise, loss and Adam stay float32) or "auto" (see resolve_precision).
    channels_last: run the model in channels_last memory format. Converts the model's
                   weights in place (idempotent; the outputs are unchanged).
    adam:          "default" (PyTorch's choice), "foreach" or "fused" (torch.optim.Adam flags).
    compile:       torch.compile the model (static shapes). The first batch of each shape pays
                   the compile time; later calls with the same model and shapes reuse it.
    cuda_graphs:   with compile, replay the compiled forward and backward as CUDA graphs
                   (torch.compile's "reduce-overhead" mode): one launch instead of hundreds of
                   small kernels per pass. Only on CUDA; elsewhere the plain compiled model runs.
    """

    precision: str = "fp32"
    channels_last: bool = False
    adam: str = "default"
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.adam not in ADAM_IMPLEMENTATIONS:
            raise ValueError(f"adam must be one of {ADAM_IMPLEMENTATIONS}, got {self.adam!r}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile (they are torch.compile's reduce-overhead)")

    @classmethod
    def recommended(
        cls, device: torch.device | str, model_name: str = "", precision: str = "auto"
    ) -> SpeedOptions:
        """The options that won in bench_optimize.py: the precision (resolve_precision's
        when "auto"); channels_last with bf16 on CPU (bf16 pays only together with it there)
        and, on CUDA, for VGG only (on an H100 it lost for resnet50 and lite0); PyTorch's
        default Adam; no compile."""
        device = torch.device(device)
        if precision == "auto":
            precision = resolve_precision(device, model_name)
        channels_last = precision == "bf16"
        if device.type == "cuda":
            name = model_name.lower()
            channels_last &= any(family in name for family in _CUDA_CHANNELS_LAST_FAMILIES)
        return cls(precision=precision, channels_last=channels_last)

    def resolved(self, device: torch.device | str, model_name: str = "") -> SpeedOptions:
        """A copy with precision "auto" replaced by resolve_precision's answer."""
        if self.precision != "auto":
            return self
        return dataclasses.replace(self, precision=resolve_precision(device, model_name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MaskResult:
    """Output of optimize_masks for a batch of B images."""

    masks: torch.Tensor  # B×1×h×w float32 in [0, 1], 1 = kept
    loss: torch.Tensor  # B, the final per-image loss (last iteration)
    prob_masked: torch.Tensor  # B, softmax prob of the target on the final x̃ without noise


def make_batch_substrate(
    images: torch.Tensor, settings: MaskSettings, seeds: list[int], mean_colour=None
) -> torch.Tensor:
    """The perturbed images p(x) of a batch (not for blur-pyramid, which is mask-dependent).

    The noise substrate draws from per-image generators seeded apart from the iterations'.
    """
    generators = None
    if settings.perturbation == "noise":
        generators = make_generators([(s + 1) & ((1 << 63) - 1) for s in seeds], images.device)
    return make_substrate(
        images,
        settings.perturbation,
        blur_sigma=settings.blur_sigma,
        blur_kernel=settings.blur_kernel,
        mean_colour=mean_colour,
        generators=generators,
    )


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
    """l1 · area + tv · TV_β(m), per image. masks B×1×h×w -> B.

    The area is what the game pays for: the deleted part |1 − m| in the deletion game, the
    kept part |m| in the preservation game.
    """
    area = (1.0 - masks) if settings.game == "delete" else masks
    area = area.abs().flatten(1)
    area = area.sum(1) if settings.l1_reduction == "sum" else area.mean(1)
    return settings.l1 * area + settings.tv * total_variation(masks, settings.tv_beta)


def _target_probs(model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    return logits.float().softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


def _make_adam(masks: torch.Tensor, lr: float, adam: str) -> torch.optim.Adam:
    """torch.optim.Adam over the one mask tensor; `adam` picks the implementation."""
    if adam == "foreach":
        return torch.optim.Adam([masks], lr=lr, foreach=True)
    if adam == "fused":
        return torch.optim.Adam([masks], lr=lr, fused=True)
    return torch.optim.Adam([masks], lr=lr)


def _prepare_model(model: torch.nn.Module, speed: SpeedOptions, device: torch.device):
    """The callable used for the forward passes: the model, in channels_last and/or compiled."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        # dynamo caches the compiled code on the forward's code object, guarded on this model
        # and the input shapes, so a fresh wrapper per batch does not recompile.
        graphs = speed.cuda_graphs and device.type == "cuda"
        return torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)
    return model


def _to_model_format(images: torch.Tensor, speed: SpeedOptions) -> torch.Tensor:
    if speed.channels_last:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def optimize_masks(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    seeds: list[int],
    settings: MaskSettings = PRESETS["seed"],
    substrate: torch.Tensor | None = None,
    *,
    speed: SpeedOptions | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> MaskResult:
    """Learn one deletion mask per image, all images of the batch at once.

    model:     frozen classifier taking pixels B×3×H×W in [0, 1] (it normalises itself);
               its `std` attribute (3,) converts `settings.noise` to pixel space.
    images:    B×3×H×W float in [0, 1], on the model's device.
    targets:   B long, the class each mask explains.
    seeds:     B per-image seeds (see image_seed) for the noise and jitter.
    substrate: B×3×H×W perturbed images p(x); computed from settings when None.
    speed:     how to compute the iterations (SpeedOptions; default: the exact float32 path).
    on_iteration: called with the iteration index after each Adam step (progress, timing).
    """
    batch, _, height, width = images.shape
    device = images.device
    speed = (speed or SpeedOptions()).resolved(device, getattr(model, "name", ""))
    if settings.game not in GAMES:
        raise ValueError(f"unknown game {settings.game!r}; choose from {', '.join(GAMES)}")
    pyramid = None
    if settings.perturbation == "blur-pyramid":
        # The paper's mask-dependent blur: m = 1 the image, m = 0 the strongest blur.
        pyramid = blur_pyramid(images, settings.blur_sigma, settings.pyramid_levels)
    elif substrate is None:
        substrate = make_batch_substrate(images, settings, seeds, getattr(model, "mean", None))
    std = getattr(model, "std", None)
    std = torch.ones(3) if std is None else torch.as_tensor(std)
    noise_scale = std.detach().to(device=device, dtype=torch.float32).view(1, 3, 1, 1)
    noise_scale = noise_scale * settings.noise
    generators = make_generators(list(seeds), device)
    max_shift = settings.jitter
    # One buffer refilled in place each iteration, image by image from its own generator
    # (normal_ on a contiguous 3×H×W slice draws exactly what torch.randn(3, H, W) would).
    noise = torch.empty(batch, 3, height, width, device=device) if settings.noise > 0 else None
    forward = _prepare_model(model, speed, device)
    # CUDA graph replays reuse their output memory: tell torch where an iteration begins.
    mark_step = speed.cuda_graphs and device.type == "cuda"
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if speed.precision == "bf16"
        else nullcontext()
    )

    masks = torch.ones(batch, 1, settings.mask_size, settings.mask_size, device=device)
    masks.requires_grad_(True)
    optimizer = _make_adam(masks, settings.lr, speed.adam)
    per_image_loss = torch.zeros(batch, device=device)

    sign = 1.0 if settings.game == "delete" else -1.0  # preserve: maximise the score

    def composite(up: torch.Tensor) -> torch.Tensor:
        if pyramid is not None:
            return apply_blur_pyramid(pyramid, up)
        return images * up + substrate * (1.0 - up)

    for iteration in range(settings.iterations):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        up = upsample_masks(masks, (height, width), settings.mask_blur_sigma)
        perturbed = composite(up)
        if max_shift > 0:
            shifts = torch.stack(
                [
                    torch.randint(-max_shift, max_shift + 1, (2,), generator=g, device=device)
                    for g in generators
                ]
            )
            perturbed = jitter_images(perturbed, shifts, max_shift)
        if noise is not None:
            for b, generator in enumerate(generators):
                noise[b].normal_(generator=generator)
            perturbed = perturbed + noise.mul_(noise_scale)
        with autocast:
            probs = _target_probs(forward, _to_model_format(perturbed, speed), targets)
        per_image_loss = _mask_losses(masks, settings) + sign * probs
        optimizer.zero_grad(set_to_none=True)
        per_image_loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            masks.clamp_(0.0, 1.0)
        if on_iteration is not None:
            on_iteration(iteration)

    final = masks.detach()
    with torch.inference_mode(), autocast:
        up = upsample_masks(final, (height, width), settings.mask_blur_sigma)
        final_images = _to_model_format(composite(up), speed)
        prob_masked = _target_probs(model, final_images, targets)  # no compile for one call
    return MaskResult(masks=final.clone(), loss=per_image_loss.detach(), prob_masked=prob_masked)
