"""`mpbatch evaluate`: score saliency maps that exist already: an mpbatch run (rescored in
place), a foreign HDF5 or .npy file of maps, or a baseline alone.

Slightly over 300 lines: three kinds of source (a run, a foreign file, a comparison) are
read and checked here before the shared batch loop scores them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ..data.datasets import DatasetError, Sample, discover
from ..data.images import ImageFolderDataset
from ..metrics.comparisons import MapRequest, comparison_maps, get_comparison
from ..metrics.maps import resize_maps, same_aspect
from ..metrics.scoring import check_labels, evaluate_batch, image_columns
from ..models.registry import DEFAULT_MODEL, load_model
from ..reports.writer import write_report_csv, write_summary
from ..store.lock import hold, prepare_out
from ..store.reader import MASKS_FILE, REPORT_FILE, SCORES_FILE, RunFile, decode_strings
from ..store.writer import MaskStore, StoreError, replace_columns
from .batching import decoded_batches, halve_on_oom
from .configuration import EvalOptions, pick_device, versions


@dataclass(frozen=True)
class EvaluationRecord:
    """What `mpbatch evaluate` scored with: the `config` of a scores file, or the
    `evaluated` attribute of a run it rescored."""

    data: str
    model: str
    weights: str | None
    size: int
    target: str  # "label", "predicted", or "the run's" (a run's own targets)
    source: str  # the scored file, or "baseline:NAME"
    name: str  # the maps' row label in summaries
    evaluation: dict  # EvalOptions.describe()

    def to_config(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))


@dataclass
class EvaluateOptions:
    """`mpbatch evaluate`: score saliency maps (an mpbatch run, a foreign file, a baseline)."""

    source: Path | None  # run folder / masks.h5, foreign .h5 (path, saliency), .npy, or None
    data: Path | None = None
    out: Path | None = None
    paths_file: Path | None = None  # one relative path per line, for an .npy source
    baseline: str | None = None  # score this baseline as the maps (source None)
    name: str | None = None  # the maps' row label in summaries (default: method / "maps")
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
    saliency: np.ndarray | None  # None for a comparison (made per batch) or an mpbatch run
    targets: np.ndarray | None  # fixed targets (an mpbatch run), else chosen per batch
    config: dict
    run: RunFile | None = None  # an mpbatch run, rescored in place

    @property
    def masks_file(self) -> Path | None:
        return None if self.run is None else self.run.path

    @property
    def grid(self) -> tuple[int, int] | None:
        """The run's mask resolution (the random baseline's grid), None for other maps."""
        return None if self.run is None else tuple(self.run.columns["masks"].shape[-2:])

    def batch(self, rows: list[int], size: int, device) -> torch.Tensor | None:
        """The maps of these rows on `device` at input size; None for a comparison. A run's
        maps are made from its stored columns by its method, batch by batch."""
        if self.run is not None:
            return self.run.maps(rows, (size, size), device)
        if self.saliency is not None:
            return torch.from_numpy(self.saliency[rows]).to(device)
        return None


def read_saliency_source(options: EvaluateOptions) -> SaliencySource:
    """Load what `evaluate` scores; raises DatasetError with the file name when malformed."""
    source = options.source
    if source is None:
        if options.baseline is None:
            raise DatasetError("evaluate needs a saliency file or --baseline NAME")
        get_comparison(options.baseline)  # an unknown name fails before the model loads
        return SaliencySource([], None, None, {})
    source = Path(source)
    source = source / MASKS_FILE if source.is_dir() else source
    if not source.exists():
        raise DatasetError(f"{source}: no such file")
    if source.suffix == ".npy":
        return _read_npy(source, options.paths_file)
    if _is_run(source):
        run = RunFile.open(source)
        paths = [str(p) for p in run.columns["path"]]
        return SaliencySource(paths, None, run.columns["target"], run.config, run)
    with h5py.File(source, "r") as file:
        if "saliency" not in file or "path" not in file:
            raise DatasetError(f"{source}: needs datasets 'path' and 'saliency' (N×h×w)")
        saliency = file["saliency"][:].astype(np.float32)
        paths = list(decode_strings(file["path"][:]))
    if saliency.ndim != 3 or len(paths) != saliency.shape[0]:
        raise DatasetError(f"{source}: 'saliency' must be N×h×w with one row per path")
    _check_maps(source, saliency, paths)
    return SaliencySource(paths, saliency, None, {})


def _is_run(source: Path) -> bool:
    """Whether an HDF5 file is an mpbatch mask file (else a foreign saliency file)."""
    try:
        with h5py.File(source, "r") as file:
            return "masks" in file and "config" in file.attrs
    except OSError as error:
        if "unable to lock file" in str(error).lower():
            with hold(source):  # a live mpbatch run writes it: OutputInUse names the holder
                pass
            raise StoreError(
                f"{source} is open in another process (HDF5's file lock); close it there, "
                "then rerun"
            ) from error
        raise DatasetError(f"{source}: not a readable HDF5 file ({error})") from error


def _check_maps(source: Path, saliency: np.ndarray, paths: list[str]) -> None:
    """Bad input, said before any scoring: a path listed twice (its image would be scored
    twice), a map with NaN or infinite values."""
    first: dict[str, int] = {}
    for row, path in enumerate(paths):
        if path in first:
            raise DatasetError(f"{source}: {path} is listed twice (rows {first[path]} and {row})")
        first[path] = row
    bad = np.flatnonzero(~np.isfinite(saliency.reshape(len(saliency), -1)).all(axis=1))
    if len(bad):
        raise DatasetError(
            f"{source}: the map of {paths[bad[0]]} (row {bad[0]}) has NaN or infinite values"
            + (f", and {len(bad) - 1} more maps" if len(bad) > 1 else "")
        )


def _check_map_shape(source, map_size, samples, sizes, input_size) -> None:
    """Bad input: a foreign map whose shape fits neither its image (the original's aspect
    ratio) nor the model's input; it would be stretched over the image."""
    for sample, (width, height) in zip(samples, sizes, strict=True):
        original = (int(height), int(width))
        if not (same_aspect(map_size, input_size) or same_aspect(map_size, original)):
            raise DatasetError(
                f"{source}: the map of {sample.path} is {map_size[0]}×{map_size[1]}, which fits "
                f"neither the image ({original[0]}×{original[1]}) nor the model input "
                f"({input_size[0]}×{input_size[1]})"
            )


