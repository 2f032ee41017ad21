"""`mpbatch sanity`: the model-randomisation sanity check and repeatability, for any method.

Model randomisation (Adebayo et al., NeurIPS 2018): the images are explained with the trained
model (OUT/original), then once per stage of a cascade that re-initialises the network from
its top (OUT/stages/NN-NAME; pipeline.models.randomisation says what a stage is). Each stage's maps
are compared with the original's by Spearman's rank correlation, SSIM and the correlation of
HOG features (pipeline.metrics.similarity). A method whose maps stay alike after the weights that
made the prediction are gone fails the check.

Repeatability (`--repeat K`): the images are explained K times, with the method's seeds
seed, seed + 1, ..., seed + K − 1 (OUT/repeats/seed-S), and scored. Per image: the mean
Pearson r over the K(K−1)/2 pairs of maps, and the spread (standard deviation over the
seeds) of every curve area. A method without a seed (Grad-CAM) is run K times alike.

Every explanation is an ordinary `mpbatch run` into its own folder, so a killed check resumes
where it stopped (rerun the same command) and each stage's maps stay on disk. The tables are
made at the end from the stored maps: OUT/sanity.csv (per image and stage),
OUT/sanity_summary.csv (per stage: means with 95% bootstrap intervals), OUT/sanity.png, and
with --repeat OUT/repeatability.csv and OUT/repeatability_summary.csv.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SettingsError
from ..methods import get_method
from ..metrics.similarity import mean_pairwise_pearson, similarities
from ..models.randomisation import (
    DEFAULT_RANDOMISATION_SEED,
    GRANULARITIES,
    Stage,
    check_modules,
    network_of,
    randomisation_stages,
    stages_upto,
)
from ..models.registry import load_model
from ..reports.schema import MAP_METRICS, REPEATABILITY, SANITY_MEASURES
from ..reports.tables import bootstrap_ci
from ..reports.writer import write_repeatability, write_sanity
from ..store.lock import prepare_out
from ..store.reader import RunFile
from .configuration import RunOptions
from .run import run as explain_run

log = logging.getLogger(__name__)

ORIGINAL_DIR = "original"
STAGES_DIR = "stages"
REPEATS_DIR = "repeats"
# the curve areas whose spread over seeds repeatability reports, where the runs scored them
MEASURES = tuple(column.name for column in SANITY_MEASURES)
SPREAD_METRICS = tuple(
    c.name for c in MAP_METRICS if c.name.endswith(("_auc", "_area")) or c.name == "road_gap"
)


@dataclass
class SanityOptions:
    """`mpbatch sanity`: `run` is the template of every explanation (data, model, method,
    settings, limit...); its evaluation scores the repeats only."""

    run: RunOptions
    granularity: str = "blocks"  # pipeline.models.randomisation.GRANULARITIES
    randomisation_seed: int = DEFAULT_RANDOMISATION_SEED
    stages: bool = True  # the model-randomisation check (False: repeatability alone)
    repeat: int = 0  # K >= 2: explain K times with seeds seed .. seed + K - 1
    layers: tuple[str, ...] | None = None  # only these stages (by name), top first

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SettingsError(
                f"--granularity {self.granularity}: choose from {', '.join(GRANULARITIES)}"
            )
        if self.repeat == 1 or self.repeat < 0:
            raise SettingsError(f"--repeat {self.repeat}: give 2 or more repeats (or 0)")
        if not self.stages and not self.repeat:
            raise SettingsError("nothing to do: --no-stages without --repeat K")


@dataclass
class SanityResult:
    out: Path
    files: list[Path]
    seconds: float
    stage_seconds: float  # explaining the original and every stage
    repeat_seconds: float  # explaining and scoring the repeats


def sanity(options: SanityOptions) -> SanityResult:
    """Run (or resume) every explanation the check needs, then write its tables and plot."""
    started = time.perf_counter()
    # one process does the whole check: a launcher's RANK/WORLD_SIZE or SLURM array variables
    # must not split each stage into shard files
    options = dataclasses.replace(options, run=dataclasses.replace(options.run, shard="0/1"))
    out = prepare_out(options.run.out)
    for folder in (STAGES_DIR, REPEATS_DIR):
        (out / folder).mkdir(exist_ok=True)
    files: list[Path] = []
    stage_seconds = repeat_seconds = 0.0
    if options.stages:
        stages = _chosen_stages(options)
        tick = time.perf_counter()
        original = _explain(options, out / ORIGINAL_DIR, (), "the trained model")
        runs = []
        for number, stage in enumerate(stages, start=1):
            modules = stages_upto(stages, number)
            where = out / STAGES_DIR / stage_folder(number, stage)
            runs.append((number, stage, _explain(options, where, modules, stage.name)))
        stage_seconds = time.perf_counter() - tick
        table = sanity_table(RunFile.open(original), [(n, s, RunFile.open(p)) for n, s, p in runs])
        files += write_sanity(out, table, sanity_summary(table), _title(options))
    if options.repeat:
        tick = time.perf_counter()
        folders = [_repeat(options, out, k) for k in range(options.repeat)]
        repeat_seconds = time.perf_counter() - tick
        per_image, summary = repeatability_tables([RunFile.open(f) for f in folders])
        files += write_repeatability(out, per_image, summary)
    seconds = time.perf_counter() - started
    return SanityResult(out, files, seconds, stage_seconds, repeat_seconds)


def stage_folder(number: int, stage: Stage) -> str:
    """A stage's folder name: its number and its module path (OUT/stages/03-blocks.6)."""
    return f"{number:02d}-{stage.name}"


