"""What a run is asked to do (RunOptions, EvalOptions) and what it records (RunRecord).

The record is one frozen dataclass; the mask file's `config` attribute is its JSON form. The
fields that decide what the output contains are marked on the fields themselves
(`result_field`): a resumed run, and every shard of a merge, must agree on them, compared
in their JSON-normalised form (tuples as lists).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import SettingsError
from ..methods import DEFAULT_METHOD, get_method, method_for_preset
from ..metrics.comparisons import comparison_names
from ..metrics.deletion_insertion import CurveProtocol
from ..metrics.pointing import POINTING_TOLERANCE, SMALL_OBJECT_COVERAGE
from ..metrics.road import ROAD_FRACTIONS, ROAD_NOISE, describe_road
from ..models.randomisation import DEFAULT_RANDOMISATION_SEED
from ..models.registry import DEFAULT_MODEL
from ..models.speed import EVAL_PRECISIONS, SpeedOptions, resolve_eval_precision

# Step images scored per forward pass when not set. On this CPU (one thread), deletion +
# insertion curves of EfficientNet-Lite0 took 15.0 s at eval batch 1, 17.5 s at 2, 21.6 s
# at 8 and 47.8 s at 128 (benchmarks/results/bench_metrics_cpu_lite0_eval*.csv): a large
# batch's activations spill out of the caches. A GPU wants large batches.
CPU_EVAL_BATCH_SIZE = 1
CUDA_EVAL_BATCH_SIZE = 128


def eval_batch_size_for(device: torch.device) -> int:
    """The default number of step images per scoring forward pass on `device`."""
    return CUDA_EVAL_BATCH_SIZE if device.type == "cuda" else CPU_EVAL_BATCH_SIZE


def comparisons() -> tuple[str, ...]:
    """What is scored beside every map by default: the baselines and the cheap methods."""
    return comparison_names()


@dataclass
class EvalOptions:
    """How maps are scored (docs/design.md §4); None in RunOptions.evaluation skips scoring.

    baselines: the comparison rows: "center", "random" and the registered comparison
    methods (Grad-CAM). smooth: the pointing game blurs the resized map with σ =
    smooth·min(H, W) before its argmax; None: the method's own (0.09 for extremal).
    """

    step: int = 224
    tolerance: float = POINTING_TOLERANCE
    eval_batch_size: int | None = None  # None: eval_batch_size_for(the images' device)
    baselines: tuple[str, ...] = field(default_factory=comparisons)
    seed: int = 0  # of the random baseline and of ROAD's imputation noise
    smooth: float | None = None
    road: bool = False  # also ROAD's MoRF/LeRF curves (pipeline.metrics.road)
    # the scoring forwards: "fp32", "bf16" (autocast) or "auto" (resolve_eval_precision)
    precision: str = "auto"
    # a folder of comparison scores kept across runs (pipeline.metrics.comparison_cache); it never
    # changes a score, so it is no part of settings()
    comparison_cache: Path | None = None

    def __post_init__(self) -> None:
        known = comparisons()
        unknown = [b for b in self.baselines if b not in known]
        if unknown:
            raise SettingsError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(known)}")
        if self.precision not in EVAL_PRECISIONS:
            raise SettingsError(
                f"--eval-precision {self.precision}: choose from {', '.join(EVAL_PRECISIONS)}"
            )

    def resolved(self, device: torch.device | str, model_name: str) -> EvalOptions:
        """These options with "auto" precision resolved for the device and model."""
        precision = resolve_eval_precision(self.precision, device, model_name)
        return dataclasses.replace(self, precision=precision)

    def for_method(self, method: str | None) -> EvalOptions:
        """These options with `smooth` resolved and the method itself not among the rows."""
        smooth = self.smooth
        if smooth is None:
            smooth = get_method(method).pointing_smooth if method else 0.0
        rows = tuple(b for b in self.baselines if b != method)
        return dataclasses.replace(self, smooth=smooth, baselines=rows)

    def settings(self) -> dict:
        """What decides the scores (a resume must match it; the wording of describe() may
        change between versions without refusing old runs)."""
        settings = {
            "step": self.step,
            "tolerance": self.tolerance,
            "smooth": self.smooth,
            "baselines": list(self.baselines),
            "seed": self.seed,
        }
        if self.road:  # absent when off: runs from before ROAD resume as they were
            settings["road"] = {"fractions": list(ROAD_FRACTIONS), "noise": ROAD_NOISE}
        if self.precision == "bf16":  # absent for fp32: earlier runs resume as they were
            settings["precision"] = "bf16"
        return settings

    def protocol(self) -> CurveProtocol:
        return CurveProtocol(step=self.step)

    def describe(self, method: str | None = None) -> dict:
        """The protocol settings written into every mask file and summary; `method`: the
        registered method whose maps are scored (None: maps given as they are)."""
        protocol = self.protocol()
        smoothing = (
            f", smoothed with a Gaussian of sigma {self.smooth:g}·min(H, W) (zero padding, "
            "TorchRay's benchmark)"
            if self.smooth
            else ""
        )
        return {
            "deletion_insertion": protocol.describe(),
            "step": protocol.step,
            "blur_kernel": protocol.blur_kernel,
            "blur_sigma": protocol.blur_sigma,
            "pointing": (
                f"saliency resized to the original image size{smoothing}; argmax (first in "
                f"raster order); hit when within {self.tolerance:g} px (Euclidean, strict <) "
                "of the union of the target class's boxes; NaN without boxes"
            ),
            "tolerance": self.tolerance,
            "smooth": self.smooth,
            "scored_saliency": (
                get_method(method).scored_map
                if method
                else "the maps as given (higher = "
                "more important), resized bilinearly to the model's input size"
            ),
            "small_object": f"target boxes cover < {SMALL_OBJECT_COVERAGE:.0%} of the image",
            "baselines": list(self.baselines),
            "random_seed": self.seed,
            **({"road": describe_road()} if self.road else {}),
            **(
                {"precision": "bf16 autocast of the scoring forwards (probabilities in fp32)"}
                if self.precision == "bf16"
                else {}
            ),
        }


@dataclass
class RunOptions:
    """Everything `mpbatch run` needs; defaults match the CLI's."""

    data: Path
    out: Path
    model: str = DEFAULT_MODEL
    weights: str | None = None
    preset: str | None = None  # None: the method's first preset
    overrides: dict = field(default_factory=dict)  # settings fields set on the CLI
    size: int = 224
    target: str = "label"  # "label" (ground truth where known, else top-1) or "predicted"
    batch_size: int | str = "auto"  # or a number (auto: batching.auto_batch_size)
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
    reference: bool = False  # the reference implementation's float32 operation order
    method: str | None = None  # a registered method; None: the preset's, else meaningful
    area: int | None = None  # several masks per image (extremal): score this one, else the sum
    name: str | None = None  # the run's row label in summaries (default: the method)
    evaluation: EvalOptions | None = field(default_factory=EvalOptions)
    # the sanity check's stage: modules of the network re-initialised before explaining
    # (pipeline.models.randomisation.randomise), top first; () for the trained model
    randomised: tuple[str, ...] = ()
    randomisation_seed: int = DEFAULT_RANDOMISATION_SEED

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise SettingsError(f"--limit {self.limit}: give a number of images, at least 1")
        if self.method is None:
            self.method = method_for_preset(self.preset)
        method = get_method(self.method)
        if self.preset is None:
            self.preset = next(iter(method.presets))
        if self.preset not in method.presets:
            raise SettingsError(
                f"preset {self.preset!r} is not one of --method {self.method}'s: "
                f"{', '.join(method.presets)}"
            )
        if not method.uses_speed_options:
            asked = [
                flag
                for flag, on in (
                    (f"--precision {self.precision}", self.precision != "auto"),
                    ("--compile", self.compile),
                    ("--cuda-graphs", self.cuda_graphs),
                    ("--reference", self.reference),
                )
                if on
            ]
            if asked:
                raise SettingsError(
                    f"{asked[0]} does not apply to --method {self.method}: it runs in float32 "
                    "without compilation"
                )
        if self.reference and (self.precision == "bf16" or self.compile or self.cuda_graphs):
            raise SettingsError(
                "--reference runs float32 eager: it takes no --precision bf16, --compile or "
                "--cuda-graphs"
            )
        if self.evaluation is not None:
            self.evaluation = self.evaluation.for_method(self.method)

    def mask_settings(self) -> Any:
        """The method's settings: the preset with the CLI's overrides."""
        return get_method(self.method).presets[self.preset].replace(**self.overrides)