def _read_npy(source: Path, paths_file: Path | None) -> SaliencySource:
    if paths_file is None:
        raise DatasetError(f"{source}: an .npy saliency array needs --paths FILE")
    saliency = np.load(source)
    paths = [line.strip() for line in Path(paths_file).read_text().splitlines()]
    paths = [p for p in paths if p]
    if saliency.ndim != 3 or len(paths) != saliency.shape[0]:
        raise DatasetError(
            f"{source}: expected N×h×w saliency for the {len(paths)} paths of "
            f"{paths_file}, got shape {saliency.shape}"
        )
    _check_maps(source, saliency, paths)
    return SaliencySource(paths, saliency.astype(np.float32), None, {})


def evaluate(options: EvaluateOptions) -> Path:
    """Score saliency maps with the protocol of options.evaluation; returns the scored file.

    An mpbatch run is updated in place (its metric columns replaced, and what scored them
    recorded in its `evaluated` attribute); anything else is written to OUT/scores.h5.
    report.csv and the summary go beside the scored file.
    """
    source = read_saliency_source(options)
    options.evaluation = options.evaluation.for_method(source.config.get("method"))
    data, samples, positions = _images(options, source)
    if source.masks_file is None and options.out is None:
        raise DatasetError("evaluate needs -o OUT for saliency maps not made by mpbatch")
    model, record = _model_and_record(options, source, data, [samples[p] for p in positions])
    scored_file = source.masks_file or prepare_out(options.out) / SCORES_FILE
    with hold(scored_file):  # a live run or evaluation of the same file is refused at once
        dataset = ImageFolderDataset(data, samples, record["size"], indices=positions)
        scored, failures = _score_all(options, source, dataset, positions, model)
        out = _write_scores(options, source, scored, failures, record, model)
        write_report_csv(scored_file, out / REPORT_FILE)
        write_summary(scored_file, out, skipped=len(failures))
    return scored_file


def _images(options: EvaluateOptions, source: SaliencySource):
    """(data folder, its samples, the listing position of each map's image)."""
    data = Path(options.data or source.config.get("data") or "")
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
    return data, samples, [by_path[p] for p in paths]


def _model_and_record(options, source, data: Path, chosen: list[Sample]):
    """The scoring model on its device, and what the scores file records of this scoring."""
    config = source.config
    model_name = options.model or config.get("model") or DEFAULT_MODEL
    weights = options.weights if options.model else config.get("weights", options.weights)
    device = pick_device(options.device)
    model = load_model(model_name, weights).to(device)
    options.evaluation = options.evaluation.resolved(device, model_name)
    if options.target == "label" and source.targets is None:
        check_labels(chosen, len(model.class_names), model_name)
    record = EvaluationRecord(
        data=str(data.resolve()),
        model=model_name,
        weights=weights,
        size=options.size or int(config.get("size", 224)),
        target="the run's" if source.targets is not None else options.target,
        source=str(options.source) if options.source else f"baseline:{options.baseline}",
        name=options.name or config.get("name") or config.get("method") or "maps",
        evaluation=options.evaluation.describe(config.get("method")),
    )
    return model, record.to_config()


