"""The `mpbatch` command line: parse options, call the pipeline, print one-line errors.

Which methods, presets and method settings exist is the registry's (pipeline.methods): the
options are built from it, so this file names no method.

Longer than 300 lines: almost all of it is option declarations and their help text; each
command's body is a few lines that call one pipeline function.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import click

from pipeline import __version__
from pipeline.commands.configuration import comparisons
from pipeline.methods import DEFAULT_METHOD, method_names, option_flags, preset_names
from pipeline.metrics.pointing import POINTING_TOLERANCE
from pipeline.models.randomisation import DEFAULT_RANDOMISATION_SEED
from pipeline.models.registry import DEFAULT_MODEL


def _user_errors(function):
    """The project's own errors (bad input, bad settings, an output made with other settings,
    a full disk) become one line on stderr and exit 2. Anything else is unexpected: its
    traceback is printed, then one line saying what was saved, and the exit status is 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from pipeline.commands.stopping import EXIT_INTERRUPTED, Interrupted
        from pipeline.errors import MpbatchError

        try:
            return function(*args, **kwargs)
        except Interrupted as stop:
            click.echo(f"mpbatch: {stop}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except MpbatchError as error:
            click.echo(f"mpbatch: error: {error}", err=True)
            if getattr(error, "exit_at_once", False):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)  # skip HDF5's exit handlers, which crash after a failed write
            sys.exit(2)
        except OSError as error:
            if not error.filename:  # not a file of the user's: keep the traceback
                raise _unexpected(error) from None
            click.echo(f"mpbatch: error: {error.filename}: {error.strerror or error}", err=True)
            sys.exit(2)
        except Exception as error:
            raise _unexpected(error) from None

    return wrapper


def _unexpected(error: Exception) -> SystemExit:
    """Print the traceback of an unexpected error and what was saved; the exit to raise."""
    traceback.print_exception(type(error), error, error.__traceback__)
    saved = getattr(error, "mpbatch_saved", None)
    where = f"; {saved}" if saved else ""
    click.echo(
        f"mpbatch: unexpected error (the traceback above is worth reporting){where}", err=True
    )
    return SystemExit(1)


def _tell(options: dict) -> bool:
    """Set up what the pipeline's log shows from --quiet / --verbose (popped from
    `options`); returns quiet."""
    from pipeline.logs import configure

    quiet, verbose = options.pop("quiet"), options.pop("verbose")
    configure(-1 if quiet else 1 if verbose else 0)
    return quiet


def _apply(function, options: list):
    for option in reversed(options):
        function = option(function)
    return function


def _shared_options(function):
    """Options shared by `run` and `evaluate`: the model, the images and how they are read."""
    return _apply(
        function,
        [
            click.option(
                "--weights", default=None, help="Weights file (state dict) for the model."
            ),
            click.option(
                "--target",
                type=click.Choice(["label", "predicted"]),
                default="label",
                show_default=True,
                help="Explain the ground-truth class (where known) or the top-1.",
            ),
            click.option(
                "--workers", type=int, default=2, show_default=True, help="DataLoader workers."
            ),
            click.option(
                "--device",
                type=click.Choice(["auto", "cpu", "cuda"]),
                default="auto",
                show_default=True,
            ),
            click.option(
                "--name",
                default=None,
                help="The maps' row label in summaries and `mpbatch report` (default: the method).",
            ),
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
            click.option(
                "--quiet", is_flag=True, help="No progress bar; warnings only (skipped images...)."
            ),
            click.option(
                "--verbose", is_flag=True, help="Also per-batch timings and other details."
            ),
        ],
    )


