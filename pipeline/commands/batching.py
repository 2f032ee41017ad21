"""Batches: the one loop of `run` and `evaluate` (decoded images apart from failures),
how many images go through together (`--batch-size auto`), padding a short last batch to
the compiled shape, and halving a batch that runs out of GPU memory."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.seeding import image_seeds
from ..errors import SettingsError
from ..methods import Method
from ..models.speed import SpeedOptions
from .stopping import ignore_stop_signals

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 8  # bench_optimize.py on 2 cores: the per-image cost is flat from 8 up


def probe_speed(speed: SpeedOptions) -> SpeedOptions:
    """The speed options the batch-size probe runs with: eager, so that only the chosen
    batch size is ever compiled (probing compiled shapes would compile every probed size
    and exhaust dynamo's recompile limit, silently falling back to eager)."""
    return dataclasses.replace(speed, compile=False, cuda_graphs=False)


def batch_probe(
    model: torch.nn.Module,
    method: Method,
    settings: Any,
    size: int,
    speed: SpeedOptions,
    device: torch.device,
) -> Callable[[int], None]:
    """probe(batch): explain `batch` random images with two iterations (eager)."""
    short = method.shortened(settings, 2)
    eager = probe_speed(speed)

    def probe(batch: int) -> None:
        images = torch.rand(batch, 3, size, size, device=device)
        targets = torch.zeros(batch, dtype=torch.long, device=device)
        sizes = [(size, size)] * batch
        method.explain(
            model, images, targets, list(range(batch)), short, speed=eager, original_sizes=sizes
        )

    return probe


def auto_batch_size(
    probe: Callable[[int], None],
    size: int,
    device: torch.device,
    *,
    limit: int = 128,
    margin: float = 0.75,
) -> int:
    """`--batch-size auto`: the largest batch that fits, found by a short probe, with a margin.

    On CUDA, batches of 1, 2, 4, ... (up to `limit`) each run `probe(batch)` until one runs
    out of memory; `margin` of the largest that fitted is kept (the metrics and the data
    loader need memory too), or `limit` itself when it fitted. The limit is 128 because that
    is as far as bench_optimize.py has measured: on an H100, vgg19 ran 18% faster per image
    at 128 than at 64 (bench_optimize_cuda*.csv). On CPU memory is not the limit:
    CPU_BATCH_SIZE.
    """
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    largest, batch = 0, 1
    while batch <= limit:
        try:
            probe(batch)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        largest, batch = batch, batch * 2
    if largest == 0:
        raise SettingsError(f"not even one {size}×{size} image fits in GPU memory")
    if largest == limit:
        return limit
    return max(1, int(largest * margin))


def padded_size(speed: SpeedOptions, batch_size: int, count: int, whole_batch: bool) -> int:
    """How many images to explain for `count` real ones: a compiled model gets its compiled
    shape (`batch_size`) for a short last batch; halves after an out-of-memory error and
    eager models get `count` (their shapes may change freely)."""
    return max(count, batch_size) if speed.compile and whole_batch else count


def explain_padded(
    method: Method,
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    keys: list[str],
    settings: Any,
    *,
    pad_to: int = 0,
    speed: SpeedOptions | None = None,
    original_sizes: list[tuple[int, int]] | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The method's columns for B images (keys: their paths, which seed them), explaining at
    least `pad_to` images by repeating the last one; the copies' rows are dropped. A mask
    does not depend on its batch neighbours beyond floating-point order."""
    count = len(keys)
    seeds = image_seeds(method.seed(settings) or 0, keys)
    sizes = None if original_sizes is None else list(original_sizes)
    extra = max(0, pad_to - count)
    if extra:
        images = torch.cat([images, images[-1:].expand(extra, -1, -1, -1)])
        targets = torch.cat([targets, targets[-1:].expand(extra)])
        seeds = seeds + seeds[-1:] * extra
        sizes = None if sizes is None else sizes + sizes[-1:] * extra
    columns = method.explain(
        model,
        images,
        targets,
        seeds,
        settings,
        speed=speed,
        original_sizes=sizes,
        on_iteration=on_iteration,
    )
    return {name: values[:count] for name, values in columns.items()}


def halve_on_oom(work: Callable[[int, int], dict], count: int, lo: int = 0, hi: int | None = None):
    """Run work(lo, hi) on rows [lo, hi); on out-of-memory, split in halves and retry.

    Masks do not depend on their batch neighbours beyond floating-point order, so the
    columns are those of the whole batch up to that order.
    """
    hi = count if hi is None else hi
    try:
        return work(lo, hi)
    except torch.OutOfMemoryError:
        if hi - lo <= 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        middle = (lo + hi) // 2
        log.warning(
            "out of memory on %d images; retrying as %d + %d", hi - lo, middle - lo, hi - middle
        )
        first = halve_on_oom(work, count, lo, middle)
        second = halve_on_oom(work, count, middle, hi)
        return {k: _concat(first[k], second[k]) for k in first}


def _concat(a, b):
    return a + b if isinstance(a, list) else np.concatenate([a, b])


def loader(dataset, batch_size: int, workers: int, device: torch.device):
    """The DataLoader of a run or an evaluation (in order, pinned memory on CUDA)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )


@dataclass
class DecodedBatch:
    """A loader batch split in two: the images that decoded, on the device, and the others.

    images G×3×H×W in [0, 1]; positions: the listing positions of those G images; sizes:
    their original (width, height); failures: (position, reason) of the rest; count: how
    many images the batch held (for a progress bar).
    """

    images: torch.Tensor
    positions: list[int]
    sizes: list[tuple[int, int]]
    failures: list[tuple[int, str]]
    count: int


def decoded_batches(
    dataset, batch_size: int, workers: int, device: torch.device
) -> Iterator[DecodedBatch]:
    """The one batch loop of `run` and `evaluate`: the dataset's images in order, each batch
    split into its decoded images (moved to `device`) and its failures."""
    for batch in loader(dataset, batch_size, workers, device):
        positions = batch["index"].tolist()
        ok = batch["ok"].tolist()
        good = [i for i, decoded in enumerate(ok) if decoded]
        yield DecodedBatch(
            images=batch["image"][good].to(device, non_blocking=True),
            positions=[positions[i] for i in good],
            sizes=[(int(batch["width"][i]), int(batch["height"][i])) for i in good],
            failures=[(p, batch["error"][i]) for i, p in enumerate(positions) if not ok[i]],
            count=len(positions),
        )