def _score_all(options, source, dataset, positions, model):
    """Every row's columns (concatenated, ordered by row) and the undecodable images."""
    device = next(iter(model.buffers())).device
    row_of = {p: row for row, p in enumerate(positions)}
    collected: dict[str, list] = {}
    failures = []
    bar = tqdm(total=len(positions), unit="img", desc="scores", disable=not options.progress)
    for batch in decoded_batches(dataset, options.batch_size, options.workers, device):
        failures += [(p, dataset.samples[p].path, reason) for p, reason in batch.failures]
        bar.update(batch.count)
        if not batch.positions:
            continue
        rows = [row_of[p] for p in batch.positions]

        def work(lo: int, hi: int, rows=rows, batch=batch) -> dict:
            return _score_batch(options, source, model, dataset.samples, batch, rows[lo:hi], lo)

        columns = halve_on_oom(work, len(rows))
        for key, value in columns.items():
            collected.setdefault(key, []).append(value)
    bar.close()
    merged = {
        k: np.concatenate(
            [np.asarray(v, dtype=object) if isinstance(v, list) else v for v in values]
        )
        for k, values in collected.items()
    }
    order = np.argsort(merged.pop("row", np.zeros(0, dtype=np.int64)), kind="stable")
    return {k: v[order] for k, v in merged.items()}, failures


def _score_batch(options, source, model, all_samples, batch, rows: list[int], lo: int) -> dict:
    """The columns of the decoded batch's images lo.. (one per row of `rows`): the image's
    columns and the metrics of its map and of each comparison."""
    hi = lo + len(rows)
    images, sizes, where = batch.images[lo:hi], batch.sizes[lo:hi], batch.positions[lo:hi]
    samples = [all_samples[p] for p in where]
    fixed = None
    if source.targets is not None:
        fixed = torch.from_numpy(source.targets[rows]).to(images.device)
    columns = image_columns(model, images, samples, where, sizes, options.target, fixed)
    targets = torch.from_numpy(columns["target"]).to(images.device)
    size = tuple(images.shape[-2:])
    saliency = source.batch(rows, size[0], images.device)
    if source.saliency is not None:
        map_size = tuple(saliency.shape[-2:])
        _check_map_shape(options.source, map_size, samples, sizes, size)
        if not same_aspect(map_size, size):  # at the image's aspect: squashed as the image is
            saliency = resize_maps(saliency.float(), size)
    if saliency is None:  # a comparison scored as the maps (--baseline)
        keys = [s.path for s in samples]
        request = MapRequest(model, images, targets, keys, size, options.evaluation.seed)
        saliency = comparison_maps(options.baseline, request)
    columns.update(
        evaluate_batch(
            model,
            images,
            saliency,
            targets,
            samples,
            sizes,
            options.evaluation,
            baseline_size=source.grid,
        )
    )
    columns["row"] = np.array(rows, dtype=np.int64)
    return columns


def _rescored_config(options: EvaluateOptions, config: dict, record: dict) -> dict:
    """The run's recorded scoring, now that its rows hold these scores: a resume of the run
    with the same scoring options scores its new images like the rest, and any other resume
    is refused (RunRecord's `scoring` must match). Scores of another model or input size
    than the run's cannot be continued by the run: they are recorded with that model."""
    scoring = options.evaluation.settings()
    ours = (config.get("model"), config.get("weights"), config.get("size"))
    if (record["model"], record["weights"], record["size"]) != ours:
        scoring["scored_by"] = {k: record[k] for k in ("model", "weights", "size")}
    return {"scoring": scoring, "evaluation": record["evaluation"]}


def _write_scores(options, source, scored, failures, record, model) -> Path:
    """Store the scores: in place for a run (metric columns only), else OUT/scores.h5."""
    class_names = list(model.class_names)
    if source.masks_file is not None:
        rows, count = len(scored.get("index", [])), len(source.paths)
        if rows != count:
            raise DatasetError(
                f"{source.masks_file}: {count - rows} masked images could not be decoded "
                "again; their metrics cannot be recomputed"
            )
        # the run's own columns stay (its model's prediction and probabilities included)
        kept = ("index", "path", "width", "height", "label", "target", "pred", "prob_clean")
        metrics = {k: v for k, v in scored.items() if k not in kept}
        replace_columns(
            source.masks_file,
            metrics,
            config=_rescored_config(options, source.config, record),
            protocol=record["evaluation"],
            evaluated=record,
            class_names=class_names,
        )
        return source.masks_file.parent
    out = Path(options.out)
    store = MaskStore.open(out / SCORES_FILE, record, versions(), overwrite=True)
    try:
        strings = {k: [str(x) for x in v] for k, v in scored.items() if v.dtype == object}
        store.append({**scored, **strings}, failures)
        store.set_attrs(protocol=record["evaluation"], class_names=class_names)
        store.finish()
    finally:
        store.close()
    return out
