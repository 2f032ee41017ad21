"""`mpbatch evaluate`: score saliency maps that exist already: an mpbatch run (rescored in
place), a foreign HDF5 or .npy file of maps, or a baseline alone."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from .batching import loader
from .comparisons import MapRequest, comparison_maps, get_comparison
from .configuration import EvalOptions, pick_device, versions
from .datasets import DatasetError, ImageFolderDataset, discover
from .methods import DEFAULT_METHOD, get_method, settings_from_config
from .models import load_model
from .outdir import hold, prepare_out
from .outputs import write_report_csv, write_summary
from .runfile import MASKS_FILE, REPORT_FILE, SCORES_FILE, read_columns
from .scoring import check_labels, evaluate_batch, image_columns
from .store import MaskStore, StoreError, replace_columns


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
    saliency: np.ndarray | None  # None for a baseline (made per batch) or an mpbatch run
    targets: np.ndarray | None  # fixed targets (an mpbatch run), else chosen per batch
    masks_file: Path | None  # an mpbatch run's file, updated in place
    config: dict
    masks: dict | None = None  # an mpbatch run's method columns ("masks", "params", ...)

    def batch(self, rows: list[int], size: int, device) -> torch.Tensor | None:
        """The maps of these rows on `device` at input size; None for a baseline. A run's
        maps are made from its stored columns by its method, batch by batch."""
        if self.masks is not None:
            method = get_method(self.config.get("method") or DEFAULT_METHOD)
            columns = {k: torch.from_numpy(v[rows]).to(device) for k, v in self.masks.items()}
            settings = settings_from_config(self.config)
            return method.saliency(columns, settings, (size, size), self.config.get("area"))
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
        return SaliencySource([], None, None, None, {})
    source = Path(source)
    source = source / MASKS_FILE if source.is_dir() else source
    if not source.exists():
        raise DatasetError(f"{source}: no such file")
    if source.suffix == ".npy":
        return _read_npy(source, options.paths_file)
    try:
        with h5py.File(source, "r") as file:
            is_run = "masks" in file and "config" in file.attrs
    except OSError as error:
        if "unable to lock file" in str(error).lower():
            with hold(source):  # a live mpbatch run writes it: OutputInUse names the holder
                pass
            raise StoreError(
                f"{source} is open in another process (HDF5's file lock); close it there, "
                "then rerun"
            ) from error
        raise DatasetError(f"{source}: not a readable HDF5 file ({error})") from error
    if is_run:
        columns, attrs = read_columns(source)
        config = attrs["config"]
        # the columns a method's saliency reads: the masks and, for extremal, their params
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
    _check_finite(source, saliency, paths)
    return SaliencySource(paths, saliency, None, None, {})


def _check_finite(source: Path, saliency: np.ndarray, paths: list[str]) -> None:
    """Bad input, said before any scoring: a map with NaN or infinite values."""
    bad = np.flatnonzero(~np.isfinite(saliency.reshape(len(saliency), -1)).all(axis=1))
    if len(bad):
        raise DatasetError(
            f"{source}: the map of {paths[bad[0]]} (row {bad[0]}) has NaN or infinite values"
            + (f", and {len(bad) - 1} more maps" if len(bad) > 1 else "")
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
    _check_finite(source, saliency, paths)
    return SaliencySource(paths, saliency.astype(np.float32), None, None, {})


def evaluate(options: EvaluateOptions) -> Path:
    """Score saliency maps with the protocol of options.evaluation; returns the scored file.

    An mpbatch run is updated in place (its metric columns replaced, and what scored them
    recorded in its `evaluated` attribute); anything else is written to OUT/scores.h5.
    report.csv and the summary go beside the scored file.
    """
    source = read_saliency_source(options)
    config = source.config
    options.evaluation = options.evaluation.for_method(config.get("method"))
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
    record = EvaluationRecord(
        data=str(data.resolve()),
        model=model_name,
        weights=weights,
        size=size,
        target="the run's" if source.targets is not None else options.target,
        source=str(options.source) if options.source else f"baseline:{options.baseline}",
        name=options.name or config.get("name") or config.get("method") or "maps",
        evaluation=options.evaluation.describe(config.get("method")),
    ).to_config()
    if source.masks_file is None and options.out is None:
        raise DatasetError("evaluate needs -o OUT for saliency maps not made by mpbatch")
    scored_file = source.masks_file or prepare_out(options.out) / SCORES_FILE
    with hold(scored_file):  # a live run or evaluation of the same file is refused at once
        scored, failures = _score_all(options, source, samples, positions, model, size, device)
        out = _write_scores(options, source, scored, failures, record, model)
        write_report_csv(scored_file, out / REPORT_FILE)
        write_summary(scored_file, out, skipped=len(failures))
    return scored_file


def _score_all(options, source, samples, positions, model, size, device):
    """Every row's columns (concatenated, ordered by row) and the undecodable images."""
    dataset = ImageFolderDataset(
        Path(options.data or source.config["data"]), samples, size, indices=positions
    )
    row_of = {p: row for row, p in enumerate(positions)}
    grid = None if source.masks is None else tuple(source.masks["masks"].shape[-2:])
    collected: dict[str, list] = {}
    failures = []
    bar = tqdm(total=len(positions), unit="img", desc="scores", disable=not options.progress)
    for batch in loader(dataset, options.batch_size, options.workers, device):
        batch_positions = batch["index"].tolist()
        ok = batch["ok"].tolist()
        failures += [
            (p, samples[p].path, batch["error"][i])
            for i, p in enumerate(batch_positions)
            if not ok[i]
        ]
        bar.update(len(batch_positions))
        good = [i for i in range(len(batch_positions)) if ok[i]]
        if not good:
            continue
        rows = [row_of[batch_positions[i]] for i in good]
        images = batch["image"][good].to(device)
        sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in good]
        chosen = [samples[positions[r]] for r in rows]
        fixed = (
            None if source.targets is None else torch.from_numpy(source.targets[rows]).to(device)
        )
        columns = image_columns(
            model, images, chosen, [positions[r] for r in rows], sizes, options.target, fixed
        )
        targets = torch.from_numpy(columns["target"]).to(device)
        saliency = source.batch(rows, size, device)
        if saliency is None:
            keys = [s.path for s in chosen]
            request = MapRequest(
                model, images, targets, keys, (size, size), options.evaluation.seed
            )
            saliency = comparison_maps(options.baseline, request)
        columns.update(
            evaluate_batch(
                model,
                images,
                saliency,
                targets,
                chosen,
                sizes,
                options.evaluation,
                baseline_size=grid,
            )
        )
        columns["row"] = np.array(rows, dtype=np.int64)
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
