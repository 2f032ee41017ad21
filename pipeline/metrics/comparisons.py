"""Comparison maps: what every run's map is scored beside, as a registry.

A comparison is a map made for the same images and targets as the run's, and scored with
the same metrics; its columns carry its name as prefix (pipeline.reports.schema). Two baselines
are built in: "center" (a centred Gaussian, which points at the image centre in the
pointing game) and "random" (uniform noise at the mask's grid, seeded per image). Every
registered method marked `comparison` (Grad-CAM) is one too, with its default settings.

A new comparison is one call of `register` (a test registers a plain input-gradient map);
scoring, evaluate, the reports and the gallery find it by name and name none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.seeding import image_seeds
from ..errors import SettingsError
from ..methods import comparison_names as method_comparisons
from ..methods import get_method
from .deletion_insertion import center_saliency, random_saliency
from .pointing import center_points


@dataclass(frozen=True)
class MapRequest:
    """What a comparison may use to make its maps for one batch.

    images B×3×H×W in [0, 1]; targets B (long); keys: the images' paths (seeds, caches);
    grid (h, w): the run's mask resolution; seed: the evaluation's seed.
    """

    model: torch.nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    keys: list[str]
    grid: tuple[int, int]
    seed: int


@dataclass(frozen=True)
class Comparison:
    """name: its column prefix; label: readable; maps(request) -> B×h×w (higher = more
    important, any resolution); points(original sizes) -> B×2 (x, y) replaces the map's
    argmax in the pointing game, when given; optional: a baseline the gallery shows only
    on request."""

    name: str
    label: str
    maps: Callable[[MapRequest], torch.Tensor]
    points: Callable[[Sequence[tuple[int, int]]], torch.Tensor] | None = None
    optional: bool = False  # the gallery hides its thumbnails until asked (the baselines)


_REGISTRY: dict[str, Comparison] = {}


def register(comparison: Comparison) -> Comparison:
    """Add a comparison (its name must be new, and not a registered method's)."""
    if comparison.name in _REGISTRY or comparison.name in method_comparisons():
        raise ValueError(f"comparison {comparison.name!r} is registered twice")
    _REGISTRY[comparison.name] = comparison
    return comparison


def comparison_names() -> tuple[str, ...]:
    """Every comparison, in the order reports list them: the registered ones, then the
    methods marked `comparison`."""
    return (*_REGISTRY, *method_comparisons())


def get_comparison(name: str) -> Comparison:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in method_comparisons():
        return _method_comparison(name)
    raise SettingsError(f"unknown comparison {name!r}; choose from {', '.join(comparison_names())}")


def _method_comparison(name: str) -> Comparison:
    """A registered method as a comparison: its default settings, seeded per image."""
    method = get_method(name)

    def maps(request: MapRequest) -> torch.Tensor:
        settings = method.resolve_settings(method.default_settings, request.model)
        seeds = image_seeds(method.seed(settings) or 0, request.keys)
        columns = method.explain(request.model, request.images, request.targets, seeds, settings)
        return method.saliency(columns, settings, tuple(request.images.shape[-2:]))

    return Comparison(name, method.label or name, maps)


def comparison_maps(name: str, request: MapRequest) -> torch.Tensor:
    """The B×h×w maps of comparison `name` for one batch, on the images' device."""
    return get_comparison(name).maps(request).to(request.images.device)


register(
    Comparison(
        "center",
        "centre baseline",
        lambda r: center_saliency(len(r.keys), r.grid),
        points=center_points,
        optional=True,
    )
)
register(
    Comparison(
        "random",
        "random baseline",
        lambda r: random_saliency(r.keys, r.grid, r.seed),
        optional=True,
    )
)
