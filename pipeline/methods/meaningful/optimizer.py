"""The batched meaningful-perturbation optimiser (Fong & Vedaldi, ICCV 2017).

For images x (B×3×H×W, pixels in [0, 1]), a classifier f and target classes c, each image b
gets a low-resolution mask m_b (h×w, values in [0, 1]; 1 = keep the pixel, 0 = replace it
with the substrate p(x_b)) minimising

    loss_b(m) = l1 · A(|1 − m_b|)  +  tv · TV_β(m_b)  +  softmax(f(x̃_b))[c_b]
    M_b       = applied_masks(m_b) = blur_σm(up(m_b))                            (H×W)
    x̃_b       = x_b · M_b + p(x_b) · (1 − M_b)                (+ Gaussian noise each iteration)

- A: the mean (seed) or the sum (paper) over the h×w lattice (the preservation game pays
  |m| instead of |1 − m| and maximises the score).
- TV_β: anisotropic, mean|Δ_row m|^β + mean|Δ_col m|^β (seed), or isotropic and summed,
  Σ_ij (Δ_row m_ij² + Δ_col m_ij²)^(β/2) with forward differences that are 0 past the last
  row and column (paper, the released tv()).
- up(): bilinear with align_corners=True (seed) or nearest, an exact ×H/h block copy (paper);
  blur_σm: a Gaussian of σ mask_blur_sigma (0: none). In the paper preset the score's
  gradient passes the blur as the identity, as the released hand-written gradient does.
- Jitter, redrawn every iteration per image: "shift" moves the whole composite x̃ by
  (dy, dx) ∈ [−j, j]² (the mask moves with the image); "crop" (paper) composites
  crop(x⁺_b) · M_b + crop(p(x_b)⁺) · (1 − M_b), where ⁺ is the image resized to
  (H+j)×(W+j) and crop takes the H×W window at (j1, j2) ∈ [0, j)²: the image moves under a
  fixed mask.

The saliency the metrics score is 1 − applied_masks(m): the mask as composited with the
un-jittered image, the same function the optimiser calls.

All B masks are one parameter tensor optimised by one Adam. The total loss is the sum of the
per-image losses and Adam is elementwise, so image b's mask is the same whether it is
optimised alone or in a batch of 64; per-image randomness (initial mask, noise, jitter) comes
from a generator seeded by (run seed, image key), so it does not depend on batch neighbours.

Speed options (`SpeedOptions`) change how an iteration is computed, never what is optimised:
bf16 autocast of the model forward (mask, noise, loss and Adam stay float32), channels_last
memory format, the Adam implementation, and torch.compile of the model. `benchmarks/
bench_optimize.py` measures each; `SpeedOptions.recommended` picks the ones that won there.

Longer than the project's 300 lines: the loss, the substrates' compositing, both jitters
and the speed paths belong to one optimisation loop and are read together against the
references (the seed script and the released code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import SettingsError
from ...models.speed import SpeedOptions, autocast_for, prepare_model, to_model_format
from ..perturbations import (
    apply_blur_pyramid,
    blur_pyramid,
    gaussian_blur,
    gaussian_blur_per_image,
    make_substrate,
)

GAMES = ("delete", "preserve")
PERTURBATIONS = ("blur-median", "blur", "constant", "noise", "blur-pyramid")
REDUCTIONS = ("mean", "sum")
MASK_INITS = ("ones", "uniform")
UPSAMPLINGS = ("bilinear", "nearest")
MASK_BLUR_GRADIENTS = ("exact", "skip")
JITTER_MODES = ("shift", "crop")
BLUR_SPACES = ("input", "original")


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
    jitter: int = 0  # random jitter each iteration, up to this many pixels (see jitter_mode)
    mask_blur_sigma: float = 0.0  # Gaussian blur of the upsampled mask (paper: 5)
    seed: int = 0
    game: str = "delete"  # "delete": smallest region whose removal drops the score;
    #                       "preserve": smallest region that alone keeps it
    pyramid_levels: int = 8  # blur-pyramid perturbation: levels up to σ = blur_sigma
    tv_reduction: str = "mean"  # "mean" or "sum" of the TV terms over the mask
    tv_isotropic: bool = False  # False: |Δrow|^β + |Δcol|^β; True: (Δrow² + Δcol²)^(β/2)
    mask_init: str = "ones"  # "ones", or "uniform": U[0, 1) from each image's generator
    upsample: str = "bilinear"  # "bilinear" (align_corners=True) or "nearest"
    mask_blur_gradient: str = "exact"  # "skip": the gradient passes the mask blur unchanged
    jitter_mode: str = "shift"  # "shift" the composite by ±jitter, or "crop" (see module doc)
    blur_at: str = "input"  # "blur" substrate: σ in pixels of the model input, or "original":
    #                         of each original photo (needs optimize_masks' original_sizes)

    def __post_init__(self) -> None:
        choices = {
            "l1_reduction": REDUCTIONS,
            "tv_reduction": REDUCTIONS,
            "mask_init": MASK_INITS,
            "upsample": UPSAMPLINGS,
            "mask_blur_gradient": MASK_BLUR_GRADIENTS,
            "jitter_mode": JITTER_MODES,
            "blur_at": BLUR_SPACES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    def replace(self, **changes) -> MaskSettings:
        """A copy with some fields changed; None values are ignored (unset CLI options)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, MaskSettings] = {
    # The seed README (jacobgil/pytorch-explain-black-box): 500 iterations, l1 0.01 (mean),
    # tv 0.2 (anisotropic, means), β 3, noise σ 0.2, the mean of an 11×11 Gaussian (σ 5) and
    # an 11×11 median blur as the perturbation, bilinear upsampling, mask initialised to ones.
    "seed": MaskSettings(),
    # The authors' released code, term by term: ruthcfong/perturb_explanations at 1260ce8,
    # code/caffe/python/optimize_mask.py (O:line) run by its main() with defaults.py (D:line).
    # - score: softmax probability of the label, the gradient of 'prob' one-hot (O:67-70,
    #   D:34-36 given_gradient, norm_score off, end_layer 'prob'); deletion game.
    # - Adam lr 0.1, β 0.9/0.999, ε 1e-8 = torch.optim.Adam's (D:24, O:114-116, O:355-360);
    #   300 iterations (D:23, O:215); mask clamped to [0, 1] after each step (O:362-363).
    # - l1 1e-4 · Σ|m − 1| over the 28×28 lattice (D:25-26 l1_lambda, l1_ideal 1; O:321-322);
    #   the second l1 term is off (D:27 l1_lambda_2 0).
    # - tv 1e-2 · Σ_ij (Δrow² + Δcol²)^(β/2), β 3: isotropic and summed, forward differences
    #   zero past the last row/column (D:28-29, O:338-339, tv() O:446-452); its gradient is
    #   tv()'s hand-written one, v floored at 1e-5 (O:453-459). conv_norm off (D:37).
    # - mask 28×28 = 224/8 (D:39 mask_scale 8, O:197-199), initialised U[0, 1) (O:199
    #   np.random.rand; main() passes mask_init_type None unless --mask_init, O:721).
    # - up(): nearest ×8 block copy (O:247-248, resize() O:425-444); then Pillow's
    #   GaussianBlur(5) (D:38, O:250-251, blur() O:475-478), whose radius is the σ of the
    #   Gaussian it approximates. Composite x·M + p·(1 − M) (O:253).
    # - the score's gradient is taken w.r.t. the blurred mask and summed over 8×8 blocks
    #   (O:313-317, O:350-351): it skips the blur's transpose -> mask_blur_gradient "skip".
    # - p(x): Pillow GaussianBlur(10) of the ORIGINAL photo, then resized with the image
    #   (D:33 null_type 'blur', O:155-156, get_blurred_img() O:480-483 ignores its radius
    #   argument) -> blur_at "original": σ 10·H/height × 10·W/width at the model input.
    # - jitter 4 (D:30): image and p(x) resized to (224+4)² (O:138-142, O:217) and both
    #   cropped at (j1, j2) = randint(4)² under the fixed mask (O:218-227) -> "crop".
    # - noise 0 (D:32); when on, the released code adds it to the mask, not the image (O:239-246).
    # - the saved mask is resize + blur of m (O:413-416), i.e. applied_masks(m).
    # Deviations that remain:
    # - the model: Caffe's BVLC GoogLeNet (main() default, O:691; 224×224 input, BGR, mean
    #   subtracted, 0-255) against the model mpbatch is run with (default EfficientNet-Lite0).
    # - resampling: the released code resizes each photo straight to 228² for the canvas
    #   (caffe.io bilinear) and to 224² for scoring; mpbatch gets the batch at the model's
    #   size (antialiased bilinear) and upsamples it bilinearly to (H+4)×(W+4), a second
    #   resampling. p(x) is blurred after the resize with σ scaled per axis, not before it.
    # - blurs: Pillow's GaussianBlur is three box filters with Pillow's own border, on uint8
    #   (the mask truncated to 1/255 first); mpbatch uses sampled float Gaussians (±3σ) with
    #   replicate borders. Measured on a random 28×28 mask at 224 against Pillow 13: max
    #   |ΔM| 0.023, mean 0.005.
    # - randomness: numpy's global generator there, per-image torch generators here (same
    #   distributions, other numbers); float64 numpy mask and Adam there, float32 here.
    # - the ×8 block copy holds at input sizes that are multiples of 28 (224 by default); the
    #   released code asserts it (O:197-198), mpbatch falls back to PyTorch's nearest mode.
    "paper": MaskSettings(
        iterations=300,
        lr=0.1,
        l1=1e-4,
        l1_reduction="sum",
        tv=1e-2,
        tv_beta=3.0,
        tv_reduction="sum",
        tv_isotropic=True,
        mask_size=28,
        mask_init="uniform",
        upsample="nearest",
        mask_blur_sigma=5.0,
        mask_blur_gradient="skip",
        noise=0.0,
        perturbation="blur",
        blur_sigma=10.0,
        blur_kernel=None,
        blur_at="original",
        jitter=4,
        jitter_mode="crop",
    ),
}


