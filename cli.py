"""The `mpbatch` command line: parse options, call the pipeline, print one-line errors."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.extremal import EXTREMAL_PRESETS
from pipeline.optimize import GAMES, PERTURBATIONS, PRESETS


def _user_errors(function):
    """Turn the pipeline's user-facing exceptions into one line on stderr and exit 2."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from pipeline.datasets import DatasetError
        from pipeline.models import ModelError
        from pipeline.runner import EXIT_INTERRUPTED, Interrupted
        from pipeline.store import StoreError

        try:
            return function(*args, **kwargs)
        except Interrupted as stop:
            click.echo(f"mpbatch: {stop}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (DatasetError, ModelError, StoreError, ValueError, RuntimeError) as error:
            click.echo(f"mpbatch: error: {error}", err=True)
            sys.exit(2)
        except OSError as error:  # unwritable OUT, disk full, ...
            where = f"{error.filename}: " if error.filename else ""
            click.echo(f"mpbatch: error: {where}{error.strerror or error}", err=True)
            sys.exit(2)

    return wrapper


def _dataset_options(function):
    """Options shared by `run` and `evaluate`: where labels and boxes come from (DESIGN §3)."""
    options = [
        click.option(
            "--labels-csv",
            type=click.Path(path_type=Path),
            default=None,
            help="LOC_val_solution.csv (default: found in or next to DATA).",
        ),
        click.option(
            "--synset-mapping",
            type=click.Path(path_type=Path),
            default=None,
            help="LOC_synset_mapping.txt (default: found in or next to DATA).",
        ),
        click.option(
            "--boxes",
            "boxes_dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder of per-image box XMLs (ILSVRC / PASCAL VOC style).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _evaluation_options(function):
    """Options shared by `run` and `evaluate`: the scoring protocol (DESIGN §4)."""
    options = [
        click.option(
            "--step",
            type=int,
            default=224,
            show_default=True,
            help="Pixels changed per deletion/insertion step.",
        ),
        click.option(
            "--tolerance",
            type=float,
            default=15.0,
            show_default=True,
            help="Pointing-game tolerance in pixels of the original image.",
        ),
        click.option(
            "--eval-batch-size",
            type=int,
            default=None,
            help="Step images scored per forward pass (default: 128 on a GPU, 1 on CPU).",
        ),
        click.option(
            "--baselines",
            default="center,random",
            show_default=True,
            help="Baselines scored beside the method (comma-separated; 'none').",
        ),
        click.option(
            "--smooth",
            type=float,
            default=None,
            help="Pointing game: blur the map with a Gaussian of sigma SMOOTH x min(H, W) of "
            "the original image before its argmax, as TorchRay's benchmark (0.09). Default: "
            "0.09 for extremal masks, 0 otherwise.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise click.BadParameter(f"{value!r} is not a positive integer or 'auto'")
    return number


def _method_overrides(method: str, options: dict) -> dict:
    """The method options given on the command line; refuses those the method has not."""
    import dataclasses

    from pipeline.extremal import ExtremalSettings
    from pipeline.optimize import MaskSettings

    given = {k: v for k, v in options.items() if v is not None}
    if "areas" in given:
        given["areas"] = tuple(float(a) for a in given["areas"].split(","))
    settings = ExtremalSettings if method == "extremal" else MaskSettings
    known = {f.name for f in dataclasses.fields(settings)}
    foreign = sorted(set(given) - known)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise click.UsageError(f"{flags} does not apply to --method {method}")
    return given


def _eval_options(step, tolerance, eval_batch_size, baselines, smooth):
    from pipeline.runner import EvalOptions

    names = tuple(b for b in baselines.split(",") if b and b != "none")
    return EvalOptions(
        step=step,
        tolerance=tolerance,
        eval_batch_size=eval_batch_size,
        baselines=names,
        smooth=smooth,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", package_name="mpbatch", prog_name="mpbatch")
def main() -> None:
    """mpbatch: meaningful-perturbation saliency masks for whole image datasets.

    Masks are optimised in batches on the GPU (or CPU), saved to HDF5 and tabulated with
    pandas. Start with `mpbatch run DATA -o OUT`, then `mpbatch show OUT -o FIGURES`.
    """


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option(
    "--model",
    default="efficientnet_lite0",
    show_default=True,
    help="efficientnet_lite0, a torchvision name (vgg19, resnet50, ...), "
    "timm:NAME, or module.path:function.",
)
@click.option("--weights", default=None, help="Weights file (state dict) for the model.")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS) + sorted(EXTREMAL_PRESETS)),
    default=None,
    help="Hyperparameter preset; the options below override it. Meaningful perturbations: "
    "seed (default), paper. Extremal: torchray-voc (default), torchray-coco (TorchRay's "
    "pointing benchmark, areas for VOC / COCO).",
)
@click.option("--iterations", type=int, help="Optimisation steps per mask.")
@click.option("--lr", type=float, help="Adam learning rate.")
@click.option("--l1", type=float, help="Weight of the area term |1 - m|.")
@click.option("--tv", type=float, help="Weight of the total-variation term.")
@click.option("--tv-beta", type=float, help="Exponent β of the total-variation term.")
@click.option("--mask-size", type=int, help="Mask resolution (square).")
@click.option("--noise", type=float, help="Std of the noise added each step (normalised space).")
@click.option("--perturbation", type=click.Choice(PERTURBATIONS), help="Perturbation substrate.")
@click.option(
    "--blur-sigma",
    type=float,
    help="Sigma of the Gaussian blur (blur-pyramid: of its strongest level).",
)
@click.option(
    "--game",
    type=click.Choice(GAMES),
    default=None,
    help="delete (default): the smallest region whose removal drops the score; "
    "preserve: the smallest region that alone keeps it.",
)
@click.option("--jitter", type=int, help="Random shift of the perturbed image, in pixels.")
@click.option("--mask-blur-sigma", type=float, help="Blur of the upsampled mask.")
@click.option("--seed", type=int, help="Run seed; each image's noise is seeded by it and its path.")
@click.option(
    "--method",
    type=click.Choice(["meaningful", "extremal"]),
    default=None,
    help="Meaningful perturbations (Fong & Vedaldi 2017, the default) or extremal "
    "perturbations (2019; the default for a torchray-* preset).",
)
@click.option("--areas", default=None, help="Extremal: target areas (default 0.025,0.05,0.1,0.2).")
@click.option(
    "--variant",
    type=click.Choice(["preserve", "delete", "dual"]),
    default=None,
    help="Extremal: which game (default preserve).",
)
@click.option(
    "--reward",
    type=click.Choice(["simple", "contrastive"]),
    default=None,
    help="Extremal: logit of the target, or target minus the best other class.",
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="Extremal: temperature of the mask's smooth max (0.05 = TorchRay's coldness 20).",
)
@click.option(
    "--area",
    type=int,
    default=None,
    help="Extremal: score the mask of this area (index); default the sum over areas.",
)
@click.option(
    "--target",
    type=click.Choice(["label", "predicted"]),
    default="label",
    show_default=True,
    help="Explain the ground-truth class (where known) or the top-1.",
)
@click.option("--size", type=int, default=224, show_default=True, help="Input size (square).")
@click.option(
    "--batch-size",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _batch_size(value),
    help="Images optimised together, or 'auto': the largest that fits the GPU, up to 128 "
    "(8 on CPU).",
)
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader workers.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--limit", type=int, default=None, help="Process only the first N images.")
@_dataset_options
@click.option(
    "--metrics/--no-metrics",
    default=True,
    show_default=True,
    help="Score the masks (deletion, insertion, pointing game) as they are made.",
)
@_evaluation_options
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="Model forward in bf16 (mask, loss and Adam stay fp32); auto picks what "
    "benchmarks/bench_optimize.py measured fastest for the device and model.",
)
@click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="torch.compile the model (pays off on GPU for long runs; slower on CPU). The last "
    "batch is padded to the batch size, so nothing recompiles.",
)
@click.option(
    "--cuda-graphs",
    is_flag=True,
    help="With --compile on a GPU: replay each iteration as CUDA graphs (torch.compile's "
    "reduce-overhead mode); measured 2.9x faster for EfficientNet-Lite0 on an H100.",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Run shard I of N (default: from torchrun's RANK/WORLD_SIZE or SLURM's "
    "variables; one shard otherwise).",
)
@click.option(
    "--on-error",
    type=click.Choice(["skip", "fail"]),
    default="skip",
    show_default=True,
    help="Skip undecodable images (listed in failures.csv) or stop.",
)
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming OUT.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def run(
    data,
    out,
    model,
    weights,
    preset,
    target,
    size,
    batch_size,
    workers,
    device,
    limit,
    labels_csv,
    synset_mapping,
    boxes_dir,
    metrics,
    step,
    tolerance,
    eval_batch_size,
    baselines,
    smooth,
    precision,
    compile_model,
    cuda_graphs,
    shard,
    on_error,
    method,
    area,
    overwrite,
    quiet,
    **mask_options,
) -> None:
    """Learn a mask for every image of DATA and write OUT/masks.h5 and OUT/report.csv.

    Rerunning the same command resumes. SIGTERM or SIGUSR1 finish the current batch, write
    what is done and exit with status 75, so a requeued job continues where it stopped.
    """
    from pipeline.runner import RunOptions, describe
    from pipeline.runner import run as run_pipeline

    method = method or ("extremal" if preset in EXTREMAL_PRESETS else "meaningful")
    options = RunOptions(
        data=data,
        out=out,
        model=model,
        weights=weights,
        preset=preset,
        overrides=_method_overrides(method, mask_options),
        size=size,
        target=target,
        batch_size=batch_size,
        workers=workers,
        device=device,
        limit=limit,
        labels_csv=labels_csv,
        synset_mapping=synset_mapping,
        boxes_dir=boxes_dir,
        overwrite=overwrite,
        progress=not quiet,
        precision=precision,
        compile=compile_model or cuda_graphs,
        cuda_graphs=cuda_graphs,
        shard=shard,
        on_error=on_error,
        method=method,
        area=area,
        evaluation=(
            _eval_options(step, tolerance, eval_batch_size, baselines, smooth) if metrics else None
        ),
    )
    click.echo(describe(run_pipeline(options)))


@main.command()
@click.argument("out", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--dest",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for the PNG figures.",
)
@click.option("--limit", type=int, default=None, help="Draw only the first N images.")
@_user_errors
def show(out, dest, limit) -> None:
    """Draw image, perturbed image and saliency for each image of a run in OUT."""
    from pipeline.runner import render_figures

    written = render_figures(out, dest, limit=limit)
    click.echo(f"{len(written)} figures written to {dest}")


@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="The images the maps belong to (default: the run's data folder).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (needed unless SOURCE is an mpbatch run).",
)
@click.option(
    "--paths",
    "paths_file",
    type=click.Path(exists=True, path_type=Path),
    help="For an .npy SOURCE: a text file with one image path (relative to DATA) "
    "per line, in the array's order.",
)
@click.option(
    "--baseline",
    type=click.Choice(["center", "random"]),
    default=None,
    help="Score a baseline instead of saliency maps.",
)
@click.option("--model", default=None, help="Model (default: the run's, else efficientnet_lite0).")
@click.option("--weights", default=None, help="Weights file (state dict) for the model.")
@click.option(
    "--target",
    type=click.Choice(["label", "predicted"]),
    default="label",
    show_default=True,
    help="For foreign maps: explain the label or the top-1 class.",
)
@click.option("--size", type=int, default=None, help="Input size (default: the run's, or 224).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@_dataset_options
@_evaluation_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def evaluate(
    source,
    data,
    out,
    paths_file,
    baseline,
    model,
    weights,
    target,
    size,
    batch_size,
    workers,
    device,
    labels_csv,
    synset_mapping,
    boxes_dir,
    step,
    tolerance,
    eval_batch_size,
    baselines,
    smooth,
    quiet,
) -> None:
    """Score saliency maps: deletion/insertion AUCs and the pointing game.

    SOURCE is an mpbatch run (folder or masks.h5; its metrics are recomputed in place), an
    HDF5 file with datasets `path` and `saliency` (N×h×w, higher = more important), or an
    .npy array with --paths. Without SOURCE, --baseline scores a baseline on DATA.
    """
    from pipeline.runner import EvaluateOptions
    from pipeline.runner import evaluate as evaluate_maps

    options = EvaluateOptions(
        source=source,
        data=data,
        out=out,
        paths_file=paths_file,
        baseline=baseline,
        model=model,
        weights=weights,
        target=target,
        size=size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        labels_csv=labels_csv,
        synset_mapping=synset_mapping,
        boxes_dir=boxes_dir,
        progress=not quiet,
        evaluation=_eval_options(step, tolerance, eval_batch_size, baselines, smooth),
    )
    scored = evaluate_maps(options)
    click.echo(f"scores written to {scored} and {scored.parent / 'report.csv'}")


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_user_errors
def merge(out) -> None:
    """Join the shard files OUT/masks-IIIII-of-NNNNN.h5 into OUT/masks.h5 and the reports."""
    from pipeline.runner import merge as merge_shards

    merged = merge_shards(out)
    click.echo(f"merged into {merged}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default="comparison.csv",
    show_default=True,
    help="Where to write the comparison as CSV (and .md beside it).",
)
@_user_errors
def report(runs, output) -> None:
    """Compare the summaries of several runs side by side (one row per run and method)."""
    from pipeline.report import compare_runs, markdown_table

    table = compare_runs(list(runs))
    click.echo(markdown_table(table))
    table.to_csv(output, index=False)
    Path(output).with_suffix(".md").write_text(markdown_table(table))
    click.echo(f"written to {output} and {Path(output).with_suffix('.md')}")


if __name__ == "__main__":
    main()
