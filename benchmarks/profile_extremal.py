"""Where one extremal step's time goes (issue 26, item 3), on the reference path and on the
fast path: the parts of `extremal.extremal_masks`'s iteration timed apart with the library's
own pieces, forward and backward each (the mask generator, the area loss's sort, the
blur-pyramid blend, the model, the SGD step), and whole steps of `extremal_masks` itself.

    .venv/bin/python -m benchmarks.profile_extremal --threads 1 --images 1
    python -m benchmarks.profile_extremal --device cuda --images 40 --precision bf16 \
        --out benchmarks/results/profile_extremal_cuda.csv

`--preset torchray-voc`'s settings (4 areas, step 7, σ 21, 8 pyramid levels) at 224 px with
efficientnet_lite0. Appends one row per path and part to the CSV (default
benchmarks/results/profile_extremal_cpu.csv): the device, torch, the path, the part, median
seconds per step and its share of the parts' sum. The parts are timed one at a time (autograd
through each part alone), so they add up to about a step. "whole step" rows come from
extremal_masks run for 2 and for 2 + --steps iterations: the difference over --steps, so the
pyramid and the final scoring are left out; the reference and the fast path alternate, and
the ratio of their medians is the fast path's speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_resume import cpu_name  # noqa: E402
from benchmarks.bench_scoring_format import append_rows  # noqa: E402
from pipeline.methods import get_method  # noqa: E402
from pipeline.methods.extremal.optimizer import (  # noqa: E402
    ExtremalSettings,
    _problem,
    area_loss,
    area_references,
    extremal_masks,
    reward_scores,
)
from pipeline.methods.perturbations import apply_blur_pyramid  # noqa: E402
from pipeline.models.registry import load_model  # noqa: E402
from pipeline.models.speed import SpeedOptions, autocast_for, prepare_model  # noqa: E402


def seconds_of(work, device: torch.device) -> float:
    """Seconds of one call of `work`, waiting for the GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tick


def timed(work, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    work()
    return statistics.median(seconds_of(work, device) for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="iterations per whole-step timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="the fast path's model"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/profile_extremal_cpu.csv"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings: ExtremalSettings = get_method("extremal").presets["torchray-voc"]
    model = load_model(args.model).eval().to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, 224, 224, generator=generator).to(device)
    speeds = {
        "reference": SpeedOptions(reference=True),
        "fast": SpeedOptions(precision=args.precision),
    }
    seconds = {}
    for path, speed in speeds.items():
        parts = step_parts(model, images, settings, path == "fast", speed)
        seconds.update({(path, name): timed(work, args.repeats, device) for name, work in parts})
    steps = {path: [] for path in speeds}
    targets = torch.zeros(args.images, dtype=torch.long, device=device)
    seeds = list(range(args.images))

    def run_for(iterations: int, speed: SpeedOptions) -> float:
        chosen = settings.replace(iterations=iterations)
        return seconds_of(
            lambda: extremal_masks(model, images, targets, seeds, chosen, speed=speed), device
        )

    for speed in speeds.values():
        run_for(2, speed)  # warm-up (and compilation, if any)
    for _ in range(max(1, args.repeats // 2)):
        for path, speed in speeds.items():  # alternating, so that load falls on both alike
            short, long = run_for(2, speed), run_for(2 + args.steps, speed)
            steps[path].append((long - short) / args.steps)
    for path in speeds:
        seconds[path, "whole step"] = statistics.median(steps[path])
    rows = []
    for (path, name), value in seconds.items():
        parts_sum = sum(v for (p, n), v in seconds.items() if p == path and n != "whole step")
        rows.append(
            {
                "device": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "model": args.model,
                "images": args.images,
                "masks": args.images * len(settings.areas),
                "path": path,
                "precision": "fp32" if path == "reference" else args.precision,
                "part": name,
                "seconds_per_step": round(value, 4),
                "share": round(value / parts_sum, 3) if name != "whole step" else "",
            }
        )
    for row in rows:
        print(row, flush=True)
    ratio = seconds["reference", "whole step"] / seconds["fast", "whole step"]
    print(f"whole step: the fast path is {ratio:.2f}x the reference's speed", flush=True)
    append_rows(args.out, rows)


def step_parts(model, images, settings: ExtremalSettings, fast: bool, speed: SpeedOptions):
    """(name, work) for each part of one step, as extremal_masks computes it on that path."""
    batch = images.shape[0]
    network, pyramid, generator = _problem(model, images, settings, fast)
    forward = prepare_model(network, speed, images.device)
    areas = len(settings.areas)
    count = batch * areas
    index = torch.arange(batch, device=images.device).repeat_interleave(areas)
    targets = torch.zeros(count, dtype=torch.long, device=images.device)
    pixels = generator.extended[0] * generator.extended[1]
    references = area_references(settings.areas, pixels, images.device).repeat(batch, 1)
    params = torch.full((count, *generator.grid), 0.5, device=images.device, requires_grad=True)
    optimizer = torch.optim.SGD([params], lr=settings.lr, momentum=settings.momentum)
    extended = generator(params.detach()).requires_grad_(True)
    masks = generator.crop(extended.detach()).requires_grad_(True)
    blended = apply_blur_pyramid(pyramid, masks.detach(), index, torchray_ends=True)
    inputs = blended.detach().requires_grad_(True)

    def mask_generator() -> None:
        generator(params).sum().backward()

    def sort_loss() -> None:
        area_loss(extended, references).sum().backward()

    def blend() -> None:
        apply_blur_pyramid(pyramid, masks, index, torchray_ends=True).sum().backward()

    def network_pass() -> None:
        with autocast_for(speed, images.device):
            logits = forward(inputs)
        reward_scores(logits, targets, settings.reward).sum().backward(inputs=[inputs])

    def sgd_step() -> None:
        params.grad = torch.ones_like(params)
        optimizer.step()
        with torch.no_grad():
            params.clamp_(0, 1)

    return [
        ("mask generator", mask_generator),
        ("area loss (sort)", sort_loss),
        ("blur-pyramid blend", blend),
        ("model forward + input gradient", network_pass),
        ("SGD step + clamp", sgd_step),
    ]


if __name__ == "__main__":
    main()
