"""mpbatch: batched meaningful-perturbation saliency masks for whole image datasets.

Modules (see ../shared/DESIGN.md §2):
    datasets       dataset layouts, labels, boxes, the torch Dataset, which shard runs here
    listing        a run's listing (paths with file stamps), what changed, shards by path
    models         model registry; wrappers take pixels in [0, 1] and own the normalisation
    methods/       saliency methods as plug-ins (meaningful, extremal, gradcam), a registry
    optimize       the batched mask optimiser of meaningful perturbations
    extremal       extremal perturbations (TorchRay's algorithm, batched)
    perturbations  perturbation substrates (blur, median blur, constant, pyramid, ...)
    metrics        deletion / insertion / pointing game
    localization   weakly supervised localization (the paper's box-from-map rules)
    configuration  what a run is asked (RunOptions, EvalOptions) and records (RunRecord)
    scoring        a batch's per-image columns and metrics, shared by run and evaluate
    run            `mpbatch run`: loader -> explain -> score -> store
    evaluate       `mpbatch evaluate`: score maps that exist already
    shards         shard files and merging them
    batching       batch size (auto), padding, halving on out-of-memory
    stopping       stop signals honoured within an iteration
    store          HDF5 writing, reading, resume by path, the journal
    outdir         the output folder: made, and held by one process (a lock per file)
    errors         the project's own errors (one line) and the one-line helper
    report         pandas tables and summaries
    visualize      figures (per-image panels, curves) and a run's figures
    gallery        the HTML gallery of a run (`mpbatch show --html`)
"""

__version__ = "0.1.0"