@dataclass
class MaskResult:
    """Output of optimize_masks for a batch of B images."""

    masks: torch.Tensor  # B×1×h×w float32 in [0, 1], 1 = kept
    loss: torch.Tensor  # B, the final per-image loss (last iteration)
    prob_masked: torch.Tensor  # B, softmax prob of the target on the final x̃ without noise


def make_batch_substrate(
    images: torch.Tensor,
    settings: MaskSettings,
    seeds: list[int],
    mean_colour=None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """The perturbed images p(x) of a batch, B×3×H×W in [0, 1] (not for blur-pyramid).

    The noise substrate draws from per-image generators seeded apart from the iterations'.
    With blur_at "original" the "blur" substrate's σ is in pixels of each original photo:
    original_sizes gives (width, height) per image (see original_blur_sigmas).
    """
    if settings.perturbation == "blur" and settings.blur_at == "original":
        sigmas = original_blur_sigmas(settings.blur_sigma, images.shape[-2:], original_sizes)
        return gaussian_blur_per_image(images, sigmas, settings.blur_kernel)
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


def original_blur_sigmas(
    sigma: float, size: Sequence[int], original_sizes: Sequence[tuple[int, int]] | None
) -> list[tuple[float, float]]:
    """Per image (σ_y, σ_x) at the model input of a blur of σ pixels on the original photo.

    The released code blurs each photo before resizing it to the square input (H, W) = size;
    a photo of width × height pixels is scaled by H/height and W/width, and so is the σ.
    original_sizes: (width, height) per image, both positive.
    """
    if original_sizes is None:
        raise ValueError(
            "blur_at='original' (the paper preset) needs each image's original size: "
            "pass original_sizes=[(width, height), ...] to optimize_masks/make_batch_substrate"
        )
    height, width = int(size[0]), int(size[1])
    sigmas = []
    for original_width, original_height in original_sizes:
        if original_width <= 0 or original_height <= 0:
            raise ValueError(f"original size {original_width}×{original_height} is not positive")
        sigmas.append((sigma * height / original_height, sigma * width / original_width))
    return sigmas


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One torch.Generator per image, on the batch's device."""
    generators = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        generators.append(generator)
    return generators


def initial_masks(
    settings: MaskSettings, generators: list[torch.Generator], device: torch.device
) -> torch.Tensor:
    """B×1×h×w float32 starting masks: ones, or U[0, 1) drawn from each image's own generator
    (the released code's np.random.rand; its first draws, before any noise or jitter)."""
    size = (settings.mask_size, settings.mask_size)
    if settings.mask_init == "ones":
        return torch.ones(len(generators), 1, *size, device=device)
    return torch.stack([torch.rand(1, *size, generator=g, device=device) for g in generators])


_TV_FLOOR = 1e-5  # the released tv() floors v = |∇m|^β at this in its gradient


class _IsotropicTV(torch.autograd.Function):
    """Σ_ij (d1² + d2²)^(β/2) per mask, d1/d2 the forward row/column differences (0 past
    the last row/column), with the released tv()'s hand-written gradient (optimize_mask.py
    446-460): β · max(v, 1e-5)^((β−2)/β) · d, v = (d1² + d2²)^(β/2). It stays finite where
    the mask is flat, where autograd through the square root would give 0/0 = NaN."""

    @staticmethod
    def forward(ctx, masks: torch.Tensor, beta: float) -> torch.Tensor:
        d1 = torch.zeros_like(masks)
        d2 = torch.zeros_like(masks)
        d1[..., :-1, :] = masks[..., 1:, :] - masks[..., :-1, :]
        d2[..., :, :-1] = masks[..., :, 1:] - masks[..., :, :-1]
        v = (d1 * d1 + d2 * d2).sqrt().pow(beta)
        ctx.save_for_backward(d1, d2, v)
        ctx.beta = beta
        return v.flatten(1).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        d1, d2, v = ctx.saved_tensors
        beta = ctx.beta
        factor = v.clamp_min(_TV_FLOOR).pow((beta - 2.0) / beta)
        g1, g2 = factor * d1, factor * d2
        dx = -(g1 + g2)
        dx[..., 1:, :] += g1[..., :-1, :]
        dx[..., :, 1:] += g2[..., :, :-1]
        return beta * dx * grad.view(-1, *[1] * (dx.dim() - 1)), None


def total_variation(
    masks: torch.Tensor, beta: float, *, isotropic: bool = False, reduction: str = "mean"
) -> torch.Tensor:
    """TV_β per mask: masks B×1×h×w (or B×h×w) in [0, 1] -> B.

    Anisotropic (the seed script's tv_norm): |Δrow|^β over the (h−1)×w row differences plus
    |Δcol|^β over the h×(w−1) column differences, each averaged ("mean") or summed ("sum").
    Isotropic (the released tv()): Σ over the h×w lattice of (Δrow² + Δcol²)^(β/2), the
    forward differences set to 0 past the last row and column; "mean" divides by h·w.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if isotropic:
        total = _IsotropicTV.apply(masks, float(beta))
        return total / masks[0].numel() if reduction == "mean" else total
    rows = (masks[..., 1:, :] - masks[..., :-1, :]).abs().pow(beta).flatten(1)
    cols = (masks[..., :, 1:] - masks[..., :, :-1]).abs().pow(beta).flatten(1)
    if reduction == "sum":
        return rows.sum(1) + cols.sum(1)
    return rows.mean(1) + cols.mean(1)


class _BlurPassingGradient(torch.autograd.Function):
    """Forward: the Gaussian blur of the masks; backward: the gradient unchanged (the released
    code differentiates the score w.r.t. the blurred mask and never through the blur)."""

    @staticmethod
    def forward(ctx, up: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_blur(up, sigma, padding_mode="replicate")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _upsample(masks: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """B×1×h×w -> B×1×H×W: bilinear (align_corners=True, the seed's UpsamplingBilinear2d) or
    nearest (an exact block copy when H, W are multiples of h, w, as the released resize();
    its gradient sums each block; otherwise PyTorch's nearest mode)."""
    height, width = size
    mask_height, mask_width = masks.shape[-2:]
    if mode == "bilinear":
        return F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=True)
    if height % mask_height == 0 and width % mask_width == 0:
        rows = masks.repeat_interleave(height // mask_height, dim=-2)
        return rows.repeat_interleave(width // mask_width, dim=-1)
    return F.interpolate(masks, size=(height, width), mode="nearest")


def applied_masks(
    masks: torch.Tensor, size: tuple[int, int], settings: MaskSettings
) -> torch.Tensor:
    """The masks exactly as the optimiser composites the image with them: B×h×w -> B×H×W.

    masks:    B×h×w in [0, 1], 1 = keep (as stored).
    size:     (H, W), the model's input size.
    settings: settings.upsample picks the interpolation (bilinear with align_corners=True, or
              nearest), then a Gaussian blur of σ settings.mask_blur_sigma (replicate border;
              none at 0). Values stay in [0, 1].

    With the crop jitter this is the mask over the un-jittered image (the mask never moves;
    the image moves beneath it). The saliency the metrics score is 1 − this (deletion game).
    Differentiable; with mask_blur_gradient "skip" the gradient passes the blur unchanged
    (the value is the same). optimize_masks calls this very function every iteration.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be B×h×w, got {tuple(masks.shape)}")
    up = _upsample(masks[:, None], (int(size[0]), int(size[1])), settings.upsample)
    sigma = settings.mask_blur_sigma
    if sigma > 0 and settings.mask_blur_gradient == "skip":
        up = _BlurPassingGradient.apply(up, float(sigma))
    elif sigma > 0:
        up = gaussian_blur(up, sigma, padding_mode="replicate")
    return up[:, 0]


def upsample_masks(masks: torch.Tensor, size: tuple[int, int], blur_sigma: float = 0.0):
    """B×1×h×w -> B×1×H×W, bilinear with aligned corners, then an optional Gaussian blur:
    applied_masks for the bilinear presets (seed). Prefer applied_masks, which follows every
    setting (the paper preset upsamples by nearest)."""
    return applied_masks(masks[:, 0], size, MaskSettings(mask_blur_sigma=blur_sigma))[:, None]


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


def crop_windows(
    canvas: torch.Tensor, offsets: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Each image's H×W window at its own (top, left): canvas B×C×H'×W', offsets B×2 long
    with 0 ≤ top ≤ H' − H and 0 ≤ left ≤ W' − W -> B×C×H×W. Gathers on the canvas's
    device (no host sync)."""
    batch, channels, _, canvas_width = canvas.shape
    height, width = size
    rows = offsets[:, 0:1] + torch.arange(height, device=canvas.device)  # B×H
    cols = offsets[:, 1:2] + torch.arange(width, device=canvas.device)  # B×W
    index = rows.view(batch, 1, height, 1).expand(batch, channels, height, canvas_width)
    out = canvas.gather(2, index)
    return out.gather(3, cols.view(batch, 1, 1, width).expand(batch, channels, height, width))


def jitter_canvas(
    images: torch.Tensor, substrate: torch.Tensor | None, settings: MaskSettings
) -> torch.Tensor:
    """The crop jitter's canvas: images and substrate resized bilinearly to (H+j)×(W+j) and
    stacked along channels, B×6×(H+j)×(W+j); with substrate None (blur-pyramid) the pyramid
    of the resized images, levels along channels, B×3L×(H+j)×(W+j). No gradient."""
    size = (images.shape[-2] + settings.jitter, images.shape[-1] + settings.jitter)
    with torch.no_grad():
        if substrate is None:
            grown = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            levels = blur_pyramid(grown, settings.blur_sigma, settings.pyramid_levels)
            return levels.transpose(0, 1).flatten(1, 2)
        both = torch.cat([images, substrate], dim=1)
        return F.interpolate(both, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class _Scene:
    """What the masks are composited with: B×3×H×W images and their substrate (or an
    L×B×3×H×W blur pyramid), plus the crop jitter's canvas when that jitter is on."""

    images: torch.Tensor
    substrate: torch.Tensor | None
    pyramid: torch.Tensor | None
    canvas: torch.Tensor | None

    def composite(self, applied: torch.Tensor, offsets: torch.Tensor | None = None):
        """x̃ = x · M + p(x) · (1 − M), B×3×H×W, for applied masks M (B×1×H×W); with
        offsets (B×2), image and substrate are the canvas's windows there, M stays put."""
        images, substrate, pyramid = self.images, self.substrate, self.pyramid
        if offsets is not None:
            window = crop_windows(self.canvas, offsets, tuple(images.shape[-2:]))
            if pyramid is not None:
                pyramid = window.unflatten(1, (-1, 3)).transpose(0, 1)
            else:
                images, substrate = window[:, :3], window[:, 3:]
        if pyramid is not None:
            return apply_blur_pyramid(pyramid, applied)
        return images * applied + substrate * (1.0 - applied)


def _make_scene(images, settings, seeds, substrate, mean_colour, original_sizes) -> _Scene:
    pyramid = canvas = None
    if settings.perturbation == "blur-pyramid":
        # The paper's mask-dependent blur: m = 1 the image, m = 0 the strongest blur.
        pyramid = blur_pyramid(images, settings.blur_sigma, settings.pyramid_levels)
        substrate = None
    elif substrate is None:
        substrate = make_batch_substrate(images, settings, seeds, mean_colour, original_sizes)
    if settings.jitter > 0 and settings.jitter_mode == "crop":
        canvas = jitter_canvas(images, substrate, settings)
    return _Scene(images, substrate, pyramid, canvas)


def jitter_offsets(generators, settings: MaskSettings, device) -> torch.Tensor | None:
    """B×2 long jitter draws, one pair per image from its own generator: (dy, dx) in
    [−j, j] for "shift", (j1, j2) in [0, j) for "crop" (numpy's randint(j)); None if off."""
    if settings.jitter <= 0:
        return None
    low, high = -settings.jitter, settings.jitter + 1
    if settings.jitter_mode == "crop":
        low, high = 0, settings.jitter
    draws = [torch.randint(low, high, (2,), generator=g, device=device) for g in generators]
    return torch.stack(draws)


def mask_losses(masks: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    """l1 · area + tv · TV_β(m), per image. masks B×1×h×w -> B.

    The area is what the game pays for: the deleted part |1 − m| in the deletion game, the
    kept part |m| in the preservation game; its mean or sum over the lattice.
    """
    area = (1.0 - masks) if settings.game == "delete" else masks
    area = area.abs().flatten(1)
    area = area.sum(1) if settings.l1_reduction == "sum" else area.mean(1)
    tv = total_variation(
        masks,
        settings.tv_beta,
        isotropic=settings.tv_isotropic,
        reduction=settings.tv_reduction,
    )
    return settings.l1 * area + settings.tv * tv


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


def _noise_scale(model, settings: MaskSettings, device: torch.device) -> torch.Tensor:
    """1×3×1×1: settings.noise in the model's normalised space, converted to pixels by the
    model's `std` attribute (3,) when it has one."""
    std = getattr(model, "std", None)
    std = torch.ones(3) if std is None else torch.as_tensor(std)
    scale = std.detach().to(device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return scale * settings.noise


def _perturbed_inputs(
    scene: _Scene,
    applied: torch.Tensor,
    settings: MaskSettings,
    generators: list[torch.Generator],
    noise: torch.Tensor | None,
    noise_scale: torch.Tensor,
) -> torch.Tensor:
    """One iteration's model inputs, B×3×H×W: the composite under this iteration's jitter
    (each image's draws from its own generator: jitter first, then noise), plus noise.

    One noise buffer is refilled in place, image by image (normal_ on a contiguous 3×H×W
    slice draws exactly what torch.randn(3, H, W) would)."""
    offsets = jitter_offsets(generators, settings, applied.device)
    if offsets is not None and settings.jitter_mode == "crop":
        perturbed = scene.composite(applied, offsets)
    else:
        perturbed = scene.composite(applied)
        if offsets is not None:
            perturbed = jitter_images(perturbed, offsets, settings.jitter)
    if noise is not None:
        for b, generator in enumerate(generators):
            noise[b].normal_(generator=generator)
        perturbed = perturbed + noise.mul_(noise_scale)
    return perturbed


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
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> MaskResult:
    """Learn one deletion mask per image, all images of the batch at once.

    model:     frozen classifier taking pixels B×3×H×W in [0, 1] (it normalises itself);
               its `std` attribute (3,) converts `settings.noise` to pixel space.
    images:    B×3×H×W float in [0, 1], on the model's device.
    targets:   B long, the class each mask explains.
    seeds:     B per-image seeds (see image_seed) for the initial mask, noise and jitter.
    substrate: B×3×H×W perturbed images p(x); computed from settings when None.
    speed:     how to compute the iterations (SpeedOptions; default: the exact float32 path).
    on_iteration: called with the iteration index after each Adam step (progress, timing).
    original_sizes: B (width, height) of the original photos; needed by blur_at "original"
               (the paper preset) to scale the substrate's σ.
    """
    batch, _, height, width = images.shape
    device = images.device
    speed = (speed or SpeedOptions()).resolved(device, getattr(model, "name", ""))
    if settings.game not in GAMES:
        raise SettingsError(f"unknown game {settings.game!r}; choose from {', '.join(GAMES)}")
    mean_colour = getattr(model, "mean", None)
    scene = _make_scene(images, settings, seeds, substrate, mean_colour, original_sizes)
    noise_scale = _noise_scale(model, settings, device)
    noise = torch.empty(batch, 3, height, width, device=device) if settings.noise > 0 else None
    generators = make_generators(list(seeds), device)
    forward = prepare_model(model, speed, device)
    # CUDA graph replays reuse their output memory: tell torch where an iteration begins.
    mark_step = speed.cuda_graphs and device.type == "cuda"
    autocast = autocast_for(speed, device)
    masks = initial_masks(settings, generators, device).requires_grad_(True)
    optimizer = _make_adam(masks, settings.lr, speed.adam)
    per_image_loss = torch.zeros(batch, device=device)
    sign = 1.0 if settings.game == "delete" else -1.0  # preserve: maximise the score

    for iteration in range(settings.iterations):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        applied = applied_masks(masks[:, 0], (height, width), settings)[:, None]
        perturbed = _perturbed_inputs(scene, applied, settings, generators, noise, noise_scale)
        with autocast:
            probs = _target_probs(forward, to_model_format(perturbed, speed), targets)
        per_image_loss = mask_losses(masks, settings) + sign * probs
        optimizer.zero_grad(set_to_none=True)
        per_image_loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            masks.clamp_(0.0, 1.0)
        if on_iteration is not None:
            on_iteration(iteration)

    final = masks.detach()
    prob_masked = _final_probs(model, scene, final, targets, settings, speed)
    return MaskResult(masks=final.clone(), loss=per_image_loss.detach(), prob_masked=prob_masked)


def _final_probs(model, scene, final, targets, settings, speed) -> torch.Tensor:
    """The target's probability on the image perturbed by the final masks, no noise."""
    size = tuple(scene.images.shape[-2:])
    with torch.inference_mode():
        # the applied mask in float32 (outside autocast): what the metrics will score
        applied = applied_masks(final[:, 0], size, settings)[:, None]
        final_images = to_model_format(scene.composite(applied), speed)
        with autocast_for(speed, final.device):
            return _target_probs(model, final_images, targets)  # no compile for one call