def _chosen_stages(options: SanityOptions) -> list[Stage]:
    """The cascade's stages for the template's model (the model is loaded once, on the CPU,
    to read its structure); with `layers`, only the stages so named, each still cumulative."""
    network = network_of(load_model(options.run.model, options.run.weights))
    stages = randomisation_stages(network, options.granularity)
    if not options.layers:
        return stages
    names = [s.name for s in stages]
    unknown = [name for name in options.layers if name not in names]
    if unknown:
        if unknown[0] not in dict(network.named_modules()):
            check_modules(network, unknown)  # "... is not a module of the model"
        raise SettingsError(
            f"--layers: {unknown[0]!r} is not a {options.granularity} stage of "
            f"{options.run.model}; its stages are {', '.join(names)}"
        )
    # a later stage keeps every stage above it randomised: cut the cascade at the last asked
    last = max(names.index(name) for name in options.layers)
    return stages[: last + 1]


def _explain(options: SanityOptions, where: Path, modules: tuple[str, ...], what: str) -> Path:
    """One explanation of the images into `where` (resumed if it was begun): the template
    with the given modules re-initialised, without scoring."""
    log.info("sanity: explaining with %s into %s", what, where)
    template = dataclasses.replace(
        options.run,
        out=where,
        randomised=modules,
        randomisation_seed=options.randomisation_seed,
        evaluation=None,
    )
    explain_run(template)
    return where


def _repeat(options: SanityOptions, out: Path, k: int) -> Path:
    """Repeat k: the method's seed + k (its settings unchanged if it has no seed), scored."""
    method = get_method(options.run.method)
    settings = options.run.mask_settings()
    overrides = dict(options.run.overrides)
    seed = method.seed(settings)
    if seed is not None:
        overrides["seed"] = int(seed) + k
    name = f"seed-{int(seed) + k}" if seed is not None else f"repeat-{k + 1}"
    where = out / REPEATS_DIR / name
    log.info("sanity: repeat %d of %d (%s) into %s", k + 1, options.repeat, method.name, where)
    evaluation = options.run.evaluation
    if evaluation is not None:  # the method's own maps: the comparisons do not vary by seed
        evaluation = dataclasses.replace(evaluation, baselines=())
    explain_run(
        dataclasses.replace(options.run, out=where, overrides=overrides, evaluation=evaluation)
    )
    return where


def _aligned(original: RunFile, other: RunFile) -> tuple[list[int], list[int]]:
    """Rows of the two runs that hold the same paths, in the original's order."""
    where = {str(p): i for i, p in enumerate(other.columns["path"])}
    mine = [i for i, p in enumerate(original.columns["path"]) if str(p) in where]
    return mine, [where[str(original.columns["path"][i])] for i in mine]


def _size(run: RunFile) -> tuple[int, int]:
    size = int(run.config.get("size", 224))
    return size, size


