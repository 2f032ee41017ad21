"""Batch norm folded into the convolution before it, for scoring's forward passes.

In eval mode a BatchNorm2d is an affine map per channel, y = (x − μ)·γ/√(σ² + ε) + β, so a
convolution whose output only feeds it can absorb it: W' = W·s and b' = (b − μ)·s + β with
s = γ/√(σ² + ε), computed in float64. The logits change only by floating-point rounding, and
one pass over memory per BatchNorm is saved (ResNet-50 and EfficientNet-Lite0 have 53 and 49).

Which convolution feeds which BatchNorm is read from the data flow (torch.fx, with
convolutions and BatchNorms as leaves), never from the order of the modules. A BatchNorm is
folded only when its input is a Conv2d's output that nothing else uses. timm's
`BatchNormAct2d` (a BatchNorm2d followed by its dropout and activation) becomes those two;
another BatchNorm2d subclass is left alone. A network fx cannot trace is used unfolded. The
folded copy is checked against the model on a probe batch; a difference beyond rounding
leaves the model unfolded and logs why, so nothing silently changes a score.

The copy is cached per model and rebuilt when any of the model's parameters or buffers has
been written in place since (their version counters), so a stale copy is never used.
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PROBE_TOLERANCE = 1e-4  # of the largest |logit|: float32 rounding is ~1e-6 of it


class _ConvAndNormLeaves(fx.Tracer):
    """Trace with convolutions and BatchNorms as leaves (their subclasses included)."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        leaves = (nn.Conv2d, nn.BatchNorm2d)
        return isinstance(module, leaves) or super().is_leaf_module(module, name)


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What replaces a folded BatchNorm: nothing for BatchNorm2d, timm's BatchNormAct2d's
    dropout and activation; None for a subclass whose forward is unknown."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm).__name__ == "BatchNormAct2d" and hasattr(norm, "act") and hasattr(norm, "drop"):
        return nn.Sequential(norm.drop, norm.act)
    return None


def foldable_pairs(network: nn.Module) -> list[tuple[str, str]]:
    """(convolution, batch norm) module paths where the norm's input is the convolution's
    output and nothing else reads it; [] when fx cannot trace the network."""
    try:
        graph = _ConvAndNormLeaves().trace(network)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: do not fold
        log.debug("batch norm not folded: fx could not trace the network (%s)", error)
        return []
    modules = dict(network.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        norm = modules[node.target]
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1
            and norm.track_running_stats
            and norm.running_mean is not None
            and _after_norm(norm) is not None
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Absorb eval-mode `norm` into `conv`'s weight and bias (in place)."""
    weight = conv.weight.double()
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    dtype = conv.weight.dtype
    conv.weight.copy_((weight * scale.view(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=conv.weight.requires_grad)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` (a NormalizedClassifier or a bare network) with every
    foldable BatchNorm folded into its convolution; `model` itself when none is."""
    network = getattr(model, "model", model)
    pairs = foldable_pairs(network) if not network.training else []
    if not pairs:
        return model
    folded = copy.deepcopy(model).eval()
    inner = getattr(folded, "model", folded)
    for conv_path, norm_path in pairs:
        norm = inner.get_submodule(norm_path)
        _fold_into(inner.get_submodule(conv_path), norm)
        _set_module(inner, norm_path, _after_norm(norm))
    return folded


def _versions(model: nn.Module) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((id(t), t._version) for t in tensors)


def _probe(model: nn.Module, folded: nn.Module, images: torch.Tensor) -> float:
    """Largest |logit difference| / largest |logit| on `images` (NaN if either fails)."""
    try:
        with torch.inference_mode():
            expected, got = model(images).double(), folded(images).double()
    except RuntimeError as error:
        log.debug("batch norm folding probe failed: %s", error)
        return float("nan")
    return float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-12))


def scoring_model(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """The model scoring's forward passes use: batch norm folded (cached; each new copy is
    checked on `probe`, a few of the images to score, B×3×H×W), or `model` itself where
    nothing folds or the check fails."""
    if model.training:
        return model
    versions = _versions(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    folded = fold_batch_norm(model)
    if folded is not model:
        difference = _probe(model, folded, probe)
        if not difference <= PROBE_TOLERANCE:
            log.warning(
                "batch norm left unfolded for scoring: the folded model's logits differ by "
                "%.2g of their scale on a probe batch",
                difference,
            )
            folded = model
    _CACHE[model] = (versions, folded)
    return folded