def _evaluation_options(function):
    """Options shared by `run` and `evaluate`: the scoring protocol (docs/design.md §4)."""
    return _apply(
        function,
        [
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
                default=POINTING_TOLERANCE,
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
                default=",".join(comparisons()),
                show_default=True,
                help="Comparison rows scored beside the maps (comma-separated; 'none'): the "
                "centre and random baselines and cheap methods.",
            ),
            click.option(
                "--smooth",
                type=float,
                default=None,
                help="Pointing game: blur the map with a Gaussian of sigma SMOOTH x min(H, W) "
                "of the original image before its argmax, as TorchRay's benchmark (0.09). "
                "Default: the method's (0.09 for extremal, else 0).",
            ),
            click.option(
                "--eval-precision",
                type=click.Choice(["auto", "fp32", "bf16"]),
                default="auto",
                show_default=True,
                help="The scoring forwards in bf16 autocast or fp32; auto: bf16 only where "
                "the masks' auto picks it and the model family passed the fidelity check "
                "(benchmarks/eval_precision_fidelity.py), else fp32.",
            ),
            click.option(
                "--comparison-cache",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="Keep the comparison rows' scores in this folder and reuse them in any "
                "later run on the same images, model and protocol (never a stale entry: see "
                "pipeline/metrics/comparison_cache.py).",
            ),
            click.option(
                "--road",
                is_flag=True,
                help="Also score ROAD (Rong et al. 2022): MoRF and LeRF curves at 10%..90% "
                "removed with noisy linear imputation, their areas and the gap, for every map.",
            ),
        ],
    )


def _method_options(function):
    """One --flag per method setting that some registered method exposes."""
    options = []
    for name, (text, choices) in option_flags().items():
        flag = "--" + name.replace("_", "-")
        kind = click.Choice(choices) if choices else None
        options.append(
            click.option(flag, name, default=None, type=kind, metavar="VALUE", help=text)
        )
    return _apply(function, options)


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


