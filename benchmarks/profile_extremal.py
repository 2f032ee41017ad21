"""Where one extremal step's time goes (issue 26, item 3): the parts of
`extremal.extremal_masks`'s iteration timed apart with the library's own pieces, forward and
backward each: the mask generator, the area loss's sort, the blur-pyramid blend, the model,
and the SGD step.

    .venv/bin/python benchmarks/profile_extremal.py --threads 1 --images 1 [--compile]

`--preset torchray-voc`'s settings (4 areas, step 7, σ 21, 8 pyramid levels) at 224 px with
efficientnet_lite0. Appends one row per part to benchmarks/results/profile_extremal_cpu.csv:
the CPU, torch, the part, median seconds per step and its share of the step. The parts are
timed one at a time (autograd through each part alone), so they add up to about a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_resume import cpu_name  # noqa: E402
from bench_scoring_format import append_rows  # noqa: E402

from pipeline.extremal import (  # noqa: E402
    ExtremalSettings,
    _problem,
    area_loss,
    area_references,
    reward_scores,
)
from pipeline.methods import get_method  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.perturbations import apply_blur_pyramid  # noqa: E402


def timed(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        work()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the mask generator under torch.compile (after one warm-up call)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/profile_extremal_cpu.csv"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings: ExtremalSettings = get_method("extremal").presets["torchray-voc"]
    model = load_model(args.model).eval()
    images = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    network, pyramid, generator = _problem(model, images, settings)
    areas = len(settings.areas)
    count = args.images * areas
    index = torch.arange(args.images).repeat_interleave(areas)
    targets = torch.zeros(count, dtype=torch.long)
    pixels = generator.extended[0] * generator.extended[1]
    references = area_references(settings.areas, pixels).repeat(args.images, 1)
    params = torch.full((count, *generator.grid), 0.5, requires_grad=True)
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
        reward_scores(network(inputs), targets, settings.reward).sum().backward(inputs=[inputs])

    def sgd_step() -> None:
        params.grad = torch.ones_like(params)
        optimizer.step()
        with torch.no_grad():
            params.clamp_(0, 1)

    parts = {
        "mask generator": mask_generator,
        "area loss (sort)": sort_loss,
        "blur-pyramid blend": blend,
        "model forward + input gradient": network_pass,
        "SGD step + clamp": sgd_step,
    }
    seconds = {name: timed(work, args.repeats) for name, work in parts.items()}
    total = sum(seconds.values())
    if args.compile:  # beside the step, not part of it
        fused = torch.compile(generator._generate)

        def compiled_generator() -> None:
            torch.cat([fused(one) for one in params.split(1)]).sum().backward()

        compiled_generator()  # compiles
        seconds["mask generator, torch.compile (not in the step)"] = timed(
            compiled_generator, args.repeats
        )
    rows = [
        {
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "model": args.model,
            "images": args.images,
            "masks": count,
            "part": name,
            "seconds_per_step": round(value, 4),
            "share": round(value / total, 3),
        }
        for name, value in seconds.items()
    ]
    for row in rows:
        print(row, flush=True)
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
