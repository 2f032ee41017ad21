"""Deletion + insertion curves: a per-image, step-by-step reference against the batched code.

(a) reference: for each image, the RISE-style loop: start from the image (deletion) or its
    blurred copy (insertion), score it, change the next `step` pixels of the saliency order
    in place, score again, ... one model call per step with a batch of one image;
(b) batched: ``pipeline.metrics.deletion_insertion.perturbation_curves``, all step images
    of all images in chunks of ``--eval-batch-size``.

Both run on the same images, saliency maps, targets and model; the script prints the
largest difference between their curves and the images/s of each (deletion and insertion
of one image = one image), and appends two rows to
``benchmarks/results/bench_metrics_<device>.csv``. Wall and process-CPU times are both kept:
on a shared, oversubscribed CPU the one-image calls lose far more to thread contention
than the batched ones, so compare runs made under similar load (or with ``--threads 1``).

    .venv/bin/python -m benchmarks.bench_metrics                 # resnet18, 2 images on CPU
    .venv/bin/python -m benchmarks.bench_metrics --device cuda --images 32
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from pipeline.metrics.deletion_insertion import CurveProtocol, perturbation_curves  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """A classifier on normalised input, taking pixels in [0, 1] (mean / std / normalize)."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(pixels))


def load_model(name: str) -> tuple[nn.Module, str]:
    """Random-weight model: the project's registry when it has one, else torchvision."""
    torch.manual_seed(0)
    try:
        from pipeline.models.registry import load_model as registry_load

        return registry_load(name, "random"), f"pipeline.models.registry:{name} (random weights)"
    except Exception:  # registry missing, or it cannot give random weights: use torchvision
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        return Normalized(net), f"torchvision:{name} (random weights)"