def _eval_options(options: dict):
    """The scoring protocol from the options of `_evaluation_options` (popped)."""
    from pipeline.commands.configuration import EvalOptions

    baselines = options.pop("baselines")
    return EvalOptions(
        step=options.pop("step"),
        tolerance=options.pop("tolerance"),
        eval_batch_size=options.pop("eval_batch_size"),
        baselines=tuple(b for b in baselines.split(",") if b and b != "none"),
        smooth=options.pop("smooth"),
        road=options.pop("road"),
        precision=options.pop("eval_precision"),
        comparison_cache=options.pop("comparison_cache"),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", package_name="mpbatch", prog_name="mpbatch")
def main() -> None:
    """mpbatch: meaningful-perturbation saliency masks for whole image datasets.

    Masks are optimised in batches on the GPU (or CPU), saved to HDF5 and tabulated with
    pandas. Start with `mpbatch run DATA -o OUT`, then `mpbatch show OUT -o FIGURES`.
    """
    from pipeline.logs import configure

    configure()


def _explain_options(function):
    """Options shared by `run` and `sanity`: the model, the method and its settings, the
    images, and how fast they are explained."""
    return _apply(
        function,
        [
            click.option(
                "--model",
                default=DEFAULT_MODEL,
                show_default=True,
                help="efficientnet_lite0, a torchvision name (vgg19, resnet50, ...), "
                "timm:NAME, or module.path:function.",
            ),
            click.option(
                "--method",
                type=click.Choice(method_names()),
                default=None,
                help=f"The saliency method (default: the preset's, else {DEFAULT_METHOD}).",
            ),
            click.option(
                "--preset",
                type=click.Choice(preset_names()),
                default=None,
                help="Hyperparameter preset (implies its method); the options below override it.",
            ),
            _method_options,
            click.option(
                "--area",
                type=int,
                default=None,
                help="Methods with several masks per image (extremal): score this one (index); "
                "default the sum.",
            ),
            click.option(
                "--size", type=int, default=224, show_default=True, help="Input size (square)."
            ),
            click.option(
                "--batch-size",
                default="auto",
                show_default=True,
                callback=lambda ctx, param, value: _batch_size(value),
                help="Images explained together, or 'auto': the largest that fits the GPU, up "
                "to 128 (8 on CPU).",
            ),
            click.option(
                "--limit", type=int, default=None, help="Process only the first N images."
            ),
            _shared_options,
            click.option(
                "--precision",
                type=click.Choice(["auto", "fp32", "bf16"]),
                default="auto",
                show_default=True,
                help="Model forward in bf16 (mask, loss and Adam stay fp32); auto picks what "
                "benchmarks/bench_optimize.py measured fastest for the device and model. "
                "Methods that run in float32 only refuse bf16.",
            ),
            click.option(
                "--compile",
                "compile_model",
                is_flag=True,
                help="torch.compile the model (pays off on GPU for long runs; slower on CPU). "
                "The last batch is padded to the batch size, so nothing recompiles.",
            ),
            click.option(
                "--cuda-graphs",
                is_flag=True,
                help="With --compile on a GPU: replay each iteration as CUDA graphs "
                "(torch.compile's reduce-overhead mode); measured 2.9x faster for "
                "EfficientNet-Lite0 on an H100.",
            ),
            click.option(
                "--reference",
                is_flag=True,
                help="Extremal: TorchRay's operations in their order, float32 eager (its "
                "masks bitwise), instead of the fast path (the same masks to float32 "
                "rounding per step; a step 1.7x faster on one CPU thread).",
            ),
            click.option(
                "--on-error",
                type=click.Choice(["skip", "fail"]),
                default="skip",
                show_default=True,
                help="Skip undecodable images (listed in failures.csv) or stop.",
            ),
            click.option("--overwrite", is_flag=True, help="Start over instead of resuming OUT."),
        ],
    )


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@_explain_options
@click.option(
    "--metrics/--no-metrics",
    default=True,
    show_default=True,
    help="Score the maps (deletion, insertion, pointing game) as they are made.",
)
@_evaluation_options
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Run shard I of N (default: from torchrun's RANK/WORLD_SIZE or SLURM's "
    "variables; one shard otherwise).",
)
@_user_errors
def run(data, out, metrics, **options) -> None:
    """Explain every image of DATA and write OUT/masks.h5 and OUT/report.csv.

    Rerunning the same command resumes. SIGTERM or SIGUSR1 stop within an iteration (the
    unfinished batch is dropped), write what is done and exit with status 75, so a requeued
    job continues where it stopped.
    """
    from pipeline.commands.run import describe
    from pipeline.commands.run import run as run_pipeline

    quiet = _tell(options)
    evaluation = _eval_options(options)
    run_options = _run_options(data, out, options, evaluation if metrics else None, quiet)
    click.echo(describe(run_pipeline(run_options)))


def _run_options(data, out, options: dict, evaluation, quiet: bool):
    """RunOptions from the options of `_explain_options` (and `run`'s own) as parsed."""
    from pipeline.commands.configuration import RunOptions
    from pipeline.methods import method_for_preset, parse_overrides

    settings = {name: options.pop(name) for name in option_flags()}
    method = options.pop("method") or method_for_preset(options["preset"])
    compile_model = options.pop("compile_model")
    return RunOptions(
        data=data,
        out=out,
        method=method,
        overrides=parse_overrides(method, settings),
        progress=not quiet,
        compile=compile_model or options["cuda_graphs"],
        evaluation=evaluation,
        **options,
    )


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@_explain_options
@click.option(
    "--granularity",
    type=click.Choice(["blocks", "layers"]),
    default="blocks",
    show_default=True,
    help="What each stage re-initialises: the network's next top-level block (a top-level "
    "Sequential gives one per child), as the paper; or the next module with parameters, "
    "Quantus's MPRT order.",
)
@click.option(
    "--layers",
    default=None,
    help="Stop the cascade at these stages (comma-separated names; the cascade always "
    "starts at the top). Default: every stage.",
)
@click.option(
    "--randomisation-seed",
    type=int,
    default=DEFAULT_RANDOMISATION_SEED,
    show_default=True,
    help="Each module is re-initialised right after torch.manual_seed(SEED + 1), as Quantus.",
)
@click.option(
    "--stages/--no-stages",
    default=True,
    show_default=True,
    help="Run the model-randomisation check (--no-stages: repeatability alone).",
)
@click.option(
    "--repeat",
    type=int,
    default=0,
    show_default=True,
    help="Also explain the images K times with the method's seeds SEED..SEED+K-1, score "
    "them, and report the maps' mean pairwise Pearson r and the spread of every curve area.",
)
@_evaluation_options
@_user_errors
def sanity(data, out, granularity, layers, randomisation_seed, stages, repeat, **options):
    """The model-randomisation sanity check (Adebayo et al. 2018) and repeatability.

    Explains the images of DATA with the trained model, then again after each stage of a
    cascade that re-initialises the network from its top, and writes OUT/sanity.csv,
    OUT/sanity_summary.csv and OUT/sanity.png: the Spearman, SSIM and HOG similarity of
    each stage's maps to the original's. Each explanation is a run in its own folder under
    OUT, so rerunning the same command resumes.
    """
    from pipeline.commands.sanity import SanityOptions, describe
    from pipeline.commands.sanity import sanity as sanity_check

    quiet = _tell(options)
    evaluation = _eval_options(options)
    sanity_options = SanityOptions(
        run=_run_options(data, out, options, evaluation, quiet),
        granularity=granularity,
        randomisation_seed=randomisation_seed,
        stages=stages,
        repeat=repeat,
        layers=tuple(n.strip() for n in layers.split(",") if n.strip()) if layers else None,
    )
    click.echo(describe(sanity_check(sanity_options)))


@main.command()
@click.argument("out", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--dest",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for the PNG figures (with --html: for index.html and its thumbnails).",
)
@click.option("--limit", type=int, default=None, help="Draw only N images (--html: 100).")
@click.option(
    "--html",
    is_flag=True,
    help="Write a sortable, filterable gallery DEST/index.html instead of PNG figures.",
)
@click.option(
    "--sort",
    default="deletion_auc",
    show_default=True,
    help="With --html: the column that picks the images (the highest first; see --ascending).",
)
@click.option("--ascending", is_flag=True, help="With --html: the lowest --sort values first.")
@_user_errors
def show(out, dest, limit, html, sort, ascending) -> None:
    """Draw image, perturbed image and saliency for the images of a run in OUT."""
    from pipeline.reports.writer import write_figures, write_gallery

    if html:
        count = 100 if limit is None else limit
        page = write_gallery(out, dest, sort=sort, descending=not ascending, limit=count)
        click.echo(f"gallery written to {page}")
        return
    written = write_figures(out, dest, limit=limit)
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
    default=None,
    help="Score a comparison's maps instead of saliency maps: center, random, gradcam or "
    "any registered comparison.",
)
@click.option("--model", default=None, help="Model (default: the run's, else efficientnet_lite0).")
@click.option("--size", type=int, default=None, help="Input size (default: the run's, or 224).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@_shared_options
@_evaluation_options
@_user_errors
def evaluate(source, **options):
    """Score saliency maps: deletion/insertion AUCs and the pointing game.

    SOURCE is an mpbatch run (folder or masks.h5; its metrics are recomputed in place and
    the model and size that scored them recorded), an HDF5 file with datasets `path` and
    `saliency` (N×h×w, higher = more important), or an .npy array with --paths. Without
    SOURCE, --baseline scores a baseline on DATA.
    """
    from pipeline.commands.evaluate import EvaluateOptions
    from pipeline.commands.evaluate import evaluate as evaluate_maps

    quiet = _tell(options)
    evaluate_options = EvaluateOptions(
        source=source,
        progress=not quiet,
        evaluation=_eval_options(options),
        **options,
    )
    scored = evaluate_maps(evaluate_options)
    click.echo(f"scores written to {scored} and {scored.parent / 'report.csv'}")


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_user_errors
def merge(out) -> None:
    """Join the shard files OUT/masks-IIIII-of-NNNNN.h5 into OUT/masks.h5 and the reports."""
    from pipeline.commands.shards import merge as merge_shards

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
@click.option(
    "--name",
    "names",
    multiple=True,
    help="A label per run, in order (default: the folder names).",
)
@_user_errors
def report(runs, output, names) -> None:
    """Compare the summaries of several runs side by side (one row per run and method)."""
    from pipeline.reports.markdown import markdown_table
    from pipeline.reports.tables import compare_runs
    from pipeline.reports.writer import write_comparison

    table = compare_runs(list(runs), list(names) or None)
    click.echo(markdown_table(table))
    markdown = write_comparison(table, output)
    click.echo(f"written to {output} and {markdown}")


if __name__ == "__main__":
    main()
