"""The Python API: what a notebook needs, without the command line or its files.

    from pipeline.api import explain, load_model, read_run, score

- `explain(model, images, targets, method=..., **settings)`: any registered method on a
  batch; its per-image columns ("masks", ...) and the map every metric scores, "saliency".
- `score(model, images, saliency, targets, boxes=...)`: the metrics of given maps (yours or
  `explain`'s), one row per image, with the protocol's options as keywords.
- `read_run(folder)`: a run folder of `mpbatch run` as pandas tables.

Tensors and DataFrames in and out; nothing is printed or written. A map from `explain` with
the same keys, settings and model equals the one `mpbatch run` stores for those images (the
per-image seeds come from the keys, as a run's come from the image paths).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .commands.batching import explain_padded
from .commands.configuration import EvalOptions
from .data.datasets import Box, Sample
from .methods import get_method
from .metrics.scoring import evaluate_batch
from .models.registry import NormalizedClassifier, load_model
from .models.speed import SpeedOptions
from .reports.tables import localization_curves, mean_curves, per_image_table, summary_table
from .store.reader import RunFile

__all__ = ["RunTables", "explain", "load_model", "read_run", "score"]


def explain(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    *,
    method: str = "meaningful",
    preset: str | None = None,
    keys: Sequence[str] | None = None,
    speed: SpeedOptions | None = None,
    **settings,
) -> dict[str, torch.Tensor]:
    """Explain a batch with a registered method (`pipeline.methods.method_names()`).

    model: a classifier taking pixels in [0, 1] (`load_model` wraps one with its
    normalisation); images B×3×H×W in [0, 1]; targets B class indices. preset: one of the
    method's (default its first); settings: any of its settings fields (e.g. iterations=50).
    keys: one string per image that seeds its randomness (default "0", "1", ...); with an
    image's path relative to DATA it is seeded as `mpbatch run` seeds it.
    Returns the method's columns (first axis B; "masks" first) and "saliency", the B×H×W
    map the metrics score (higher = more important).
    """
    chosen = get_method(method)
    base = chosen.presets[preset] if preset is not None else chosen.default_settings
    resolved = chosen.resolve_settings(base.replace(**settings), model)
    targets = torch.as_tensor(targets, dtype=torch.long, device=images.device)
    keys = [str(i) for i in range(len(images))] if keys is None else [str(k) for k in keys]
    if len(keys) != len(images) or len(targets) != len(images):
        raise ValueError(f"{len(images)} images, {len(targets)} targets, {len(keys)} keys")
    columns = explain_padded(chosen, model, images, targets, keys, resolved, speed=speed)
    columns["saliency"] = chosen.saliency(columns, resolved, tuple(images.shape[-2:]))
    return columns


def score(
    model: NormalizedClassifier,
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    *,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    keys: Sequence[str] | None = None,
    **protocol,
) -> pd.DataFrame:
    """The metrics of given maps, one row per image (docs/design.md §4's protocols).

    saliency: B×h×w, higher = more important, at the images' or any aspect-matching size.
    boxes: per image, the target class's boxes (xmin, ymin, xmax, ymax; 0-based pixels of
    the original image) for the pointing game and localization, or None. sizes: each
    original image's (width, height) (default: the images' own). protocol: EvalOptions'
    fields (step, tolerance, road, baselines, ...); by default no comparison rows.
    Curves are arrays in their cells; AUCs, hits and errors are numbers (NaN where undefined).
    """
    targets = torch.as_tensor(targets, dtype=torch.long, device=images.device)
    count = len(images)
    keys = [str(i) for i in range(count)] if keys is None else [str(k) for k in keys]
    if sizes is None:
        sizes = [(images.shape[-1], images.shape[-2])] * count
    samples = [
        Sample(
            path=key,
            label=int(target),
            boxes=tuple(Box(int(target), *map(float, box)) for box in (boxes or [()] * count)[i]),
        )
        for i, (key, target) in enumerate(zip(keys, targets.tolist(), strict=True))
    ]
    options = {"baselines": (), **protocol}
    evaluation = EvalOptions(**options).for_method(None).resolved(images.device, "")
    columns = evaluate_batch(
        model, images, saliency, targets, samples, [tuple(s) for s in sizes], evaluation
    )
    table = pd.DataFrame({"key": keys, "target": targets.cpu().numpy()})
    for name, values in columns.items():
        values = np.asarray(values)
        table[name] = list(values) if values.ndim > 1 else values
    return table


@dataclasses.dataclass(frozen=True)
class RunTables:
    """A run folder as tables: `report` (one row per image, as report.csv), `summary` (one row
    per map and metric with bootstrap intervals, as summary.csv), `curves` (the mean
    deletion/insertion curves, long: map, curve, fraction in [0, 1], score), `localization`
    (error per threshold; empty when the maps were not localized)."""

    report: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame
    localization: pd.DataFrame
    config: dict


def read_run(folder: str | Path, n_resamples: int = 1000, seed: int = 0) -> RunTables:
    """Read a run folder (or its masks.h5) into tables; the summary's intervals are bootstrap
    percentiles over `n_resamples` resamples (seeded), as `mpbatch run` writes them."""
    run = RunFile.open(folder)
    return RunTables(
        report=per_image_table(run.columns, run.class_names),
        summary=summary_table(run.columns, label=run.label, n_resamples=n_resamples, seed=seed),
        curves=_curves_table(mean_curves(run.columns, label=run.label)),
        localization=localization_curves(run.columns, label=run.label),
        config=run.config,
    )


def _curves_table(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Mean curves as a long table: one row per map, curve and step."""
    parts = [
        pd.DataFrame(
            {"map": label, "curve": name, "fraction": np.linspace(0, 1, len(curve)), "score": curve}
        )
        for label, pair in curves.items()
        for name, curve in zip(("deletion", "insertion"), pair, strict=True)
    ]
    if not parts:
        return pd.DataFrame(columns=["map", "curve", "fraction", "score"])
    return pd.concat(parts, ignore_index=True)
