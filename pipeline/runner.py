"""Orchestration of `mpbatch run`: discover → load → classify → optimise → store → report.

This is the only module that ties file I/O to the algorithms; the algorithm modules take and
return tensors.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from .datasets import (
    DatasetError,
    ImageFolderDataset,
    Sample,
    Shard,
    discover,
    resize_image,
    resolve_shard,
    shard_range,
)
from .extremal import (
    EXTREMAL_PRESETS,
    ExtremalSettings,
    extremal_masks,
    extremal_saliency,
    render_masks,
)
from .metrics import (
    BASELINES,
    CurveProtocol,
    baseline_saliency,
    box_coverage,
    center_points,
    score_saliency,
)
from .models import NormalizedClassifier, load_model
from .optimize import (
    PRESETS,
    MaskResult,
    MaskSettings,
    SpeedOptions,
    applied_masks,
    make_batch_substrate,
    optimize_masks,
)
from .perturbations import apply_blur_pyramid, blur_pyramid
from .report import write_failures_csv, write_report_csv, write_summary
from .seeding import image_seed
from .store import MaskStore, StoreError, merge_files, read_columns, replace_columns

MASKS_FILE = "masks.h5"
REPORT_FILE = "report.csv"
FAILURES_FILE = "failures.csv"

# Settings that decide what the output contains: a resumed run must use the same ones.
RESULT_KEYS = [
    "speed",
    "data",
    "model",
    "weights",
    "size",
    "target",
    "limit",
    "mask",
    "layout",
    "evaluation",
]


# Step images scored per forward pass when not set. On this CPU (one thread), deletion +
# insertion curves of EfficientNet-Lite0 took 15.0 s at eval batch 1, 17.5 s at 2, 21.6 s
# at 8 and 47.8 s at 128 (benchmarks/results/bench_metrics_cpu_lite0_eval*.csv): a large
# batch's activations spill out of the caches. A GPU wants large batches.
CPU_EVAL_BATCH_SIZE = 1
CUDA_EVAL_BATCH_SIZE = 128


def eval_batch_size_for(device: torch.device) -> int:
    """The default number of step images per scoring forward pass on `device`."""
    return CUDA_EVAL_BATCH_SIZE if device.type == "cuda" else CPU_EVAL_BATCH_SIZE


@dataclass
class EvalOptions:
    """How masks are scored (DESIGN §4); None in RunOptions.evaluation skips scoring."""

    step: int = 224
    tolerance: float = 15.0
    eval_batch_size: int | None = None  # None: eval_batch_size_for(the images' device)
    baselines: tuple[str, ...] = BASELINES
    seed: int = 0  # of the random baseline
    # pointing: blur the resized map with σ = smooth·min(H, W) before its argmax (TorchRay's
    # benchmark smooths extremal masks with 0.09); None: 0.09 for extremal, else 0
    smooth: float | None = None

    def __post_init__(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")

    def protocol(self) -> CurveProtocol:
        return CurveProtocol(step=self.step)

    def describe(self) -> dict:
        """The protocol settings written into every mask file and summary."""
        protocol = self.protocol()
        return {
            "deletion_insertion": protocol.describe(),
            "step": protocol.step,
            "blur_kernel": protocol.blur_kernel,
            "blur_sigma": protocol.blur_sigma,
            "pointing": (
                "saliency resized to the original image size"
                + (
                    f", smoothed with a Gaussian of sigma {self.smooth:g}·min(H, W) (zero "
                    "padding, TorchRay's benchmark)"
                    if self.smooth
                    else ""
                )
                + "; argmax (first in raster order); "
                f"hit when within {self.tolerance:g} px (Euclidean, strict <) of the union "
                "of the target class's boxes; NaN without boxes"
            ),
            "tolerance": self.tolerance,
            "smooth": self.smooth,
            "scored_saliency": (
                "1 - the mask as applied to the image (extremal: the mask; summed over areas "
                "unless one is picked), at the model's input size"
            ),
            "small_object": "target boxes cover < 25% of the image",
            "baselines": list(self.baselines),
            "random_seed": self.seed,
        }


# Each method's presets, its default first.
METHOD_PRESETS = {"meaningful": PRESETS, "extremal": EXTREMAL_PRESETS}
EXTREMAL_POINTING_SMOOTH = 0.09  # TorchRay's benchmark: σ = 0.09·min(H, W) before the argmax


@dataclass
class RunOptions:
    """Everything `mpbatch run` needs; defaults match the CLI's."""

    data: Path
    out: Path
    model: str = "efficientnet_lite0"
    weights: str | None = None
    preset: str | None = None  # None: "seed" (meaningful) or "torchray-voc" (extremal)
    overrides: dict = field(default_factory=dict)  # MaskSettings fields set on the CLI
    size: int = 224
    target: str = "label"  # "label" (ground truth where known, else top-1) or "predicted"
    batch_size: int | str = "auto"  # or a number (auto: auto_batch_size)
    workers: int = 2
    device: str = "auto"
    limit: int | None = None
    labels_csv: Path | None = None
    synset_mapping: Path | None = None
    boxes_dir: Path | None = None
    overwrite: bool = False
    progress: bool = True
    shard: str | None = None  # "I/N"; None: from the environment (torchrun, SLURM)
    on_error: str = "skip"  # "skip" bad images (listed in failures.csv) or "fail"
    precision: str = "auto"  # "auto" | "fp32" | "bf16" (model forward only)
    compile: bool = False  # torch.compile the model (static shapes)
    cuda_graphs: bool = False  # with compile on CUDA: replay as CUDA graphs (reduce-overhead)
    # "meaningful" (Fong & Vedaldi 2017) or "extremal" (2019); None: extremal for a torchray
    # preset, else meaningful
    method: str | None = None
    area: int | None = None  # extremal: score this area's mask (index), else the sum over areas
    evaluation: EvalOptions | None = field(default_factory=lambda: EvalOptions())

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = "extremal" if self.preset in EXTREMAL_PRESETS else "meaningful"
        if self.method not in METHOD_PRESETS:
            raise ValueError(f"unknown method {self.method!r}; choose meaningful or extremal")
        presets = METHOD_PRESETS[self.method]
        if self.preset is None:
            self.preset = next(iter(presets))
        if self.preset not in presets:
            raise ValueError(
                f"preset {self.preset!r} is not one of --method {self.method}'s: "
                f"{', '.join(presets)}"
            )
        if self.evaluation is not None and self.evaluation.smooth is None:
            smooth = EXTREMAL_POINTING_SMOOTH if self.method == "extremal" else 0.0
            self.evaluation = dataclasses.replace(self.evaluation, smooth=smooth)

    def mask_settings(self) -> MaskSettings | ExtremalSettings:
        """The method's settings: the preset with the CLI's overrides."""
        return METHOD_PRESETS[self.method][self.preset].replace(**self.overrides)


