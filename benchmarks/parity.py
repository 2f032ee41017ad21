"""mpbatch side by side with the reference implementations, on real images.

1. Extremal perturbations: TorchRay's own `extremal_perturbation` (PyPI `torchray`) against
   `pipeline.methods.extremal.optimizer.extremal_masks`, same model, image, target, areas,
   iterations. Per image and area: Pearson r of the two masks, both areas (fraction of
   pixels > 0.5), and the distance between the points the two saliency maps choose under
   TorchRay's benchmark protocol (masks resized to the original size, smoothed with
   σ = 0.09·min(H, W), summed over areas); the seconds per image of each (TorchRay one image
   at a time, mpbatch the whole batch at once, divided by its size).
   Controls, because the optimisation amplifies float rounding exponentially (a 1e-7
   difference after the first step reaches O(1) within a few hundred steps): TorchRay against
   itself run on 1 thread instead of `--threads` (r_torchray_vs_itself), and mpbatch with the
   image alone instead of in the batch (r_alone_vs_torchray).
2. Deletion / insertion: mpbatch's `score_saliency` against a plain re-implementation of RISE's
   `CausalMetric.single_run` (eclique/RISE evaluation.py) written below: np.argsort flipped
   for the order, the step images built one at a time, gkern via scipy, the target's softmax
   probability, RISE's auc(). Both score the same saliency (the extremal masks' sum).

    python -m benchmarks.parity --count 4 --iterations 300

Writes benchmarks/results/parity_extremal_<model>.csv and parity_curves_<model>.csv.
Needs `pip install --no-deps torchray` and scipy (test-only dependencies).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.data.datasets import discover
from pipeline.data.images import decode_image, resize_image
from pipeline.methods.extremal.optimizer import ExtremalSettings, extremal_masks, extremal_saliency
from pipeline.metrics.deletion_insertion import CurveProtocol, score_saliency
from pipeline.metrics.pointing import pointing_points
from pipeline.models.registry import load_model

RESULTS = Path(__file__).parent / "results"


def torchray_masks(model, image: torch.Tensor, target: int, settings: ExtremalSettings):
    """TorchRay's extremal_perturbation on one image: A×H×W masks and the seconds it took."""
    from torchray.attribution.extremal_perturbation import extremal_perturbation

    tick = time.perf_counter()
    masks, _ = extremal_perturbation(
        model.model,  # TorchRay's model sees the normalised image
        model.normalize(image),
        target,
        areas=list(settings.areas),
        max_iter=settings.iterations,
        num_levels=settings.pyramid_levels,
        step=settings.step,
        sigma=settings.sigma,
        jitter=settings.jitter,
    )
    return masks[:, 0].detach(), time.perf_counter() - tick


def rise_gkern(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's gkern: scipy's gaussian_filter of a delta, one 2-D kernel per channel."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    kernel = np.zeros((3, 3, size, size))
    for c in range(3):
        kernel[c, c] = gaussian_filter(delta, sigma)
    return torch.from_numpy(kernel.astype("float32"))


def rise_causal_metric(model, image, saliency, target: int, mode: str, step: int = 224):
    """RISE's CausalMetric.single_run (deletion 'del' or insertion 'ins') on one image, one
    step image at a time, as evaluation.py does; returns the AUC. image 1×3×H×W pixels,
    saliency H×W numpy."""
    normalised = model.normalize(image)
    height, width = normalised.shape[-2:]
    pixels = height * width
    steps = (pixels + step - 1) // step
    if mode == "del":
        start, finish = normalised.clone(), torch.zeros_like(normalised)
    else:
        kernel = rise_gkern()
        start = F.conv2d(normalised, kernel, padding=kernel.shape[-1] // 2)
        finish = normalised.clone()
    order = np.flip(np.argsort(saliency.reshape(-1, pixels), axis=1), axis=-1)[0].copy()
    scores = np.empty(steps + 1)
    for i in range(steps + 1):
        with torch.no_grad():
            scores[i] = torch.softmax(model.model(start), 1)[0, target].item()
        if i < steps:
            coords = torch.from_numpy(order[step * i : step * (i + 1)])
            start.view(3, pixels)[:, coords] = finish.view(3, pixels)[:, coords]
    return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().cpu(), b.flatten().cpu())[0, 1])


