"""`mpbatch run`: discover → load → classify → explain → score → store → report.

The only module that ties a run's file I/O to the algorithms, which take and return tensors.
Which method runs is the registry's business (pipeline.methods); this module names none.

Longer than 300 lines: one command's orchestration (start, resume by path, the batch loop's
body, the record of what ran), each step a short function.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.datasets import DatasetError, Sample, discover
from ..data.images import ImageFolderDataset
from ..data.listing import Listing, compare, shard_positions
from ..errors import MpbatchError, SettingsError
from ..methods import Method, get_method
from ..metrics.scoring import check_labels, evaluate_batch, image_columns
from ..models.randomisation import network_of, randomise
from ..models.registry import NormalizedClassifier, load_model
from ..models.speed import SpeedOptions
from ..reports.writer import write_run_reports, write_summary
from ..store.lock import hold, prepare_out
from ..store.writer import MaskStore
from .batching import (
    DecodedBatch,
    auto_batch_size,
    batch_probe,
    decoded_batches,
    explain_padded,
    halve_on_oom,
    padded_size,
)
from .configuration import (
    RunOptions,
    RunRecord,
    applied_speed,
    pick_device,
    upgrade_stored,
    versions,
)
from .shards import Shard, all_shards_complete, merge_once, output_names, resolve_shard
from .stopping import Interrupted, StopRequested, StopSignals

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    processed: int  # images written by this invocation
    failed: int  # images that failed in this invocation
    total_rows: int  # rows in the mask file now
    seconds: float
    masks_file: Path | None = None
    timings: dict = field(default_factory=dict)  # seconds loading, optimising, evaluating, ...


@dataclass
class _Job:
    """What every batch of a run needs."""

    options: RunOptions
    method: Method
    settings: Any
    model: NormalizedClassifier
    speed: SpeedOptions
    samples: list[Sample]
    listing: Listing
    store: MaskStore
    timings: dict[str, float]
    stop: StopSignals


def run(options: RunOptions) -> RunResult:
    """Explain every image of options.data (this process's shard of it) into options.out.

    Resumes what an earlier run with the same settings left, by path: images added to the
    folder since are explained, rows of removed or replaced images are moved out (see
    MaskStore.reconcile). SIGTERM/SIGUSR1 stop within an iteration: the unfinished batch is
    dropped, what is done is flushed, and Interrupted is raised (the CLI exits 75).
    """
    started = time.perf_counter()
    shard = resolve_shard(options.shard, os.environ)
    if Path(options.out).resolve() == Path(options.data).resolve():
        raise SettingsError(f"{options.out}: the output folder must not be DATA itself")
    samples, layout = discover(
        options.data,
        labels_csv=options.labels_csv,
        synset_mapping=options.synset_mapping,
        boxes_dir=options.boxes_dir,
        exclude=options.out,  # OUT inside DATA: its figures are no images to explain
    )
    samples = samples[: options.limit] if options.limit is not None else samples
    out = prepare_out(options.out)
    masks_name = output_names(shard)[0]
    with StopSignals() as stop:
        with hold(out / masks_name):  # before the model loads: a second process is refused
            job, part = _start(options, samples, layout, shard, out / masks_name, stop)
            outcome = _explain_into(job, part, shard, started)
            stopped_at = stop.received
            # a stop signal while the reports are written skips the rest; the rerun writes them
            _write_reports(options, shard, out, outcome, stop)
        if stop.received is None and shard.world > 1 and all_shards_complete(out, shard.world):
            merge_once(out)  # the last shard to finish, its own file's lock let go
    if stop.received is not None:
        done = f"after {len(part) - outcome.left} of {len(part)} images of {out / masks_name}"
        if stopped_at is None:
            done = (
                f"while writing the reports of {out / masks_name} (its {len(part)} images are done)"
            )
        raise Interrupted(f"stopped by {stop.received} {done}; rerun the same command to resume")
    seconds = time.perf_counter() - started
    return RunResult(
        out,
        outcome.processed,
        outcome.failed,
        outcome.rows,
        seconds,
        out / masks_name,
        job.timings,
    )


def _write_reports(options: RunOptions, shard: Shard, out: Path, outcome, stop) -> None:
    """report.csv and failures.csv, then the summary of a whole run, unless a stop signal
    came first."""
    masks_name, report_name, failures_name = output_names(shard)
    write_run_reports(out / masks_name, out, report_name, failures_name)
    if stop.received is None and shard.world == 1 and options.evaluation is not None:
        write_summary(out / masks_name, out, skipped=outcome.failures)


def _start(options, samples, layout, shard, masks_file, stop) -> tuple[_Job, list[int]]:
    """Stamp the listing, load the model, choose the batch size and open the mask file:
    the job, and the positions of this shard's images in the listing."""
    method = get_method(options.method)
    listing = Listing.of(options.data, [s.path for s in samples])
    part = shard_positions(listing.paths, shard.rank, shard.world)
    device = pick_device(options.device, shard.local_rank)
    if options.evaluation is not None:  # "auto" scoring precision, for this device and model
        options = dataclasses.replace(
            options, evaluation=options.evaluation.resolved(device, options.model)
        )
    model = load_model(options.model, options.weights)
    if options.randomised:  # before .to(device): the same weights on every device
        randomise(network_of(model), options.randomised, options.randomisation_seed)
    model = model.to(device)
    settings = method.resolve_settings(options.mask_settings(), model)
    areas = method.areas(settings)  # a method with several masks per image
    if options.area is not None and (areas is None or not 0 <= options.area < len(areas)):
        count = "one mask" if areas is None else f"{len(areas)} areas"
        raise SettingsError(f"--area {options.area}: --method {options.method} makes {count}")
    if options.target == "label":
        check_labels(samples, len(model.class_names), options.model)
    speed = applied_speed(options, device)
    if options.batch_size == "auto":
        probe = batch_probe(model, method, settings, options.size, speed, device)
        chosen = auto_batch_size(probe, options.size, device)
        options = dataclasses.replace(options, batch_size=chosen)
        log.info("--batch-size auto chose %d", chosen)
    record = _record(options, settings, layout, speed, device, shard, model)
    store = MaskStore.open(
        masks_file,
        record.to_config(),
        versions(),
        compare_keys=_resume_keys(options),
        overwrite=options.overwrite,
        fill_stored=lambda stored: upgrade_stored(stored, device),
    )
    if store.repaired:
        log.warning("%s", store.repaired)
    job = _Job(options, method, settings, model, speed, samples, listing, store, {}, stop)
    return job, part


def _resume_keys(options: RunOptions) -> list[str]:
    """What a resume must match. Without metrics the scoring is not compared: the new rows
    are not scored (their scores read as NaN until `mpbatch evaluate` scores the file)."""
    keys = RunRecord.resume_keys()
    return [k for k in keys if k != "scoring"] if options.evaluation is None else keys


def _record(options, settings, layout, speed, device, shard, model) -> RunRecord:
    """What the mask file records of this run (RunRecord marks what must match to resume)."""
    evaluation = options.evaluation
    return RunRecord(
        data=str(Path(options.data).resolve()),
        model=options.model,
        weights=options.weights,
        method=options.method,
        mask=settings.to_dict(),
        area=options.area,
        size=options.size,
        target=options.target,
        limit=options.limit,
        layout=layout,
        scoring=None if evaluation is None else evaluation.settings(),
        speed={**speed.to_dict(), "device": device.type},  # CPU and CUDA noise differ
        shard={"rank": shard.rank, "world": shard.world},
        randomised=(
            {"modules": list(options.randomised), "seed": options.randomisation_seed}
            if options.randomised
            else None
        ),
        preset=options.preset,
        name=options.name or options.method,
        evaluation=None if evaluation is None else evaluation.describe(options.method),
        normalization={"mean": model.mean.tolist(), "std": model.std.tolist()},
        batch_size=options.batch_size,
        workers=options.workers,
        device=options.device,
    )


@dataclass(frozen=True)
class _Outcome:
    processed: int  # images written by this invocation
    failed: int  # images that failed in this invocation
    left: int  # images of the shard not done (a stop signal came)
    rows: int  # rows in the file now
    failures: int  # failures in the file now


def _explain_into(job: _Job, part: list[int], shard: Shard, started: float) -> _Outcome:
    """Resume the store by path, explain what is left of `part`, and close the store
    (complete when nothing is left). An unexpected error is re-raised with a note
    (`mpbatch_saved`) of what is saved, for the CLI to print after its traceback."""
    store, timings = job.store, job.timings
    timings.update({"load": 0.0, "optimize": 0.0, "evaluate": 0.0, "write": 0.0})
    try:
        todo = _resume_by_path(store, job.listing, part, job.options.data)
        processed, failed = _run_batches(job, part, todo, shard.tag if shard.world > 1 else "")
        timings["total"] = seconds = time.perf_counter() - started
        timings["images_per_s"] = processed / seconds if seconds > 0 else 0.0
        evaluation = job.options.evaluation
        store.set_attrs(
            class_names=list(job.model.class_names),
            timings=timings,
            timings_total=_add_timings(store.get_attr("timings_total", {}), timings, processed),
            protocol=None if evaluation is None else evaluation.describe(job.options.method),
        )
        left = 0 if job.stop.received is None else len(todo) - processed - failed
        outcome = _Outcome(processed, failed, left, store.rows, store.n_failures)
        if job.stop.received is None:
            store.sort_by_index()
            store.finish()
    except Exception as error:
        if not isinstance(error, MpbatchError) and not store.closed:
            error.mpbatch_saved = (  # type: ignore[attr-defined]
                f"{store.rows} images and {store.n_failures} failures are saved in "
                f"{store.path}; rerun the same command to resume"
            )
        raise
    finally:
        store.close()
    return outcome


def _resume_by_path(store: MaskStore, listing: Listing, part: list[int], data) -> list[int]:
    """The positions of `part` still to explain, after matching the stored rows to today's
    listing (MaskStore.reconcile); says in one line how the listing changed, if it did."""
    today = {listing.paths[i]: (i, int(listing.sizes[i]), int(listing.mtimes[i])) for i in part}
    earlier = store.listing()
    reconciled = store.reconcile(today)
    store.set_listing(listing)
    todo = [i for i in part if listing.paths[i] not in reconciled.done]
    change = compare(earlier, listing) if earlier is not None else None
    if change or reconciled.gone or reconciled.replaced:
        moved = reconciled.gone + reconciled.replaced
        where = f" moved to {reconciled.dropped_file}" if reconciled.dropped_file else ""
        log.warning(
            f"{data} changed since {store.path} was last written"
            + (f" ({change.describe()})" if change else "")
            + f": {moved} rows of removed or replaced images{where}; "
            f"{len(todo)} images to explain"
        )
    if todo:
        store.mark_incomplete()
    return todo


def _add_timings(previous: dict, timings: dict, processed: int) -> dict:
    """Seconds summed over every invocation of a run (a resumed run's last invocation alone
    says little), with the images they made: seconds per image = total / images."""
    keys = ("load", "optimize", "evaluate", "write", "total")
    summed = {k: float(previous.get(k, 0.0)) + float(timings.get(k, 0.0)) for k in keys}
    summed["images"] = int(previous.get("images", 0)) + processed
    return summed


def _run_batches(job: _Job, part: list[int], todo: list[int], tag: str) -> tuple[int, int]:
    """Explain, score and store the images at positions `todo`; returns (written, failed).
    Stops early, dropping the unfinished batch, when a stop signal arrives."""
    if not todo:
        log.warning("%s: all %d images already done", job.store.path, len(part))
        return 0, 0
    options = job.options
    device = next(iter(job.model.buffers())).device
    dataset = ImageFolderDataset(options.data, job.samples, options.size, indices=todo)
    bar = tqdm(
        total=len(part),
        initial=len(part) - len(todo),
        unit="img",
        desc=f"masks {tag}".strip(),
        disable=not options.progress,
        dynamic_ncols=True,
    )
    processed = failed = 0
    tick = time.perf_counter()
    try:
        for batch in decoded_batches(dataset, options.batch_size, options.workers, device):
            job.timings["load"] += time.perf_counter() - tick
            job.stop.check()
            batch_started = time.perf_counter()
            written, failures = _process_batch(job, batch)
            log.debug(
                "%d images explained, scored and written in %.2f s",
                written,
                time.perf_counter() - batch_started,
            )
            processed, failed = processed + written, failed + len(failures)
            for failure in failures:
                log.warning("skipped %s: %s", failure[1], failure[2])
            bar.update(batch.count)
            job.stop.check()
            tick = time.perf_counter()
    except StopRequested:
        pass  # the unfinished batch is dropped; stop.received says why
    finally:
        bar.close()
    return processed, failed


def _process_batch(job: _Job, batch: DecodedBatch) -> tuple[int, list[tuple]]:
    """Explain and score a batch's decoded images and append them, with its failures (and
    each file's stamp), to the store; returns (images written, failures)."""
    listing = job.listing
    failures = [
        (p, listing.paths[p], reason, int(listing.sizes[p]), int(listing.mtimes[p]))
        for p, reason in batch.failures
    ]
    if failures and job.options.on_error == "fail":
        raise DatasetError(f"{failures[0][1]}: {failures[0][2]} (--on-error fail)")
    where, count = batch.positions, len(batch.positions)
    columns: dict = {}
    if count:
        rows = [job.samples[p] for p in where]

        def work(lo: int, hi: int) -> dict:
            images, sizes = batch.images[lo:hi], batch.sizes[lo:hi]
            return _explain_and_score(
                job, images, rows[lo:hi], where[lo:hi], sizes, hi - lo == count
            )

        columns = halve_on_oom(work, count)
        columns["file_size"] = listing.sizes[where]
        columns["file_mtime_ns"] = listing.mtimes[where]
    tick = time.perf_counter()
    job.store.append(columns, failures)
    job.timings["write"] += time.perf_counter() - tick
    return count, failures


def _explain_and_score(job: _Job, images, rows, positions, sizes, whole_batch: bool) -> dict:
    """The columns of one batch: the image's, the method's, and the metrics."""
    options = job.options
    columns = image_columns(job.model, images, rows, positions, sizes, options.target)
    targets = torch.from_numpy(columns["target"]).to(images.device)
    tick = time.perf_counter()
    explained = explain_padded(
        job.method,
        job.model,
        images,
        targets,
        [s.path for s in rows],
        job.settings,
        pad_to=padded_size(job.speed, options.batch_size, len(rows), whole_batch),
        speed=job.speed,
        original_sizes=sizes,
        on_iteration=job.stop.check,
    )
    job.timings["optimize"] += time.perf_counter() - tick
    if options.evaluation is not None:
        tick = time.perf_counter()
        size = tuple(images.shape[-2:])
        saliency = job.method.saliency(explained, job.settings, size, options.area)
        scores = evaluate_batch(
            job.model,
            images,
            saliency,
            targets,
            rows,
            sizes,
            options.evaluation,
            baseline_size=tuple(explained["masks"].shape[-2:]),
            on_chunk=job.stop.check,
        )
        columns.update(scores)
        job.timings["evaluate"] += time.perf_counter() - tick
    columns.update({k: v.cpu().numpy() for k, v in explained.items()})
    return columns


def describe(result: RunResult) -> str:
    """Two lines for the end of a run: what was written, and where the time went."""
    line = (
        f"{result.processed} masks written, {result.failed} images skipped, "
        f"{result.total_rows} in {result.masks_file or result.out} ({result.seconds:.1f} s)"
    )
    t = result.timings
    if result.processed and t:
        line += (
            f"\ntime: loading {t['load']:.1f} s, optimising {t['optimize']:.1f} s, "
            f"evaluating {t['evaluate']:.1f} s, writing {t['write']:.1f} s; "
            f"{t['images_per_s']:.2f} images/s"
        )
    return line