@dataclass
class RunResult:
    out: Path
    processed: int  # images written by this invocation
    failed: int  # images that failed in this invocation
    total_rows: int  # rows in the mask file now
    seconds: float
    masks_file: Path | None = None
    timings: dict = field(default_factory=dict)  # seconds loading, optimising, evaluating, ...


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda when available, else cpu; on CUDA, GPU `local_rank` (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def versions() -> dict[str, str]:
    """Versions of everything that can change a mask."""
    import h5py
    import timm
    import torchvision

    return {
        "mpbatch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
    }


def run_config(options: RunOptions, layout: str, settings: MaskSettings) -> dict:
    """The JSON-able record of every setting, stored in the mask file."""
    return {
        "data": str(Path(options.data).resolve()),
        "model": options.model,
        "weights": options.weights,
        "preset": options.preset,
        "method": options.method,
        "mask": settings.to_dict(),
        "area": options.area,
        "size": options.size,
        "target": options.target,
        "limit": options.limit,
        "layout": layout,
        "evaluation": None if options.evaluation is None else options.evaluation.describe(),
        "speed": None,  # filled in by run() once the device is known
        "batch_size": options.batch_size,
        "workers": options.workers,
        "device": options.device,
    }


def speed_options(options: RunOptions, device: torch.device) -> SpeedOptions:
    """How the optimisation runs (no effect on the hyperparameters).

    "auto" precision follows bench_optimize.py (SpeedOptions.recommended): bf16 where it
    won (CUDA; standard conv nets on AMX CPUs), fp32 for depthwise-heavy nets on CPU and for
    custom `module:function` models, which nothing has measured. An explicit precision
    gets the memory format measured best with it.
    """
    custom = ":" in options.model and not options.model.startswith("timm:")
    if options.precision == "auto":
        if custom:
            speed = SpeedOptions()
        else:
            speed = SpeedOptions.recommended(device, options.model)
    else:
        speed = SpeedOptions.recommended(device, options.model, precision=options.precision)
    graphs = options.compile and options.cuda_graphs
    return dataclasses.replace(speed, compile=options.compile, cuda_graphs=graphs)


def check_labels(samples: list[Sample], num_classes: int, model_name: str) -> None:
    """Labels must be classes of the model (e.g. ImageNet labels with a 10-class model fail)."""
    for sample in samples:
        if sample.label >= num_classes:
            raise DatasetError(
                f"{sample.path}: label {sample.label} is not one of the {num_classes} classes of "
                f"{model_name}; use --target predicted to explain the top-1 class instead"
            )


def classify(model: NormalizedClassifier, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities B×C of clean images."""
    with torch.inference_mode():
        return model(images).float().softmax(dim=1)


def choose_targets(labels: torch.Tensor, predictions: torch.Tensor, mode: str) -> torch.Tensor:
    """The class each mask explains: the label where known (≥ 0) in "label" mode, else top-1."""
    if mode == "predicted":
        return predictions
    if mode != "label":
        raise ValueError(f"unknown target mode {mode!r}")
    return torch.where(labels >= 0, labels, predictions)


def explain_batch(
    model: NormalizedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    keys: list[str],
    settings: MaskSettings | ExtremalSettings,
    target_mode: str,
    speed: SpeedOptions | None = None,
    pad_to: int | None = None,
    original_sizes: list[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Classify and mask one batch; returns the per-image columns of the mask file.

    pad_to: optimise at least this many images, repeating the last one (its copies are
    dropped); with --compile a short last batch then reuses the compiled shapes. Masks do
    not depend on their batch neighbours, so the real images' masks are unchanged.
    original_sizes: (width, height) of each photo (the paper preset blurs at that scale).
    """
    probs = classify(model, images)
    predictions = probs.argmax(dim=1)
    targets = choose_targets(labels, predictions, target_mode)
    common = {
        "label": labels.cpu().numpy().astype(np.int64),
        "target": targets.cpu().numpy().astype(np.int64),
        "pred": predictions.cpu().numpy().astype(np.int64),
        "prob_clean": probs.gather(1, targets.view(-1, 1))[:, 0].cpu().numpy(),
    }
    seeds = [image_seed(settings.seed, key) for key in keys]
    if isinstance(settings, ExtremalSettings):
        result = extremal_masks(model, images, targets, seeds, settings)
        masks = result.masks  # B×A×s×s, 1 = the salient region
        return {
            **common,
            "masks": masks.cpu().numpy().astype(np.float32),
            "params": result.params.cpu().numpy().astype(np.float32),
            "reward": result.rewards.float().cpu().numpy(),
            "mask_area": masks.flatten(2).mean(2).cpu().numpy(),
        }
    count = len(keys)
    extra = max(0, (pad_to or 0) - count)
    sizes = None if original_sizes is None else list(original_sizes)
    if extra:
        images = torch.cat([images, images[-1:].expand(extra, -1, -1, -1)])
        targets = torch.cat([targets, targets[-1:].expand(extra)])
        seeds = seeds + seeds[-1:] * extra
        sizes = None if sizes is None else sizes + sizes[-1:] * extra
    result = optimize_masks(
        model, images, targets, seeds, settings, speed=speed, original_sizes=sizes
    )
    result = MaskResult(result.masks[:count], result.loss[:count], result.prob_masked[:count])
    masks = result.masks[:, 0]
    return {
        **common,
        "masks": masks.cpu().numpy().astype(np.float32),
        "prob_masked": result.prob_masked.float().cpu().numpy(),
        "loss": result.loss.float().cpu().numpy(),
        "mask_area": (1.0 - masks).flatten(1).mean(1).cpu().numpy(),
    }


def settings_from_config(config: dict) -> MaskSettings | ExtremalSettings:
    """The method settings recorded in a mask file's config."""
    mask = dict(config["mask"])
    if config.get("method", "meaningful") == "extremal":
        mask["areas"] = tuple(mask["areas"])
        if "smooth" in mask:  # files from before the rename to temperature
            mask["temperature"] = mask.pop("smooth")
        return ExtremalSettings(**mask)
    return MaskSettings(**mask)


def saliency_from_masks(
    masks: np.ndarray | torch.Tensor,
    settings: MaskSettings | ExtremalSettings,
    size: tuple[int, int],
    area: int | None = None,
    params: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """The saliency every metric scores (higher = more important): B×H×W at the model's
    input size, made from the mask as it was applied to the image.

    meaningful: masks B×h×w, 1 = kept; the mask as the optimiser applied it (optimize.
    applied_masks: its interpolation and mask blur), then 1 − m for the deletion game, m for
    the preservation game. extremal: masks B×A×s×s with 1 = salient and their grid `params`
    B×A×h×w, from which the full-resolution masks are rebuilt exactly; summed over areas (as
    TorchRay's benchmark scores them) or the mask of one area. Files from before the params
    were stored: the stored masks resized bilinearly.
    """
    masks = torch.as_tensor(masks).float()
    if isinstance(settings, ExtremalSettings):
        if params is not None:
            full = render_masks(torch.as_tensor(params).to(masks.device), size, settings)
        else:
            full = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return extremal_saliency(full, area)
    with torch.no_grad():
        applied = applied_masks(masks, size, settings)
    return applied if settings.game == "preserve" else 1.0 - applied


def _loader(dataset, options: RunOptions, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


CPU_BATCH_SIZE = 8  # bench_optimize.py on 2 cores: the per-image cost is flat from 8 up


def auto_batch_size(
    model: NormalizedClassifier,
    size: int,
    settings: MaskSettings | ExtremalSettings,
    speed: SpeedOptions,
    device: torch.device,
    *,
    limit: int = 128,
    margin: float = 0.75,
    probe=None,
) -> int:
    """`--batch-size auto`: the largest batch that fits, found by a short probe, with a margin.

    On CUDA, batches of 1, 2, 4, ... (up to `limit`) each run two optimisation iterations on
    random images until one runs out of memory; `margin` of the largest that fitted is kept
    (the metrics and the data loader need memory too), or `limit` itself when it fitted.
    The limit is 128 because that is as far as bench_optimize.py has measured: on an H100,
    vgg19 ran 18% faster per image at 128 than at 64 (bench_optimize_cuda*.csv). On CPU
    memory is not the limit: CPU_BATCH_SIZE.
    """
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    probe = probe or (lambda batch: _probe_batch(model, batch, size, settings, speed, device))
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
        raise RuntimeError(f"not even one {size}×{size} image fits in GPU memory")
    if largest == limit:
        return limit
    return max(1, int(largest * margin))


def _probe_batch(model, batch, size, settings, speed, device) -> None:
    images = torch.rand(batch, 3, size, size, device=device)
    targets = torch.zeros(batch, dtype=torch.long, device=device)
    seeds = list(range(batch))
    if isinstance(settings, ExtremalSettings):
        extremal_masks(model, images, targets, seeds, settings.replace(iterations=2))
    else:
        short = settings.replace(iterations=2)
        sizes = [(size, size)] * batch
        optimize_masks(model, images, targets, seeds, short, speed=speed, original_sizes=sizes)


class Interrupted(Exception):
    """The run stopped early on SIGTERM/SIGUSR1 after flushing; rerun to resume."""


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later", i.e. requeue and resume


class StopSignals:
    """While active, SIGTERM and SIGUSR1 only set a flag that the batch loop checks."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _speed_recorded_before(device: torch.device):
    """Fill in the speed settings that mask files of mpbatch 0.1 before CUDA graphs did not
    record (no CUDA graphs; the device type, which they did not check), so they resume."""

    def fill(stored: dict) -> dict:
        speed = stored.get("speed")
        if not isinstance(speed, dict):
            return stored
        return {**stored, "speed": {"cuda_graphs": False, "device": device.type, **speed}}

    return fill


def output_names(shard: Shard) -> tuple[str, str, str]:
    """(masks, report, failures) file names of a shard: masks.h5 when unsharded."""
    if shard.world == 1:
        return MASKS_FILE, REPORT_FILE, FAILURES_FILE
    return (f"masks-{shard.tag}.h5", f"report-{shard.tag}.csv", f"failures-{shard.tag}.csv")


def run(options: RunOptions) -> RunResult:
    """Mask every image of options.data (this process's shard of it) into options.out.

    Resumes what an earlier run with the same settings left; SIGTERM/SIGUSR1 finish the
    current batch, flush, and raise Interrupted.
    """
    started = time.perf_counter()
    timings = {"load": 0.0, "optimize": 0.0, "evaluate": 0.0, "write": 0.0}
    settings = options.mask_settings()
    samples, layout = discover(
        options.data,
        labels_csv=options.labels_csv,
        synset_mapping=options.synset_mapping,
        boxes_dir=options.boxes_dir,
    )
    if options.limit is not None:
        samples = samples[: options.limit]
    shard = resolve_shard(options.shard, os.environ)
    part = shard_range(len(samples), shard.rank, shard.world)
    device = pick_device(options.device, shard.local_rank)
    model = load_model(options.model, options.weights).to(device)
    if options.target == "label":
        check_labels(samples, len(model.class_names), options.model)

    out = Path(options.out)
    masks_name, report_name, failures_name = output_names(shard)
    config = run_config(options, layout, settings)
    config["normalization"] = {"mean": model.mean.tolist(), "std": model.std.tolist()}
    speed = speed_options(options, device)
    # the device type too: CPU and CUDA generators draw different noise for the same seed,
    # so a run resumed on the other kind of device would not end with the same masks
    config["speed"] = {**speed.to_dict(), "device": device.type}
    if options.batch_size == "auto":
        options = dataclasses.replace(
            options, batch_size=auto_batch_size(model, options.size, settings, speed, device)
        )
        print(f"mpbatch: --batch-size auto chose {options.batch_size}", file=sys.stderr)
    config["batch_size"] = options.batch_size
    config["shard"] = {
        "rank": shard.rank,
        "world": shard.world,
        "start": part.start,
        "stop": part.stop,
    }
    store = MaskStore.open(
        out / masks_name,
        config,
        versions(),
        compare_keys=RESULT_KEYS + ["shard"],
        overwrite=options.overwrite,
        fill_stored=_speed_recorded_before(device),
    )
    if store.repaired:
        print(f"mpbatch: {store.repaired}", file=sys.stderr)
    processed = failed = 0
    start = max(store.next_position, part.start)
    stopped_by = None
    try:
        remaining = range(start, part.stop)
        if len(remaining) == 0:
            print(f"{out / masks_name}: all {len(part)} images already done", file=sys.stderr)
        else:
            dataset = ImageFolderDataset(options.data, samples, options.size, indices=remaining)
            bar = tqdm(
                total=len(part),
                initial=start - part.start,
                unit="img",
                desc=f"masks {shard.tag}" if shard.world > 1 else "masks",
                disable=not options.progress,
                dynamic_ncols=True,
            )
            with StopSignals() as signals:
                tick = time.perf_counter()
                for batch in _loader(dataset, options, device):
                    timings["load"] += time.perf_counter() - tick
                    written, failures = _process_batch(
                        batch, samples, model, settings, options, store, timings, speed
                    )
                    processed += written
                    failed += len(failures)
                    for _, path, reason in failures:
                        bar.write(f"skipped {path}: {reason}")
                    bar.update(len(batch["index"]))
                    tick = time.perf_counter()
                    if signals.received:
                        stopped_by = signals.received
                        break
            bar.close()
        seconds = time.perf_counter() - started
        timings["total"] = seconds
        timings["images_per_s"] = processed / seconds if seconds > 0 else 0.0
        protocol = None if options.evaluation is None else options.evaluation.describe()
        store.set_attrs(class_names=list(model.class_names), timings=timings, protocol=protocol)
        total_rows, done = store.rows, store.next_position >= part.stop
        next_position, skipped = store.next_position, store.n_failures
        if stopped_by is None and done:
            store.finish()
        else:
            store.close()
    finally:
        store.close()
    write_report_csv(out / masks_name, out / report_name)
    write_failures_csv(out / masks_name, out / failures_name)
    if stopped_by is not None:
        raise Interrupted(
            f"stopped by {stopped_by} after {next_position - part.start} of {len(part)} "
            f"images of {out / masks_name}; rerun the same command to resume"
        )
    if shard.world == 1 and options.evaluation is not None:
        write_summary(out / masks_name, out, skipped=skipped)
    elif shard.world > 1 and all_shards_complete(out, shard.world):
        merge_once(out)
    return RunResult(
        out,
        processed,
        failed,
        total_rows,
        time.perf_counter() - started,
        out / masks_name,
        timings,
    )


def _process_batch(
    batch: dict,
    samples: list[Sample],
    model: NormalizedClassifier,
    settings: MaskSettings,
    options: RunOptions,
    store: MaskStore,
    timings: dict[str, float],
    speed: SpeedOptions | None = None,
) -> tuple[int, list[tuple[int, str, str]]]:
    positions = batch["index"].tolist()
    ok = batch["ok"].tolist()
    failures = [
        (p, samples[p].path, batch["error"][i]) for i, p in enumerate(positions) if not ok[i]
    ]
    if failures and options.on_error == "fail":
        position, path, reason = failures[0]
        raise DatasetError(f"{path}: {reason} (--on-error fail)")
    good = [i for i in range(len(positions)) if ok[i]]
    columns: dict = {}
    if good:
        device = next(iter(model.buffers())).device
        images = batch["image"][good].to(device, non_blocking=True)
        rows = [samples[positions[i]] for i in good]
        sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in good]
        columns = _halve_on_oom(
            lambda lo, hi: _mask_and_score(
                model,
                images[lo:hi],
                rows[lo:hi],
                sizes[lo:hi],
                settings,
                options,
                timings,
                speed,
                whole_batch=hi - lo == len(good),
            ),
            len(good),
        )
        columns["index"] = np.array([positions[i] for i in good], dtype=np.int64)
        columns["path"] = [s.path for s in rows]
        columns["width"] = np.array([w for w, _ in sizes], dtype=np.int64)
        columns["height"] = np.array([h for _, h in sizes], dtype=np.int64)
    tick = time.perf_counter()
    store.append(columns, failures, next_position=positions[-1] + 1)
    timings["write"] += time.perf_counter() - tick
    return len(good), failures


def _mask_and_score(
    model, images, rows, sizes, settings, options, timings, speed, whole_batch=True
) -> dict:
    device = images.device
    labels = torch.tensor([s.label for s in rows], device=device)
    tick = time.perf_counter()
    keys = [s.path for s in rows]
    # compiled: pad a short last batch to the compiled shape (not the halves after an OOM)
    compiled = speed is not None and speed.compile and whole_batch
    pad_to = options.batch_size if compiled else None
    columns = explain_batch(
        model,
        images,
        labels,
        keys,
        settings,
        options.target,
        speed,
        pad_to=pad_to,
        original_sizes=sizes,
    )
    timings["optimize"] += time.perf_counter() - tick
    if options.evaluation is not None:
        tick = time.perf_counter()
        masks = torch.from_numpy(columns["masks"]).to(device)
        params = columns.get("params")
        size = tuple(images.shape[-2:])
        saliency = saliency_from_masks(
            masks, settings, size, options.area, None if params is None else params
        )
        columns.update(
            evaluate_batch(
                model,
                images,
                saliency,
                torch.from_numpy(columns["target"]).to(device),
                rows,
                sizes,
                options.evaluation,
                baseline_size=tuple(masks.shape[-2:]),
            )
        )
        timings["evaluate"] += time.perf_counter() - tick
    return columns


def _halve_on_oom(work, count: int, lo: int = 0, hi: int | None = None) -> dict:
    """Run work(lo, hi) on rows [lo, hi); on out-of-memory, split in halves and retry.

    Masks do not depend on the batch, so the columns are the same whatever the split.
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
        print(
            f"mpbatch: out of memory on {hi - lo} images; retrying as {middle - lo} + "
            f"{hi - middle}",
            file=sys.stderr,
        )
        first = _halve_on_oom(work, count, lo, middle)
        second = _halve_on_oom(work, count, middle, hi)
        return {k: _concat(first[k], second[k]) for k in first}


def _concat(a, b):
    return a + b if isinstance(a, list) else np.concatenate([a, b])


def target_boxes(sample: Sample, target: int) -> torch.Tensor | None:
    """The boxes of the explained class as a K×4 tensor (xmin, ymin, xmax, ymax), or None."""
    boxes = [(b.xmin, b.ymin, b.xmax, b.ymax) for b in sample.boxes if b.class_index == target]
    return torch.tensor(boxes, dtype=torch.float64) if boxes else None


def evaluate_batch(
    model: NormalizedClassifier,
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: torch.Tensor,
    samples: list[Sample],
    sizes: list[tuple[int, int]],
    evaluation: EvalOptions,
    baseline_size: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Metric columns for one batch: the saliency's, then each baseline's (prefixed).

    saliency B×h×w (higher = more important); sizes (width, height) of the original images.
    The random baseline is noise at `baseline_size` (the mask's granularity; default the
    saliency's); the centre baseline points at the image centre in the pointing game.
    Every map's pointing uses evaluation.smooth.
    """
    boxes = [target_boxes(s, int(t)) for s, t in zip(samples, targets.tolist(), strict=True)]
    keys = [s.path for s in samples]
    options = {
        "protocol": evaluation.protocol(),
        "tolerance": evaluation.tolerance,
        "eval_batch_size": (
            eval_batch_size_for(images.device)
            if evaluation.eval_batch_size is None
            else evaluation.eval_batch_size
        ),
        "smooth": evaluation.smooth or 0.0,
    }
    model_eval = model.eval()
    columns = {
        k: v.numpy()
        for k, v in score_saliency(
            model_eval, images, saliency, targets, boxes, sizes, **options
        ).items()
    }
    coverage = box_coverage(boxes, sizes).numpy()
    columns["box_coverage"] = coverage
    columns["small_object"] = np.where(np.isnan(coverage), np.nan, coverage < 0.25)
    for name in evaluation.baselines:
        grid = baseline_size or tuple(saliency.shape[-2:])
        baseline = baseline_saliency(name, keys, grid, evaluation.seed)
        points = center_points(sizes) if name == "center" else None
        scores = score_saliency(
            model_eval,
            images,
            baseline.to(images.device),
            targets,
            boxes,
            sizes,
            points=points,
            **options,
        )
        columns.update({f"{name}_{k}": v.numpy() for k, v in scores.items()})
    return columns


def describe(result: RunResult) -> str:
    """Two lines for the end of a run: what was written, and where the time went."""
    line = (
        f"{result.processed} masks written, {result.failed} images skipped, "
        f"{result.total_rows} in {result.masks_file or result.out / MASKS_FILE} "
        f"({result.seconds:.1f} s)"
    )
    t = result.timings
    if result.processed and t:
        line += (
            f"\ntime: loading {t['load']:.1f} s, optimising {t['optimize']:.1f} s, "
            f"evaluating {t['evaluate']:.1f} s, writing {t['write']:.1f} s; "
            f"{t['images_per_s']:.2f} images/s"
        )
    return line


def render_figures(out: str | Path, dest: str | Path, limit: int | None = None) -> list[Path]:
    """One PNG per masked image of the run in `out`: image, perturbed image, saliency."""
    from .datasets import decode_image
    from .visualize import saliency_panel, save_figure

    out, dest = Path(out), Path(dest)
    masks_file = out / MASKS_FILE if out.is_dir() else out
    columns, attrs = read_columns(masks_file)
    config = attrs["config"]
    settings = settings_from_config(config)
    names = list(attrs.get("class_names", []))
    data, size = Path(config["data"]), int(config["size"])
    mean = torch.tensor(config.get("normalization", {}).get("mean", [0.5, 0.5, 0.5]))
    count = len(columns.get("path", [])) if limit is None else min(limit, len(columns["path"]))
    written = []
    for row in range(count):
        relative = str(columns["path"][row])
        pixels, width, height = decode_image(data / relative)
        image = resize_image(pixels, size)[None]
        masks = torch.from_numpy(columns["masks"][row])[None]
        params = columns["params"][row][None] if "params" in columns else None
        target = int(columns["target"][row])
        name = names[target] if 0 <= target < len(names) else str(target)
        saliency = saliency_from_masks(masks, settings, (size, size), config.get("area"), params)
        if isinstance(settings, ExtremalSettings):
            middle = masks.shape[1] // 2  # show the middle area's preserved image
            if params is not None:
                keep = render_masks(torch.from_numpy(params[:, middle]), (size, size), settings)
            else:
                keep = F.interpolate(masks[:, middle : middle + 1], (size, size), mode="bilinear")
            pyramid = blur_pyramid(image, settings.max_blur_sigma, settings.pyramid_levels, mean)
            perturbed = apply_blur_pyramid(pyramid, keep, torchray_ends=True)
            title = (
                f"{relative}: {name} — p(clean) {columns['prob_clean'][row]:.3f}; "
                f"middle: area {settings.areas[middle]:g} preserved"
            )
        else:
            up = applied_masks(masks, (size, size), settings)[:, None]
            if settings.perturbation == "blur-pyramid":
                pyramid = blur_pyramid(image, settings.blur_sigma, settings.pyramid_levels)
                perturbed = apply_blur_pyramid(pyramid, up)
            else:
                seeds = [image_seed(settings.seed, relative)]
                substrate = make_batch_substrate(image, settings, seeds, mean, [(width, height)])
                perturbed = image * up + substrate * (1 - up)
            title = (
                f"{relative}: {name} — p(clean) {columns['prob_clean'][row]:.3f}, "
                f"p(perturbed) {columns['prob_masked'][row]:.3f}"
            )
        figure = saliency_panel(image[0], perturbed[0], saliency[0], title)
        path = dest / (Path(relative).with_suffix("").as_posix().replace("/", "__") + ".png")
        save_figure(figure, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ evaluate
SCORES_FILE = "scores.h5"


@dataclass
class EvaluateOptions:
    """`mpbatch evaluate`: score saliency maps (an mpbatch run, a foreign file, a baseline)."""

    source: Path | None  # run folder / masks.h5, foreign .h5 (path, saliency), .npy, or None
    data: Path | None = None
    out: Path | None = None
    paths_file: Path | None = None  # one relative path per line, for an .npy source
    baseline: str | None = None  # score this baseline as the method (source None)
    model: str | None = None
    weights: str | None = None
    target: str = "label"
    size: int | None = None
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"
    labels_csv: Path | None = None
    synset_mapping: Path | None = None
    boxes_dir: Path | None = None
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    progress: bool = True


@dataclass
class SaliencySource:
    """Saliency maps to score: paths (relative to the data root) and N×h×w maps."""

    paths: list[str]
    saliency: np.ndarray | None  # None for a baseline (made per batch) or an mpbatch run
    targets: np.ndarray | None  # fixed targets (an mpbatch run), else chosen per batch
    masks_file: Path | None  # an mpbatch run's file, updated in place
    config: dict
    masks: dict | None = None  # an mpbatch run's "masks" (and "params") columns

    def batch(self, rows: list[int], size: int, device) -> torch.Tensor | None:
        """The saliency maps of these rows, on `device`; None for a baseline. A run's maps
        are made from its masks batch by batch (saliency_from_masks), at input size."""
        if self.masks is not None:
            params = self.masks.get("params")
            return saliency_from_masks(
                torch.from_numpy(self.masks["masks"][rows]).to(device),
                settings_from_config(self.config),
                (size, size),
                self.config.get("area"),
                None if params is None else params[rows],
            )
        if self.saliency is not None:
            return torch.from_numpy(self.saliency[rows]).to(device)
        return None


def _is_mask_file(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as file:
        return "masks" in file and "config" in file.attrs


def read_saliency_source(options: EvaluateOptions) -> SaliencySource:
    """Load what `evaluate` scores; raises DatasetError with the file name when malformed."""
    import h5py

    source = options.source
    if source is None:
        if options.baseline is None:
            raise DatasetError("evaluate needs a saliency file or --baseline center|random")
        return SaliencySource([], None, None, None, {})
    source = Path(source)
    if source.is_dir():
        source = source / MASKS_FILE
    if not source.exists():
        raise DatasetError(f"{source}: no such file")
    if source.suffix == ".npy":
        if options.paths_file is None:
            raise DatasetError(f"{source}: an .npy saliency array needs --paths FILE")
        saliency = np.load(source)
        paths = [line.strip() for line in Path(options.paths_file).read_text().splitlines()]
        paths = [p for p in paths if p]
        if saliency.ndim != 3 or len(paths) != saliency.shape[0]:
            raise DatasetError(
                f"{source}: expected N×h×w saliency for the {len(paths)} paths of "
                f"{options.paths_file}, got shape {saliency.shape}"
            )
        return SaliencySource(paths, saliency.astype(np.float32), None, None, {})
    try:
        is_run = _is_mask_file(source)
    except OSError as error:
        raise DatasetError(f"{source}: not a readable HDF5 file ({error})") from error
    if is_run:
        columns, attrs = read_columns(source)
        config = attrs["config"]
        masks = {k: columns[k].astype(np.float32) for k in ("masks", "params") if k in columns}
        paths = [str(p) for p in columns["path"]]
        return SaliencySource(paths, None, columns["target"], source, config, masks)
    with h5py.File(source, "r") as file:
        if "saliency" not in file or "path" not in file:
            raise DatasetError(f"{source}: needs datasets 'path' and 'saliency' (N×h×w)")
        saliency = file["saliency"][:].astype(np.float32)
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in file["path"][:]]
    if saliency.ndim != 3 or len(paths) != saliency.shape[0]:
        raise DatasetError(f"{source}: 'saliency' must be N×h×w with one row per path")
    return SaliencySource(paths, saliency, None, None, {})


def evaluate(options: EvaluateOptions) -> Path:
    """Score saliency maps with the protocol of options.evaluation; returns the scored file.

    An mpbatch run is updated in place (its metric columns replaced); anything else is
    written to OUT/scores.h5. report.csv and the summary go beside the scored file.
    """
    source = read_saliency_source(options)
    config = source.config
    if options.evaluation.smooth is None:
        extremal = config.get("method") == "extremal"
        smooth = EXTREMAL_POINTING_SMOOTH if extremal else 0.0
        options = dataclasses.replace(
            options, evaluation=dataclasses.replace(options.evaluation, smooth=smooth)
        )
    grid = None if source.masks is None else tuple(source.masks["masks"].shape[-2:])
    data = Path(options.data or config.get("data") or "")
    if not str(data):
        raise DatasetError("evaluate needs --data DATA (the images the maps belong to)")
    samples, _ = discover(
        data,
        labels_csv=options.labels_csv,
        synset_mapping=options.synset_mapping,
        boxes_dir=options.boxes_dir,
    )
    by_path = {s.path: i for i, s in enumerate(samples)}
    paths = source.paths or [s.path for s in samples]
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise DatasetError(f"{missing[0]}: listed in {options.source} but not found in {data}")
    positions = [by_path[p] for p in paths]
    model_name = options.model or config.get("model") or "efficientnet_lite0"
    weights = options.weights if options.model else config.get("weights", options.weights)
    size = options.size or int(config.get("size", 224))
    device = pick_device(options.device)
    model = load_model(model_name, weights).to(device)
    if options.target == "label" and source.targets is None:
        check_labels([samples[p] for p in positions], len(model.class_names), model_name)

    dataset = ImageFolderDataset(data, samples, size, indices=positions)
    row_of = {p: row for row, p in enumerate(positions)}
    collected: dict[str, list] = {}
    failures = []
    bar = tqdm(total=len(positions), unit="img", desc="scores", disable=not options.progress)
    for batch in _loader(dataset, options, device):
        batch_positions = batch["index"].tolist()
        good = [i for i, ok in enumerate(batch["ok"].tolist()) if ok]
        failures += [
            (p, samples[p].path, batch["error"][i])
            for i, p in enumerate(batch_positions)
            if i not in good
        ]
        bar.update(len(batch_positions))
        if not good:
            continue
        rows = [row_of[batch_positions[i]] for i in good]
        images = batch["image"][good].to(device)
        probs = classify(model, images)
        predictions = probs.argmax(dim=1)
        if source.targets is not None:
            targets = torch.from_numpy(source.targets[rows]).to(device)
        else:
            labels = torch.tensor([samples[positions[r]].label for r in rows], device=device)
            targets = choose_targets(labels, predictions, options.target)
        saliency = source.batch(rows, size, device)
        if saliency is None:
            keys = [paths[r] for r in rows]
            saliency = baseline_saliency(
                options.baseline, keys, (size, size), options.evaluation.seed
            ).to(device)
        sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in good]
        columns = evaluate_batch(
            model,
            images,
            saliency,
            targets,
            [samples[positions[r]] for r in rows],
            sizes,
            options.evaluation,
            baseline_size=grid,
        )
        columns["row"] = np.array(rows, dtype=np.int64)
        if source.masks_file is None:
            columns["path"] = np.array([paths[r] for r in rows], dtype=object)
            columns["index"] = np.array([positions[r] for r in rows], dtype=np.int64)
            columns["label"] = np.array([samples[positions[r]].label for r in rows])
            columns["target"] = targets.cpu().numpy()
            columns["pred"] = predictions.cpu().numpy()
            columns["prob_clean"] = probs.gather(1, targets.view(-1, 1))[:, 0].cpu().numpy()
            columns["width"] = np.array([w for w, _ in sizes])
            columns["height"] = np.array([h for _, h in sizes])
        for key, value in columns.items():
            collected.setdefault(key, []).append(value)
    bar.close()
    merged = {k: np.concatenate(v) for k, v in collected.items()}
    rows = merged.pop("row", np.zeros(0, dtype=np.int64))
    description = options.evaluation.describe()

    if source.masks_file is not None:
        if len(rows) != len(paths):
            raise DatasetError(
                f"{source.masks_file}: {len(paths) - len(rows)} masked images could not be "
                "decoded again; their metrics cannot be recomputed"
            )
        order = np.argsort(rows)
        replace_columns(
            source.masks_file,
            {k: v[order] for k, v in merged.items()},
            protocol=description,
            class_names=list(model.class_names),
        )
        scored, out = source.masks_file, source.masks_file.parent
    else:
        if options.out is None:
            raise DatasetError("evaluate needs -o OUT for saliency maps not made by mpbatch")
        out = Path(options.out)
        scored = out / SCORES_FILE
        eval_config = {
            "data": str(data.resolve()),
            "model": model_name,
            "weights": weights,
            "size": size,
            "target": options.target,
            "source": str(options.source) if options.source else f"baseline:{options.baseline}",
            "evaluation": description,
        }
        store = MaskStore.open(scored, eval_config, versions(), overwrite=True)
        try:
            strings = {k: [str(x) for x in v] for k, v in merged.items() if v.dtype == object}
            store.append({**merged, **strings}, failures, next_position=len(samples))
            store.set_attrs(protocol=description, class_names=list(model.class_names))
        finally:
            store.close()
    write_report_csv(scored, out / REPORT_FILE)
    write_summary(scored, out, skipped=len(failures))
    return scored


# ------------------------------------------------------------------------------ merge
def shard_files(out: Path) -> dict[int, dict[int, Path]]:
    """Shard mask files in `out`, as {world: {rank: path}}."""
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(Path(out).glob("masks-*-of-*.h5")):
        rank_text, _, world_text = path.stem[len("masks-") :].partition("-of-")
        if rank_text.isdigit() and world_text.isdigit():
            found.setdefault(int(world_text), {})[int(rank_text)] = path
    return found


def all_shards_complete(out: Path, world: int) -> bool:
    """True when every shard file of a `world`-way run exists and is marked complete."""
    import h5py

    files = shard_files(out).get(world, {})
    if len(files) != world:
        return False
    for path in files.values():
        try:
            with h5py.File(path, "r") as file:
                if not file.attrs.get("complete", False):
                    return False
        except OSError:
            return False
    return True


MERGE_LOCK = ".merging"


def merge_once(out: Path) -> Path | None:
    """Merge the shards unless another shard's process is merging them already.

    The last shards of a run can finish at the same moment, each see all shards complete,
    and both write OUT/masks.h5; an exclusively created lock file lets one of them merge.
    Returns the merged file, or None when the lock was taken.
    """
    lock = out / MERGE_LOCK
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(
            f"{lock} exists: another shard is merging (if none is, run `mpbatch merge {out}`)",
            file=sys.stderr,
        )
        return None
    try:
        return merge(out)
    finally:
        lock.unlink(missing_ok=True)


def merge(out: str | Path) -> Path:
    """Join OUT/masks-IIIII-of-NNNNN.h5 into OUT/masks.h5 with report.csv, failures.csv and
    the summary; refuses (StoreError) when shards are missing, incomplete or inconsistent."""
    out = Path(out)
    found = shard_files(out)
    if not found:
        raise StoreError(f"{out}: no shard files (masks-IIIII-of-NNNNN.h5) to merge")
    if len(found) > 1:
        raise StoreError(f"{out}: shard files of several world sizes {sorted(found)}; keep one")
    world, files = next(iter(found.items()))
    missing = [f"masks-{r:05d}-of-{world:05d}.h5" for r in range(world) if r not in files]
    if missing:
        raise StoreError(f"{out}: missing shards {', '.join(missing)}; run them, then merge")
    merged = out / MASKS_FILE
    merge_files([files[r] for r in range(world)], merged, compare_keys=RESULT_KEYS)
    write_report_csv(merged, out / REPORT_FILE)
    failures = write_failures_csv(merged, out / FAILURES_FILE)
    _, attrs = read_columns(merged)
    if attrs["config"].get("evaluation") is not None:
        write_summary(merged, out, skipped=len(failures))
    return merged
