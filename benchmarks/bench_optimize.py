"""Mask optimisation speed: the seed's one-image-at-a-time loop against mpbatch's batched optimiser.

(a) reference: one image at a time, float32, NCHW, batch 1, plain autograd and
    torch.optim.Adam: the seed script's loop, written out below;
(b) ``pipeline.methods.meaningful.optimizer.optimize_masks`` at its defaults and with each
    ``SpeedOptions`` variant (bf16 autocast, channels_last, foreach / fused Adam, the
    recommended combination, optionally torch.compile), at each batch size.

Both do the seed preset's per-iteration work at 224×224: the blur-median substrate is computed
once per image outside the timing, the Gaussian noise is drawn every iteration. Only a few
iterations run (``--warmup`` then ``--iters``): the per-iteration cost is what is compared.
Each iteration is timed on its own (optimize_masks's ``on_iteration`` hook for (b); CUDA
synchronised); the figure is the median of the timed iterations, per image.

    .venv/bin/python -m benchmarks.bench_optimize                          # CPU: batch 1, 8
    .venv/bin/python -m benchmarks.bench_optimize --device cuda --batch-sizes 1,8,16,32,64

Writes ``benchmarks/results/bench_optimize_<device>.csv`` (``--out`` to change); the columns
are described in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from pipeline.data.seeding import image_seed  # noqa: E402
from pipeline.methods.meaningful.optimizer import (  # noqa: E402
    PRESETS,
    optimize_masks,
    total_variation,
)
from pipeline.methods.perturbations import make_substrate  # noqa: E402
from pipeline.models.registry import load_model  # noqa: E402
from pipeline.models.speed import SpeedOptions, cpu_bf16_support  # noqa: E402

SETTINGS = PRESETS["seed"]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; the first
# substring found in the device name wins, so the specific names come first.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
]

VARIANTS: dict[str, SpeedOptions] = {
    "default": SpeedOptions(),
    "bf16": SpeedOptions(precision="bf16"),
    "channels_last": SpeedOptions(channels_last=True),
    "adam_foreach": SpeedOptions(adam="foreach"),
    "adam_fused": SpeedOptions(adam="fused"),
    "bf16+channels_last": SpeedOptions(precision="bf16", channels_last=True),
    # "recommended" is SpeedOptions.recommended(device, model), filled in per model
}


# ----------------------------------------------------------------------------- reference
def reference_step_factory(
    model: nn.Module, image: torch.Tensor, substrate: torch.Tensor, target: int, seed: int
) -> Callable[[], None]:
    """The seed's loop for one image (1×3×H×W): returns a function doing one iteration."""
    height, width = image.shape[-2:]
    std = torch.as_tensor(model.std, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    generator = torch.Generator(device=image.device).manual_seed(seed)
    mask = torch.ones(1, 1, SETTINGS.mask_size, SETTINGS.mask_size, device=image.device)
    mask.requires_grad_(True)
    optimizer = torch.optim.Adam([mask], lr=SETTINGS.lr)
    upsample = nn.UpsamplingBilinear2d(size=(height, width))

    def step() -> None:
        up = upsample(mask)
        perturbed = image * up + substrate * (1.0 - up)
        noise = torch.randn(1, 3, height, width, generator=generator, device=image.device)
        perturbed = perturbed + SETTINGS.noise * std * noise
        prob = F.softmax(model(perturbed), dim=1)[0, target]
        loss = (
            SETTINGS.l1 * (1.0 - mask).abs().mean()
            + SETTINGS.tv * total_variation(mask, SETTINGS.tv_beta).sum()
            + prob
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mask.data.clamp_(0.0, 1.0)

    return step


# ----------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or on Linux CPUs the rise of the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its size
    at the start, after gc and malloc_trim. Falls back to ru_maxrss growth elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_hwm_rise"
        self.mb = float("nan")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _proc_status_kb("VmRSS")
        except OSError:
            import resource

            self.kind = "cpu_ru_maxrss_growth"
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.kind == "cpu_rss_hwm_rise":
            self.mb = (_proc_status_kb("VmHWM") - self.start) / 1024
        else:
            import resource

            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start) / 1024


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steady_time(stamps: list[float], warmup: int) -> tuple[float, float]:
    """(median seconds of the iterations after `warmup`, excess of the first iteration).

    stamps: the start time, then one time after each iteration. The median resists the
    spikes a busy machine adds to single iterations.
    """
    durations = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)]
    median = statistics.median(durations[warmup:])
    return median, durations[0] - median