# ----------------------------------------------------------------------------- reference
def blur_normalised(model: nn.Module, image: torch.Tensor, kernel: int, sigma: float):
    """Insertion start image: Gaussian blur in normalised space, zero padding (1×3×H×W)."""
    mean = torch.as_tensor(model.mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    std = torch.as_tensor(model.std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    d = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = (g / g.sum()).to(image)
    weight = (g[:, None] * g[None, :]).repeat(3, 1, 1, 1)
    z = F.conv2d((image - mean) / std, weight, padding=kernel // 2, groups=3)
    return z * std + mean


def reference_curve(
    model: nn.Module,
    image: torch.Tensor,
    saliency: np.ndarray,
    target: int,
    mode: str,
    protocol: CurveProtocol,
) -> np.ndarray:
    """One image's curve, RISE style: change `step` pixels, score one image, repeat."""
    _, h, w = image.shape
    hw = h * w
    n = protocol.n_steps(hw)
    # Most salient first; a stable sort of the negated map keeps ties in raster order.
    order = torch.from_numpy(np.argsort(-saliency.reshape(-1), kind="stable")).to(image.device)
    if mode == "deletion":
        mean = torch.as_tensor(model.mean, dtype=image.dtype, device=image.device)
        current = image.clone().view(3, hw)
        finish = mean.view(3, 1).expand(3, hw)
    else:
        blurred = blur_normalised(model, image[None], protocol.blur_kernel, protocol.blur_sigma)
        current = blurred[0].clone().view(3, hw)
        finish = image.reshape(3, hw)
    scores = np.empty(n + 1)
    for k in range(n + 1):
        logits = model(current.view(1, 3, h, w))
        scores[k] = torch.softmax(logits.double(), dim=1)[0, target].item()
        if k < n:
            pixels = order[k * protocol.step : (k + 1) * protocol.step]
            current[:, pixels] = finish[:, pixels]
    return scores


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds; CPU time counts every thread and ignores other processes."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def run_reference(model, images, saliency, targets, protocol, device) -> tuple[dict, tuple]:
    curves = {"deletion": [], "insertion": []}
    _sync(device)
    started = _clock()
    with torch.inference_mode():
        for i in range(images.shape[0]):
            for mode in curves:
                curve = reference_curve(
                    model, images[i], saliency[i], int(targets[i]), mode, protocol
                )
                curves[mode].append(curve)
    _sync(device)
    return {m: np.stack(c) for m, c in curves.items()}, _since(started)


def run_batched(model, images, saliency, targets, protocol, device, batch) -> tuple[dict, tuple]:
    sal = torch.from_numpy(saliency).to(device)
    curves = {}
    _sync(device)
    started = _clock()
    for mode in ("deletion", "insertion"):
        curves[mode] = perturbation_curves(
            model, images, sal, targets, mode=mode, protocol=protocol, eval_batch_size=batch
        )
    _sync(device)
    return {m: c.double().cpu().numpy() for m, c in curves.items()}, _since(started)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=None, help="default 4 GPU, 2 CPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--step", type=int, default=224)
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default 256 GPU, 8 CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; best kept")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: results/)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # On a small CPU batching buys little (the model is compute-bound) and big batches
    # fall out of cache; fewer images keep the default run to a few minutes.
    cpu = device.type == "cpu"
    batch = args.eval_batch_size or (8 if cpu else 256)
    args.images = args.images or (2 if cpu else 4)
    protocol = CurveProtocol(step=args.step)
    model, model_desc = load_model(args.model)
    model = model.to(device).eval()

    gen = torch.Generator().manual_seed(args.seed)
    # Smooth random images (upsampled noise) so the model sees some structure.
    low = torch.rand(args.images, 3, 14, 14, generator=gen)
    images = F.interpolate(low, size=(args.size, args.size), mode="bilinear").to(device)
    saliency = torch.rand(args.images, args.size, args.size, generator=gen).numpy()
    with torch.inference_mode():
        targets = model(images).argmax(1)
        model(images[:1])  # warm-up of both paths' batch shapes
        model(images[:1].expand(min(batch, 64), -1, -1, -1))

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ref_times, fast_times = [], []
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        ref, seconds = run_reference(model, images, saliency, targets, protocol, device)
        ref_times.append(seconds)
        fast, seconds = run_batched(model, images, saliency, targets, protocol, device, batch)
        fast_times.append(seconds)
    ref_s, fast_s = min(t[0] for t in ref_times), min(t[0] for t in fast_times)
    ref_cpu, fast_cpu = min(t[1] for t in ref_times), min(t[1] for t in fast_times)
    diff = max(float(np.abs(ref[m] - fast[m]).max()) for m in ref)
    rel = diff / max(float(np.abs(ref[m]).max()) for m in ref)
    ref_ips, fast_ips = args.images / ref_s, args.images / fast_s
    ratio = fast_ips / ref_ips

    steps = protocol.n_steps(args.size * args.size) + 1
    print(f"model {model_desc}, {args.images} images {args.size}x{args.size}, step {args.step}")
    print(f"  {steps} scores per curve, device {device_name(device)}, torch {torch.__version__}")
    print(f"  load average before: {load_before:.2f}; best of {args.repeats} runs each")
    print(f"  reference (one image per call): {ref_s:8.2f} s  {ref_ips:8.3f} images/s")
    print(f"  batched (batch {batch:4d}):        {fast_s:8.2f} s  {fast_ips:8.3f} images/s")
    print(
        f"  all runs (wall s): reference {[round(t[0], 1) for t in ref_times]}, batched "
        f"{[round(t[0], 1) for t in fast_times]}"
    )
    print(
        f"  CPU seconds (all threads): reference {ref_cpu:.1f}, batched {fast_cpu:.1f}\n"
        f"  ratio batched/reference: {ratio:.2f}x wall, {ref_cpu / fast_cpu:.2f}x CPU time; "
        f"max |curve difference|: {diff:.3g} "
        f"({rel:.3g} of the largest score)"
    )

    out = args.out or ROOT / "benchmarks" / "results" / f"bench_metrics_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "model": model_desc,
        "images": args.images,
        "size": args.size,
        "step": args.step,
        "scores_per_curve": steps,
        "max_abs_diff": f"{diff:.3g}",
        "max_rel_diff": f"{rel:.3g}",
        "repeats": args.repeats,
        "load_before": f"{load_before:.2f}",
        "note": ("fewer images by default on CPU; " if cpu and args.images == 2 else "")
        + "deletion + insertion per image; best of the repeats; random weights, "
        "synthetic smooth images, uniform-noise saliency",
    }
    rows = [
        {
            "implementation": "reference",
            "eval_batch_size": 1,
            "seconds": ref_s,
            "cpu_seconds": ref_cpu,
            "ratio": 1.0,
            "cpu_ratio": 1.0,
        },
        {
            "implementation": "batched",
            "eval_batch_size": batch,
            "seconds": fast_s,
            "cpu_seconds": fast_cpu,
            "ratio": ratio,
            "cpu_ratio": ref_cpu / fast_cpu,
        },
    ]
    fields = ["implementation", *common, "eval_batch_size", "seconds", "images_per_s", "ratio"]
    fields += ["cpu_seconds", "cpu_ratio"]
    # Runs accumulate in one file per device; a file with other columns is started afresh.
    header = out.read_text().splitlines()[:1] if out.is_file() else []
    append = header == [",".join(fields)]
    with out.open("a" if append else "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        if not append:
            writer.writeheader()
        for row in rows:
            row["images_per_s"] = f"{args.images / row['seconds']:.4g}"
            row["seconds"] = f"{row['seconds']:.3f}"
            for key in ("ratio", "cpu_ratio", "cpu_seconds"):
                row[key] = f"{row[key]:.3f}"
            writer.writerow({**common, **row})
    print(f"{'appended to' if append else 'wrote'} {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
