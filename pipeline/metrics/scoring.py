"""One batch of images in, per-image columns out: classification, targets and the metrics of
a saliency map beside its comparison rows. Shared by `run` and `evaluate`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..commands.configuration import EvalOptions, eval_batch_size_for
from ..data.datasets import DatasetError, Sample
from ..data.seeding import image_seeds
from ..models.folding import scoring_model
from ..models.registry import NormalizedClassifier
from ..models.speed import Bf16Forward, channels_last_on_cpu, resolve_eval_precision
from .comparison_cache import ComparisonCache, function_digest, model_digest
from .comparisons import MapRequest, comparison_maps, get_comparison
from .deletion_insertion import score_saliency
from .localization import localization_columns
from .pointing import (
    SMALL_OBJECT_COVERAGE,
    TORCHRAY_POINTING_SMOOTH,
    box_coverage,
    pointing_hits,
    pointing_points,
)
from .road import road_curves


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
    """The class each map explains: the label where known (≥ 0) in "label" mode, else top-1."""
    if mode == "predicted":
        return predictions
    if mode != "label":
        raise ValueError(f"unknown target mode {mode!r}")
    return torch.where(labels >= 0, labels, predictions)


def image_columns(
    model: NormalizedClassifier,
    images: torch.Tensor,
    samples: Sequence[Sample],
    positions: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    target_mode: str,
    targets: torch.Tensor | None = None,
) -> dict[str, np.ndarray | list[str]]:
    """The columns every scored file has: index, path, width, height, label, target, pred,
    prob_clean. targets: fixed (a run's), else chosen by `target_mode`."""
    probs = classify(model, images)
    predictions = probs.argmax(dim=1)
    labels = torch.tensor([s.label for s in samples], device=images.device)
    if targets is None:
        targets = choose_targets(labels, predictions, target_mode)
    return {
        "index": np.asarray(positions, dtype=np.int64),
        "path": [s.path for s in samples],
        "width": np.array([w for w, _ in sizes], dtype=np.int64),
        "height": np.array([h for _, h in sizes], dtype=np.int64),
        "label": labels.cpu().numpy().astype(np.int64),
        "target": targets.cpu().numpy().astype(np.int64),
        "pred": predictions.cpu().numpy().astype(np.int64),
        "prob_clean": probs.gather(1, targets.view(-1, 1))[:, 0].cpu().numpy(),
    }


def target_boxes(sample: Sample, target: int) -> torch.Tensor | None:
    """The boxes of the explained class as a K×4 tensor (xmin, ymin, xmax, ymax), or None."""
    boxes = [(b.xmin, b.ymin, b.xmax, b.ymax) for b in sample.boxes if b.class_index == target]
    return torch.tensor(boxes, dtype=torch.float64) if boxes else None


def _map_columns(
    model, images, saliency, targets, boxes, sizes, options, points=None, road_seeds=None
) -> dict:
    """One map's metric columns: curves, AUCs and pointing (score_saliency), pointing raw and
    smoothed, localization (pipeline.metrics.localization), and ROAD when `road_seeds` are given."""
    columns = {
        k: v.numpy()
        for k, v in score_saliency(
            model, images, saliency, targets, boxes, sizes, points=points, **options
        ).items()
    }
    # only images with boxes: the map is resized to the original size (a 12000×9000 photo
    # without boxes would cost a huge blur for a NaN)
    scored = [i for i, b in enumerate(boxes) if b is not None]
    # TorchRay's smoothing is reported beside the raw argmax for every map (issue 12: a
    # deletion mask's saliency is a plateau whose raw argmax is its first pixel)
    for suffix, smooth in (("raw", 0.0), ("smooth", TORCHRAY_POINTING_SMOOTH)):
        hits = np.full(len(boxes), np.nan, dtype=np.float32)
        if scored:
            chosen = [sizes[i] for i in scored]
            where = (
                points[scored]
                if points is not None
                else pointing_points(saliency[scored], chosen, smooth)
            )
            found = pointing_hits(where, [boxes[i] for i in scored], tolerance=options["tolerance"])
            hits[scored] = found.numpy()
        columns[f"pointing_hit_{suffix}"] = hits
    columns.update(localization_columns(saliency, boxes, sizes))
    if road_seeds is not None:
        columns.update(_road_columns(model, images, saliency, targets, road_seeds))
    return columns


def _road_columns(model, images, saliency, targets, seeds) -> dict[str, np.ndarray]:
    """ROAD's curves (B×F), their areas (mean over the fractions) and the gap LeRF − MoRF."""
    curves = road_curves(model, images, saliency, targets, seeds)
    morf, lerf = curves["morf"].numpy(), curves["lerf"].numpy()
    return {
        "road_morf_curve": morf,
        "road_lerf_curve": lerf,
        "road_morf_area": morf.mean(1),
        "road_lerf_area": lerf.mean(1),
        "road_gap": lerf.mean(1) - morf.mean(1),
    }


def evaluate_batch(
    model: NormalizedClassifier,
    images: torch.Tensor,
    saliency: torch.Tensor,
    targets: torch.Tensor,
    samples: list[Sample],
    sizes: list[tuple[int, int]],
    evaluation: EvalOptions,
    baseline_size: tuple[int, int] | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Metric columns for one batch: the saliency's, then each comparison row's (prefixed).

    saliency B×h×w (higher = more important); sizes (width, height) of the original images.
    The random baseline is noise at `baseline_size` (the mask's granularity; default the
    saliency's); the centre baseline points at the image centre in the pointing game.
    Every map's pointing uses evaluation.smooth (or the comparison's own points, as the
    centre's); `on_chunk` runs between scoring chunks.
    """
    boxes = [target_boxes(s, int(t)) for s, t in zip(samples, targets.tolist(), strict=True)]
    keys = [s.path for s in samples]
    options = {
        "protocol": evaluation.protocol(),
        "tolerance": evaluation.tolerance,
        "eval_batch_size": evaluation.eval_batch_size or eval_batch_size_for(images.device),
        "smooth": evaluation.smooth or 0.0,
        "on_chunk": on_chunk,
    }
    model = model.eval()
    scorer = scoring_model(model, images[:2])  # batch norm folded: the same logits, sooner
    precision = resolve_eval_precision(
        evaluation.precision, images.device, getattr(model, "name", "")
    )
    if precision == "bf16":
        scorer = Bf16Forward(scorer)
    with channels_last_on_cpu(scorer, images.device):
        road = image_seeds(evaluation.seed, keys) if evaluation.road else None
        columns = _map_columns(
            scorer, images, saliency, targets, boxes, sizes, options, road_seeds=road
        )
        coverage = box_coverage(boxes, sizes).numpy()
        columns["box_coverage"] = coverage
        columns["small_object"] = np.where(
            np.isnan(coverage), np.nan, coverage < SMALL_OBJECT_COVERAGE
        )
        grid = baseline_size or tuple(saliency.shape[-2:])
        # comparison maps come from the model itself (Grad-CAM reads a layer folding changes)
        request = MapRequest(model, images, targets, keys, grid, evaluation.seed)
        cache = _cache(evaluation, model, images, grid, options)
        batch = _Batch(request, scorer, boxes, sizes, options, road)
        for name in evaluation.baselines:
            scores = _cached_scores(name, batch, cache) if cache else _scores(name, batch)
            columns.update({f"{name}_{k}": v for k, v in scores.items()})
    return columns


@dataclass(frozen=True)
class _Batch:
    """What scoring a comparison for (some images of) a batch needs."""

    request: MapRequest
    scorer: torch.nn.Module
    boxes: list
    sizes: list
    options: dict
    road: list[int] | None

    def subset(self, rows: list[int]) -> _Batch:
        request = dataclasses.replace(
            self.request,
            images=self.request.images[rows],
            targets=self.request.targets[rows],
            keys=[self.request.keys[i] for i in rows],
        )
        return _Batch(
            request,
            self.scorer,
            [self.boxes[i] for i in rows],
            [self.sizes[i] for i in rows],
            self.options,
            None if self.road is None else [self.road[i] for i in rows],
        )


def _scores(name: str, batch: _Batch) -> dict[str, np.ndarray]:
    """A comparison's maps for the batch and their metric columns."""
    request = batch.request
    maps = comparison_maps(name, request)
    pointing = get_comparison(name).points
    points = pointing(batch.sizes) if pointing is not None else None
    return _map_columns(
        batch.scorer,
        request.images,
        maps,
        request.targets,
        batch.boxes,
        batch.sizes,
        batch.options,
        points,
        road_seeds=batch.road,
    )


def _cache(evaluation, model, images, grid, options) -> ComparisonCache | None:
    """The comparison cache for this model, protocol and device (None without a folder)."""
    if evaluation.comparison_cache is None:
        return None
    protocol = {k: v for k, v in evaluation.settings().items() if k != "baselines"}
    context = {
        "model": model_digest(model),
        "protocol": protocol,
        "eval_batch_size": options["eval_batch_size"],
        "grid": list(grid),
        "device": images.device.type,
    }
    return ComparisonCache(evaluation.comparison_cache, context)


def _cached_scores(name: str, batch: _Batch, cache: ComparisonCache) -> dict[str, np.ndarray]:
    """_scores, with each image's columns read from the cache where an entry exists and
    written to it where not."""
    request = batch.request
    comparison = get_comparison(name)
    code = function_digest(comparison.maps, comparison.points)
    keys = [
        cache.key(name, code, path, request.images[i], batch.sizes[i], int(request.targets[i]), box)
        for i, (path, box) in enumerate(zip(request.keys, batch.boxes, strict=True))
    ]
    found = [cache.get(key) for key in keys]
    missing = [i for i, entry in enumerate(found) if entry is None]
    if missing:
        computed = _scores(name, batch.subset(missing))
        for j, i in enumerate(missing):
            found[i] = {column: np.asarray(values[j]) for column, values in computed.items()}
            cache.put(keys[i], found[i])
    return {column: np.stack([entry[column] for entry in found]) for column in found[0]}
