"""mpbatch: batched meaningful-perturbation saliency masks for whole image datasets.

Modules, from the commands down (README.md, "How the code is laid out", has one line each):
    run, evaluate, shards     the commands' orchestration (`mpbatch run`, `evaluate`, `merge`)
    outputs                   the one module that writes report files
    report, markdown          tables and summary.md's text (pure)
    visualize, gallery        pictures and the gallery page's data (pure); templates/
    columns                   the one column schema (names, labels, better/worse, order)
    comparisons               comparison maps as a registry (centre, random, Grad-CAM, ...)
    runfile                   the one reader of a run folder
    store, outdir, listing    writing the mask file, holding OUT, the listing and its changes
    scoring, batching         a batch's columns and metrics; the one batch loop
    configuration             what a run is asked and records
    methods/                  saliency methods as plug-ins, a registry
    optimize, extremal        the mask optimisers
    perturbations             perturbation substrates
    metrics, pointing, maps   deletion / insertion, the pointing game, map helpers
    localization              weakly supervised localization
    models                    model registry; wrappers own the normalisation
    datasets, images          layouts, labels, boxes; decoding and the Dataset
    stopping, seeding, logs, errors
"""

__version__ = "0.1.0"