def benchmark_point(masks: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
    """TorchRay's benchmark point of A×H×W masks: x, y in the original (width, height)."""
    return pointing_points(extremal_saliency(masks[None]), [original], smooth=0.09)[0]


def load_images(data: Path, count: int, size: int):
    samples, _ = discover(data)
    samples = [s for s in samples if s.label >= 0][:count]
    images, originals = [], []
    for sample in samples:
        pixels, width, height = decode_image(data / sample.path)
        images.append(resize_image(pixels, size))
        originals.append((width, height))
    return samples, torch.stack(images), originals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/imagenet-val-sample"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--areas", default="0.1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    settings = ExtremalSettings(
        areas=tuple(float(a) for a in args.areas.split(",")), iterations=args.iterations
    )
    samples, images, originals = load_images(args.data, args.count, 224)
    images = images.to(device)
    targets = torch.tensor([s.label for s in samples], device=device)

    tick = time.perf_counter()
    ours = extremal_masks(model, images, targets, list(range(len(samples))), settings)
    ours_seconds = (time.perf_counter() - tick) / len(samples)

    mask_rows, curve_rows = [], []
    for i, sample in enumerate(samples):
        theirs, theirs_seconds = torchray_masks(model, images[i : i + 1], int(targets[i]), settings)
        mine = ours.full_masks[i].to(theirs.device)
        alone = extremal_masks(model, images[i : i + 1], targets[i : i + 1], [i], settings)
        torch.set_num_threads(1)
        control, _ = torchray_masks(model, images[i : i + 1], int(targets[i]), settings)
        torch.set_num_threads(args.threads)
        distance = benchmark_point(mine, originals[i]) - benchmark_point(theirs, originals[i])
        for a, area in enumerate(settings.areas):
            r = _pearson(mine[a], theirs[a])
            mask_rows.append(
                {
                    "image": sample.path,
                    "area": area,
                    "pearson_r": r,
                    "r_alone_vs_torchray": _pearson(alone.full_masks[0, a], theirs[a]),
                    "r_torchray_vs_itself": _pearson(control[a], theirs[a]),
                    "max_abs_diff": (mine[a] - theirs[a]).abs().max().item(),
                    "area_mpbatch": (mine[a] > 0.5).float().mean().item(),
                    "area_torchray": (theirs[a] > 0.5).float().mean().item(),
                    "point_distance_px": distance.norm().item(),
                    "seconds_mpbatch": ours_seconds,
                    "seconds_torchray": theirs_seconds,
                }
            )
        saliency = extremal_saliency(mine[None])
        scores = score_saliency(
            model,
            images[i : i + 1],
            saliency,
            targets[i : i + 1],
            [None],
            [originals[i]],
            protocol=CurveProtocol(),
            eval_batch_size=16,
        )
        for mode, name in (("del", "deletion"), ("ins", "insertion")):
            reference = rise_causal_metric(
                model, images[i : i + 1], saliency[0].cpu().numpy(), int(targets[i]), mode
            )
            curve_rows.append(
                {
                    "image": sample.path,
                    "metric": name,
                    "auc_mpbatch": scores[f"{name}_auc"][0].item(),
                    "auc_rise_reimplementation": reference,
                    "difference": scores[f"{name}_auc"][0].item() - reference,
                }
            )
        print(pd.DataFrame(mask_rows[-len(settings.areas) :]).to_string(index=False))
        print(pd.DataFrame(curve_rows[-2:]).to_string(index=False), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}_{args.device}_it{args.iterations}"
    pd.DataFrame(mask_rows).to_csv(RESULTS / f"parity_extremal_{tag}.csv", index=False)
    pd.DataFrame(curve_rows).to_csv(RESULTS / f"parity_curves_{tag}.csv", index=False)
    print(f"written: {RESULTS}/parity_*_{tag}.csv")


if __name__ == "__main__":
    main()