def time_reference(model, image, substrate, target, seed, warmup, iters, device):
    """Median seconds per iteration of the reference loop, after `warmup` iterations."""
    step = reference_step_factory(model, image, substrate, target, seed)
    sync(device)
    stamps = [time.perf_counter()]
    for _ in range(warmup + iters):
        step()
        sync(device)
        stamps.append(time.perf_counter())
    return steady_time(stamps, warmup)[0]


def time_batched(model, images, substrate, targets, seeds, speed, warmup, iters, device):
    """(median seconds per batch iteration after `warmup`, excess of the first iteration:
    oneDNN / cuDNN set-up, compilation) from one optimize_masks call."""
    stamps: list[float] = []

    def stamp(_: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    settings = SETTINGS.replace(iterations=warmup + iters)
    sync(device)
    stamps.append(time.perf_counter())
    optimize_masks(
        model, images, targets, seeds, settings, substrate, speed=speed, on_iteration=stamp
    )
    return steady_time(stamps, warmup)


def flops_per_image_iteration(model, image, substrate, target, device) -> float:
    """FLOPs (matmul/conv, forward + input-gradient backward) of one reference iteration."""
    from torch.utils.flop_counter import FlopCounterMode

    step = reference_step_factory(model, image, substrate, target, 0)
    with FlopCounterMode(display=False) as counter:
        step()
    sync(device)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- set-up
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def bf16_peak(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def smooth_images(n: int, size: int, device: torch.device) -> torch.Tensor:
    """n×3×size×size synthetic images in [0, 1]: upsampled random 7×7 colour fields."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 7, 7, generator=generator)
    images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return images.clamp(0, 1).to(device)


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet50,vgg19")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default=None, help="default: 1,8 (CPU), 1,8,16,32,64")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--variants",
        default=",".join([*VARIANTS, "recommended"]),
        help="comma list of: " + ", ".join([*VARIANTS, "recommended"]),
    )
    parser.add_argument(
        "--compile-batch-sizes",
        default="",
        help="also time torch.compile (on top of the recommended options) at these batch sizes",
    )
    parser.add_argument(
        "--cudagraph-batch-sizes",
        default="",
        help="also time torch.compile with CUDA graphs (reduce-overhead) on top of the "
        "recommended options at these batch sizes (CUDA only)",
    )
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True) before any work, for every variant alike",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (CPU); 1 gives stable figures on a machine shared with "
        "other jobs, where OpenMP threads wait on each other at every operator",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the device")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def make_row(
    base: dict, variant: str, batch: int, s_img_iter: float, ref_s: float, flops: float, speed, mem
) -> dict:
    """One CSV row; `speed` None for the reference loop."""
    speed = speed or SpeedOptions()
    tflops = flops / s_img_iter / 1e12 if s_img_iter > 0 else float("nan")
    peak = base["peak_tflops_bf16"]
    row = {
        **base,
        "variant": variant,
        "precision": speed.precision,
        "channels_last": speed.channels_last,
        "adam": speed.adam,
        "compile": speed.compile,
        "cuda_graphs": speed.cuda_graphs,
        "batch_size": batch,
        "s_per_img_iter": round(s_img_iter, 6),
        "images_per_s_500": round(1.0 / (s_img_iter * SETTINGS.iterations), 6),
        "ratio_vs_reference": round(ref_s / s_img_iter, 3),
        "peak_mem_mb": round(mem.mb, 1),
        "peak_mem_kind": mem.kind,
        "gflop_per_img_iter": round(flops / 1e9, 3),
        "achieved_tflops": round(tflops, 4),
        "peak_fraction": round(tflops / peak, 4) if peak else "",
        "first_call_extra_s": "",
        "note": "",
    }
    print(
        f"{base['model']:<18} {variant:<22} {batch:>3} {s_img_iter:>10.4f} "
        f"{row['images_per_s_500']:>9.4f} {row['ratio_vs_reference']:>6.2f} "
        f"{mem.mb:>7.0f} {tflops:>8.3f}",
        flush=True,
    )
    return row


def bench_model(
    model_name: str,
    args: argparse.Namespace,
    device: torch.device,
    data: tuple[torch.Tensor, torch.Tensor, list[int]],
    common: dict,
    peak: float | None,
) -> list[dict]:
    """The reference and every (variant, batch size) of the plan for one model: CSV rows."""
    images_all, substrate_all, seeds_all = data
    torch.manual_seed(0)
    model = load_model(model_name, weights="random").to(device)
    with torch.no_grad():
        target = int(model(images_all[:1]).argmax(1))
    targets_all = torch.full((len(seeds_all),), target, dtype=torch.long, device=device)
    flops = flops_per_image_iteration(model, images_all[:1], substrate_all[:1], target, device)
    base = {**common, "model": model_name, "peak_tflops_bf16": peak or ""}

    with PeakMemory(device) as mem:
        s_ref = time_reference(
            model,
            images_all[:1],
            substrate_all[:1],
            target,
            seeds_all[0],
            args.warmup,
            args.iters,
            device,
        )
    rows = [make_row(base, "reference", 1, s_ref, s_ref, flops, None, mem)]

    variants = dict(VARIANTS)
    variants["recommended"] = SpeedOptions.recommended(device, model_name)
    plan = [(v, variants[v], b) for b in args.batch_sizes_list for v in args.variant_names]
    compiled = SpeedOptions(**{**variants["recommended"].to_dict(), "compile": True})
    plan += [("recommended+compile", compiled, b) for b in args.compile_sizes_list]
    graphed = SpeedOptions(**{**compiled.to_dict(), "cuda_graphs": True})
    plan += [("recommended+cudagraphs", graphed, b) for b in args.cudagraph_sizes_list]
    done: dict[tuple[SpeedOptions, int], dict] = {}
    for variant, speed, batch in plan:
        if (speed, batch) in done:  # "recommended" equal to a variant already timed
            rows.append({**done[speed, batch], "variant": variant})
            continue
        try:
            with PeakMemory(device) as mem:
                s_iter, first_extra = time_batched(
                    model,
                    images_all[:batch],
                    substrate_all[:batch],
                    targets_all[:batch],
                    seeds_all[:batch],
                    speed,
                    args.warmup,
                    args.iters,
                    device,
                )
        except Exception as exc:  # e.g. out of memory at a large batch: record it, go on
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"{model_name:<18} {variant:<22} {batch:>3} {note}", flush=True)
            rows.append({**base, "variant": variant, "batch_size": batch, "note": note})
            model.to(memory_format=torch.contiguous_format)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row = make_row(base, variant, batch, s_iter / batch, s_ref, flops, speed, mem)
        row["first_call_extra_s"] = round(first_extra, 2)
        rows.append(row)
        done[speed, batch] = row
        model.to(memory_format=torch.contiguous_format)  # channels_last converts in place
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.flush_denormal:
        # before the first parallel op, so that the OpenMP workers inherit the FTZ/DAZ flags
        torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_sizes = _ints(args.batch_sizes or ("1,8" if device.type == "cpu" else "1,8,16,32,64"))
    compile_sizes = _ints(args.compile_batch_sizes)
    cudagraph_sizes = _ints(args.cudagraph_batch_sizes)
    variant_names = [v for v in args.variants.split(",") if v]
    unknown = set(variant_names) - {*VARIANTS, "recommended"}
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    name = device_name(device)
    peak = bf16_peak(name, args.peak_tflops)
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_optimize_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {"device": device.type, "device_name": name, **versions(), "size": args.size}
    if device.type == "cpu":  # what --precision auto reads (the same CPU model can differ)
        common["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        common["cpu_bf16_support"] = cpu_bf16_support()
    common |= {"warmup": args.warmup, "iters": args.iters, "flush_denormal": args.flush_denormal}
    common |= {"threads": torch.get_num_threads()}

    args.batch_sizes_list, args.compile_sizes_list = batch_sizes, compile_sizes
    args.cudagraph_sizes_list = cudagraph_sizes
    args.variant_names = variant_names
    n_max = max(batch_sizes + compile_sizes + cudagraph_sizes)
    images_all = smooth_images(n_max, args.size, device)
    substrate_all = make_substrate(images_all, SETTINGS.perturbation, blur_sigma=5.0)
    seeds_all = [image_seed(0, f"bench_{i}.png") for i in range(n_max)]
    rows: list[dict] = []
    header = (
        f"{'model':<18} {'variant':<22} {'B':>3} {'s/img/iter':>10} {'img/s@500':>9} "
        f"{'ratio':>6} {'peakMB':>7} {'TFLOP/s':>8}"
    )
    print(f"{name}; torch {torch.__version__}; {SETTINGS.iterations}-iteration masks\n{header}")

    for model_name in args.models.split(","):
        rows += bench_model(
            model_name, args, device, (images_all, substrate_all, seeds_all), common, peak
        )
        gc.collect()
        write_csv(out, rows)  # after every model, so that a killed run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