def result_field(*, merge: bool = True, **kwargs: Any) -> Any:
    """A RunRecord field that decides what the output contains: a resume must match it, and
    so must every shard of a merge unless merge=False (the shard's own range)."""
    return field(metadata={"result": True, "merge": merge}, **kwargs)


@dataclass(frozen=True)
class RunRecord:
    """The provenance of a mask file, written as its `config` attribute (JSON)."""

    data: str = result_field()
    model: str = result_field()
    weights: str | None = result_field()
    method: str = result_field()
    mask: dict = result_field()  # the method's settings (`to_dict()`)
    area: int | None = result_field()
    size: int = result_field()
    target: str = result_field()
    limit: int | None = result_field()
    layout: str = result_field()
    scoring: dict | None = result_field()  # EvalOptions.settings(), None without metrics
    speed: dict = result_field()  # what ran: SpeedOptions as applied, and the device type
    shard: dict | None = result_field(merge=False, default=None)  # rank, world
    # the sanity check's re-initialised modules and their seed; None for the trained model
    randomised: dict | None = result_field(default=None)
    evaluation: dict | None = None  # EvalOptions.describe(): the protocol in words
    preset: str = ""
    name: str | None = None
    normalization: dict | None = None  # the model's mean and std, pixel units
    batch_size: int | str = "auto"
    workers: int = 0
    device: str = "auto"

    def to_config(self) -> dict:
        """The JSON-normalised dict stored in the file (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def resume_keys(cls) -> list[str]:
        """Config keys a resumed run must match."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("result")]

    @classmethod
    def merge_keys(cls) -> list[str]:
        """Config keys every shard of a merge must share."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("merge")]


def upgrade_stored(stored: dict, device: torch.device) -> dict:
    """Fill in what mask files of older mpbatch versions did not record (their values then
    were the defaults), so that those runs still resume."""
    stored = {"method": DEFAULT_METHOD, "area": None, **stored}
    if "scoring" not in stored:  # before the scoring settings were recorded apart
        described = stored.get("evaluation")
        stored["scoring"] = None
        if isinstance(described, dict):
            stored["scoring"] = {
                "step": described.get("step"),
                "tolerance": described.get("tolerance"),
                "smooth": described.get("smooth", 0.0),  # nothing was smoothed before
                "baselines": described.get("baselines"),
                "seed": described.get("random_seed"),
            }
    speed = stored.get("speed")
    if isinstance(speed, dict):
        # before CUDA graphs, the device type and the reference path were recorded; extremal
        # had only the reference path then
        stored["speed"] = {
            "cuda_graphs": False,
            "device": device.type,
            "reference": stored["method"] == "extremal",
            **speed,
        }
    shard = stored.get("shard")
    if isinstance(shard, dict) and shard.get("world") == 1:
        # before runs were keyed by path: one process took the slice [start, stop) of the
        # listing, i.e. all of it, which is what a single process takes now. A sharded run
        # of then took contiguous slices, which hash sharding does not continue: refused.
        stored["shard"] = {"rank": 0, "world": 1}
    return stored


def applied_speed(options: RunOptions, device: torch.device) -> SpeedOptions:
    """How the optimisation runs (no effect on the hyperparameters).

    "auto" precision follows bench_optimize.py (SpeedOptions.recommended): bf16 where it
    won (CUDA; standard conv nets on CPUs with AMX or avx512_bf16, speed.CPU_PRECISION),
    fp32 where bf16 is emulated, for depthwise-heavy nets on CPU and for
    custom `module:function` models, which nothing has measured, and for methods whose bf16
    fidelity nothing has measured (Method.auto_bf16 False: extremal). An explicit precision
    gets the memory format measured best with it. `reference` runs the reference path.
    Methods that do not use speed options run float32 eager, and that is what is recorded.
    """
    method = get_method(options.method)
    if not method.uses_speed_options:
        return SpeedOptions(precision="fp32")
    if options.reference:
        return SpeedOptions(precision="fp32", reference=True)
    custom = ":" in options.model and not options.model.startswith("timm:")
    if options.precision == "auto":
        measured = method.auto_bf16 and not custom
        speed = SpeedOptions.recommended(device, options.model) if measured else SpeedOptions()
    else:
        speed = SpeedOptions.recommended(device, options.model, precision=options.precision)
    graphs = options.compile and options.cuda_graphs
    return dataclasses.replace(speed, compile=options.compile, cuda_graphs=graphs)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda when available, else cpu; on CUDA, GPU `local_rank` (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError("--device cuda was asked for, but torch sees no CUDA device")
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
