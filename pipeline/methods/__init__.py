"""Saliency methods as plug-ins: a registry from a method's name to its `Method`.

The shape is timm's model registry: each module of this package defines one `Method`
subclass and decorates it with `@register`; the package imports every module in it on first
use, so a new method is one new file (and its test). The runner, the scorer and the CLI ask
the registry (`get_method`, `method_names`, `method_for_preset`, `comparison_names`) and never
name a method.

A method carries
- `settings_class` (a frozen dataclass with `replace` and `to_dict`) and `presets` (name ->
  settings, the default first; preset names are unique across methods);
- `explain(model, images, targets, seeds, settings, ...)`: per-image columns for the mask
  file, at least "masks" (B×...), as tensors;
- `saliency(columns, settings, size, area)`: the B×H×W map every metric scores (higher =
  more important), at the model's input size, from the stored columns;
- `perturbed(...)`: the perturbed image a figure shows.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from ..errors import SettingsError
from ..reports.schema import Column

_REGISTRY: dict[str, Method] = {}
_LOADED = False


class Method:
    """Base class of a saliency method; subclasses set the class attributes and methods."""

    name: ClassVar[str]
    label: ClassVar[str] = ""  # readable name for reports and the gallery (default: name)
    summary: ClassVar[str]  # one line for --help
    # the per-image columns `explain` stores besides "masks" (pipeline.reports.schema' schema)
    columns: ClassVar[tuple[Column, ...]] = ()
    settings_class: ClassVar[type]
    presets: ClassVar[dict[str, Any]]
    # the settings the CLI exposes as --flags: field name -> help text (choices from `choices`)
    option_help: ClassVar[dict[str, str]] = {}
    choices: ClassVar[dict[str, Sequence[str]]] = {}
    # the pointing game's smoothing for this method's maps (σ = smooth·min(H, W))
    pointing_smooth: ClassVar[float] = 0.0
    # True: honours SpeedOptions (bf16, compile, CUDA graphs); False: fp32 eager only
    uses_speed_options: ClassVar[bool] = False
    # True: --precision auto may pick bf16 for it (its bf16 masks' fidelity was measured)
    auto_bf16: ClassVar[bool] = False
    # True: cheap enough (about one forward/backward) to score beside every run
    comparison: ClassVar[bool] = False
    # what the metrics score, in words (written into every file's protocol)
    scored_map: ClassVar[str] = ""

    @property
    def default_settings(self) -> Any:
        return next(iter(self.presets.values()))

    def settings_from_dict(self, stored: dict) -> Any:
        """Settings from a mask file's JSON (lists back to tuples where the field is one)."""
        fields = {f.name: f for f in dataclasses.fields(self.settings_class)}
        values = {}
        for key, value in stored.items():
            if key in fields and isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return self.settings_class(**values)

    def resolve_settings(self, settings: Any, model: torch.nn.Module) -> Any:
        """Settings with anything that depends on the model filled in (e.g. a layer name)."""
        return settings

    # What the runner reads of a method's settings, declared here with defaults, so that
    # nothing outside a method's module reads its settings' fields by name.
    def areas(self, settings: Any) -> tuple[float, ...] | None:
        """The target areas of a method that makes one mask per area, else None."""
        return None

    def seed(self, settings: Any) -> int | None:
        """The run seed that, with each image's key, seeds the image's randomness; None for
        a method that draws no random numbers."""
        return None

    def shortened(self, settings: Any, iterations: int) -> Any:
        """The settings with `iterations` optimisation steps (the batch-size probe);
        unchanged for a method that does not iterate."""
        return settings

    def explain(
        self,
        model: torch.nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        seeds: list[int],
        settings: Any,
        *,
        speed: Any = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        on_iteration: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-image columns (first axis B) for B images B×3×H×W in [0, 1]; "masks" first."""
        raise NotImplementedError

    def saliency(
        self,
        columns: dict[str, torch.Tensor],
        settings: Any,
        size: tuple[int, int],
        area: int | None = None,
    ) -> torch.Tensor:
        """B×H×W maps (higher = more important) at input `size`, from stored columns."""
        raise NotImplementedError

    def perturbed(
        self,
        image: torch.Tensor,
        columns: dict[str, torch.Tensor],
        settings: Any,
        mean: torch.Tensor,
        key: str,
        original_size: tuple[int, int],
    ) -> tuple[torch.Tensor, str]:
        """The perturbed image 1×3×H×W a figure shows beside `image` 1×3×H×W, and a caption;
        `columns` are one image's (first axis 1)."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add one instance of a Method subclass to the registry."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    taken = {p for m in _REGISTRY.values() for p in m.presets}
    clash = sorted(taken & set(cls.presets))
    if clash:
        raise ValueError(f"method {cls.name!r}: preset names {clash} are taken")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")


def declared_columns() -> tuple[Column, ...]:
    """Every registered method's declared columns (the first declaration of a name wins)."""
    seen: dict[str, Column] = {}
    for name in method_names():
        for column in get_method(name).columns:
            seen.setdefault(column.name, column)
    return tuple(seen.values())


def method_names() -> list[str]:
    """Registered methods, the default first."""
    _load_all()
    return sorted(_REGISTRY, key=lambda n: (n != DEFAULT_METHOD, n))


def get_method(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise SettingsError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return _REGISTRY[name]


def preset_names() -> list[str]:
    """Every method's presets."""
    return [p for name in method_names() for p in get_method(name).presets]


def method_for_preset(preset: str | None) -> str:
    """The method a preset belongs to; the default method for None."""
    if preset is None:
        return DEFAULT_METHOD
    for name in method_names():
        if preset in get_method(name).presets:
            return name
    raise SettingsError(f"unknown preset {preset!r}; choose from {', '.join(preset_names())}")


def comparison_names() -> list[str]:
    """Methods scored beside every run as comparisons (with the baselines)."""
    return [n for n in method_names() if get_method(n).comparison]


def option_flags() -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """Every method's CLI settings: field name -> (help, choices), the first method's help
    where two share a name."""
    flags: dict[str, tuple[str, tuple[str, ...] | None]] = {}
    for name in method_names():
        method = get_method(name)
        for field_name, text in method.option_help.items():
            choices = method.choices.get(field_name)
            flags.setdefault(field_name, (text, tuple(choices) if choices else None))
    return flags


def parse_overrides(method_name: str, given: dict[str, str | None]) -> dict[str, Any]:
    """Command-line text -> typed settings fields of `method_name` (unset values skipped).
    Raises ValueError naming the flag when the method has no such setting or the text does
    not parse as the field's type."""
    method = get_method(method_name)
    hints = typing.get_type_hints(method.settings_class)
    values = {}
    for name, text in given.items():
        if text is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in hints:
            raise SettingsError(f"{flag} does not apply to --method {method_name}")
        try:
            values[name] = _parse(hints[name], str(text))
        except ValueError as error:
            raise SettingsError(f"{flag} {text!r}: {error}") from None
    return values


def _parse(kind: Any, text: str) -> Any:
    """`text` as a value of the annotated type (int, float, bool, str, tuple of floats,
    each optionally None-able)."""
    options = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
    if len(options) == 1 and typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = options[0]
    if typing.get_origin(kind) is tuple:
        return tuple(float(part) for part in text.split(",") if part.strip())
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError("expected true or false")
    if kind in (int, float):
        return kind(text)
    return text


def settings_from_config(config: dict) -> Any:
    """The method settings recorded in a mask file's config ("method", "mask")."""
    return get_method(config.get("method") or DEFAULT_METHOD).settings_from_dict(config["mask"])


DEFAULT_METHOD = "meaningful"