def sanity_table(original: RunFile, stages: list[tuple[int, Stage, RunFile]]) -> pd.DataFrame:
    """One row per image and stage: path, stage number, layer (the stage's name), modules
    re-initialised so far, and the similarity of the stage's map to the original's
    (spearman, ssim, hog)."""
    frames = []
    reinitialised = 0
    for number, stage, run in stages:
        reinitialised += len(stage.modules)
        mine, theirs = _aligned(original, run)
        if not mine:
            continue
        base = original.maps(mine, _size(original))
        other = run.maps(theirs, _size(run))
        measured = similarities(base, other)
        frames.append(
            pd.DataFrame(
                {
                    "path": original.columns["path"][mine],
                    "stage": number,
                    "layer": stage.name,
                    "modules_randomised": reinitialised,
                    **{m: measured[m] for m in MEASURES},
                }
            )
        )
    columns = ["path", "stage", "layer", "modules_randomised", *MEASURES]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def sanity_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage: images, and each measure's mean with its 95% bootstrap interval over the
    images where it is defined (`<measure>_count`: a constant map, such as a mask that
    deletes nothing, has no correlation with anything)."""
    rows = []
    for (stage, layer), group in table.groupby(["stage", "layer"], sort=True):
        row = {"stage": stage, "layer": layer, "images": len(group)}
        for measure in MEASURES:
            values = group[measure].to_numpy(dtype=np.float64)
            mean, low, high = bootstrap_ci(values)
            row.update({measure: mean, f"{measure}_low": low, f"{measure}_high": high})
            row[f"{measure}_count"] = int(np.isfinite(values).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def repeatability_tables(runs: list[RunFile]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per image (the images every repeat holds): the mean pairwise Pearson r of the maps and,
    for each curve area the runs scored, its mean and standard deviation over the repeats.
    Summary: per quantity, the mean over images (r with its bootstrap interval), the mean and
    largest per-image SD, and the SD over repeats of the dataset mean."""
    first = runs[0]
    common = set(map(str, first.columns["path"]))
    for other in runs[1:]:
        common &= set(map(str, other.columns["path"]))
    paths = [str(p) for p in first.columns["path"] if str(p) in common]
    rows_of = [{str(p): i for i, p in enumerate(r.columns["path"])} for r in runs]
    maps = np.stack(
        [
            r.maps([rows[p] for p in paths], _size(r)).numpy()
            for r, rows in zip(runs, rows_of, strict=True)
        ]
    )
    r = REPEATABILITY.name
    per_image = pd.DataFrame({"path": paths, r: mean_pairwise_pearson(maps)})
    summary = [_summary_row(r, per_image[r].to_numpy(), None)]
    for metric in SPREAD_METRICS:
        if not all(metric in r.columns for r in runs):
            continue
        values = np.stack(
            [
                np.asarray(r.columns[metric], dtype=np.float64)[[rows[p] for p in paths]]
                for r, rows in zip(runs, rows_of, strict=True)
            ]
        )  # K×B
        per_image[f"{metric}_mean"] = values.mean(axis=0)
        per_image[f"{metric}_sd"] = values.std(axis=0, ddof=1)
        summary.append(_summary_row(metric, values.mean(axis=0), values))
    return per_image, pd.DataFrame(summary)


def _summary_row(quantity: str, per_image: np.ndarray, values: np.ndarray | None) -> dict:
    mean, low, high = bootstrap_ci(per_image)
    row = {"quantity": quantity, "repeats": None, "images": int(np.isfinite(per_image).sum())}
    row.update({"mean": mean, "low": low, "high": high})
    if values is not None:  # K×B curve areas
        sd = values.std(axis=0, ddof=1)
        row.update(
            {
                "repeats": values.shape[0],
                "mean_image_sd": float(np.nanmean(sd)),
                "max_image_sd": float(np.nanmax(sd)),
                "sd_of_dataset_mean": float(np.nanmean(values, axis=1).std(ddof=1)),
            }
        )
    return row


def _title(options: SanityOptions) -> str:
    run_options = options.run
    return (
        f"{get_method(run_options.method).label or run_options.method} ({run_options.preset}), "
        f"{run_options.model}: cascading randomisation by {options.granularity}"
    )


def describe(result: SanityResult) -> str:
    """Lines for the end of `mpbatch sanity`: the files written and the time taken."""
    written = ", ".join(str(path) for path in result.files)
    return (
        f"wrote {written} ({result.seconds:.1f} s: stages {result.stage_seconds:.1f} s, "
        f"repeats {result.repeat_seconds:.1f} s)"
    )
