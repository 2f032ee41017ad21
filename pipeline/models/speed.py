"""The one speed policy: how a model's forward and backward are computed, for every method
and for scoring. Nothing here changes a hyperparameter; every choice is a measurement.

- SpeedOptions: precision (fp32, bf16 autocast of the model forward, or auto), channels_last,
  the Adam implementation, torch.compile and CUDA graphs, and the reference path (float32
  eager, the reference implementation's operation order).
- resolve_precision / CPU_PRECISION: what "auto" picks, by device, by what the CPU offers for
  bf16 (cpu_bf16_support) and by model family (benchmarks/bench_optimize.py's results).
- prepare_model, to_model_format, autocast_for: the options applied to a model and a batch.
- Scoring's policy: resolve_eval_precision (bf16 only behind a measured fidelity gate,
  EVAL_BF16_FAMILIES), Bf16Forward, channels_last_on_cpu.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SettingsError

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

# The CPU's precision for `auto`, by what the CPU offers for bf16 (cpu_bf16_support) and
# whether the model is depthwise-heavy. Each entry is a measurement (bench_optimize.py, one
# thread, the mask optimisation's forward plus input gradient):
CPU_PRECISION = {
    # bench_optimize_cpu.csv, Intel Xeon with AMX: resnet50 and vgg19 3-7x faster in bf16 +
    # channels_last; lite0 0.8-1.4x, within that run's noise.
    ("amx", False): "bf16",
    ("amx", True): "fp32",
    # Issue 26's table, an AMD EPYC (Zen 4) whose VM exposed avx512_bf16: bf16 autocast 2.4x
    # (resnet50) and 3.0x (vgg19) faster than fp32 at batch 4. Not yet re-measured into a CSV
    # by a session on such a machine; lite0 unmeasured there, so fp32.
    ("avx512_bf16", False): "bf16",
    ("avx512_bf16", True): "fp32",
    # bench_optimize_cpu_amd_avx2.csv, the same AMD EPYC model under a VM that exposes AVX2
    # only: bf16 is emulated, 7x (lite0), 14x (resnet50) and 24x (vgg19) slower at batch 4.
    ("none", False): "fp32",
    ("none", True): "fp32",
}


def cpu_bf16_support() -> str:
    """What this CPU offers for bf16 matrix maths, as torch sees it: "amx" (AMX tiles),
    "avx512_bf16" (AVX-512 BF16 instructions) or "none" (bf16 is emulated). The same CPU
    model can differ between machines: a hypervisor may hide AVX-512."""
    for name, flag in (
        ("amx", "_is_amx_tile_supported"),
        ("avx512_bf16", "_is_avx512_bf16_supported"),
    ):
        check = getattr(torch.cpu, flag, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:
            continue
    return "none"


def resolve_precision(
    device: torch.device | str, model_name: str = "", cpu_bf16: str | None = None
) -> str:
    """The precision that won in bench_optimize.py for this device and model: "fp32" or "bf16".

    CPU: CPU_PRECISION for what the CPU offers (`cpu_bf16`, default cpu_bf16_support()) and
    whether the model is depthwise-heavy (EfficientNet, MobileNet, ...). CUDA with bf16
    support: "bf16" (on an H100 at batch 64 it beat fp32 for lite0, resnet50 and vgg19).
    Anything else: "fp32".
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        depthwise = any(family in model_name.lower() for family in _DEPTHWISE_FAMILIES)
        support = cpu_bf16 if cpu_bf16 is not None else cpu_bf16_support()
        return CPU_PRECISION[support, depthwise]
    return "fp32"


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
    reference:     the reference implementation's operations in their order, float32 eager
                   (needs precision "fp32" or "auto" and no other option). Extremal runs
                   TorchRay's mask generator instead of the fast one (equal to rounding); the
                   meaningful methods' fp32 path is already their reference.
    """

    precision: str = "fp32"
    channels_last: bool = False
    adam: str = "default"
    compile: bool = False
    cuda_graphs: bool = False
    reference: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.adam not in ADAM_IMPLEMENTATIONS:
            raise SettingsError(f"adam must be one of {ADAM_IMPLEMENTATIONS}, got {self.adam!r}")
        if self.cuda_graphs and not self.compile:
            raise SettingsError(
                "cuda_graphs needs compile (they are torch.compile's reduce-overhead)"
            )
        if self.reference and (
            self.precision == "bf16" or self.channels_last or self.compile or self.adam != "default"
        ):
            raise SettingsError(
                "the reference path is float32 eager: it takes no --precision bf16, "
                "channels_last, compile or Adam implementation"
            )

    @classmethod
    def recommended(
        cls,
        device: torch.device | str,
        model_name: str = "",
        precision: str = "auto",
        cpu_bf16: str | None = None,
    ) -> SpeedOptions:
        """The options that won in bench_optimize.py: the precision (resolve_precision's
        when "auto"); channels_last with bf16 on CPU (bf16 pays only together with it there)
        and, on CUDA, for VGG only (on an H100 it lost for resnet50 and lite0); PyTorch's
        default Adam; no compile."""
        device = torch.device(device)
        if precision == "auto":
            precision = resolve_precision(device, model_name, cpu_bf16)
        channels_last = precision == "bf16"
        if device.type == "cuda":
            name = model_name.lower()
            channels_last &= any(family in name for family in _CUDA_CHANNELS_LAST_FAMILIES)
        return cls(precision=precision, channels_last=channels_last)

    def resolved(self, device: torch.device | str, model_name: str = "") -> SpeedOptions:
        """A copy with precision "auto" replaced by resolve_precision's answer."""
        if self.precision != "auto":
            return self
        if self.reference:
            return dataclasses.replace(self, precision="fp32")
        return dataclasses.replace(self, precision=resolve_precision(device, model_name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def prepare_model(model: torch.nn.Module, speed: SpeedOptions, device: torch.device):
    """The callable used for the forward passes: the model, in channels_last and/or compiled."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        # dynamo caches the compiled code on the forward's code object, guarded on this model
        # and the input shapes, so a fresh wrapper per batch does not recompile.
        graphs = speed.cuda_graphs and device.type == "cuda"
        return torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)
    return model


def to_model_format(images: torch.Tensor, speed: SpeedOptions) -> torch.Tensor:
    """Images in the memory format the speed options run the model in."""
    if speed.channels_last:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def autocast_for(speed: SpeedOptions, device: torch.device):
    """bf16 autocast on `device` when the speed options ask for it, else a no-op context."""
    if speed.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ------------------------------------------------------------------ scoring
EVAL_PRECISIONS = ("auto", "fp32", "bf16")
# Model families whose bf16 scoring kept |ΔAUC| against fp32 within mean 0.002 and max 0.01
# on the sample's first 100 images (benchmarks/eval_precision_fidelity.py,
# benchmarks/results/eval_precision_fidelity.csv). Unmeasured families score in fp32;
# efficientnet_lite0 failed (mean |ΔAUC| 0.0079, max 0.053 on Grad-CAM maps).
EVAL_BF16_FAMILIES: tuple[str, ...] = ()


def resolve_eval_precision(requested: str, device: torch.device | str, model_name: str) -> str:
    """The scoring forwards' precision: an explicit choice as it is; "auto" is bf16 only where
    the masks' "auto" also picks bf16 for this device and model (bf16 is native there, see
    resolve_precision) and the family passed the fidelity check (EVAL_BF16_FAMILIES),
    else fp32."""
    if requested != "auto":
        return requested
    family = any(model_name.lower().startswith(f) for f in EVAL_BF16_FAMILIES)
    native = resolve_precision(device, model_name) == "bf16"
    return "bf16" if family and native else "fp32"


class Bf16Forward(nn.Module):
    """`model` with its forward under bf16 autocast on the input's device, logits returned in
    float32; mean and std (pixel units) are the model's, so perturbation substrates stay the
    same. Scoring's `--eval-precision bf16`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def mean(self) -> torch.Tensor:
        return self.model.mean

    @property
    def std(self) -> torch.Tensor:
        return self.model.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16):
            return self.model(pixels).float()


@contextlib.contextmanager
def channels_last_on_cpu(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Run the block with the model's weights in channels_last when ``device`` is the CPU.

    The convolutions then pick oneDNN's channels_last kernels for inputs of any layout; the
    outputs change only by floating-point order. On an AMX Xeon the deletion and insertion
    curves ran 1.38x faster for EfficientNet-Lite0 and 1.20x for ResNet-50 (2 threads, eval
    batch 8), 1.37x for Lite0 (1 thread, batch 1, the CPU default)
    (benchmarks/results/bench_scoring_format_cpu.csv). The weights' previous layout is
    restored on exit, so the optimisation keeps its own choice (SpeedOptions.channels_last).
    Elsewhere (CUDA: not measured) the model is left as it is.
    """
    if torch.device(device).type != "cpu":
        yield model
        return
    # a weight whose two layouts differ (1×1 and depthwise kernels can be both at once)
    telling = [
        p
        for p in model.parameters()
        if p.dim() == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)
    ]
    was_channels_last = bool(telling) and not telling[0].is_contiguous()
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if not was_channels_last:
            model.to(memory_format=torch.contiguous_format)
