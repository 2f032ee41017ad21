"""mpbatch: batched meaningful-perturbation saliency masks for whole image datasets.

A notebook starts at `pipeline.api` (explain a batch, score maps, read a run folder). One
sub-package per concern, from the commands down (README.md, "How the code is laid out";
docs/design.md for the methods, protocols and storage):
    commands/   run, evaluate, sanity, shards (merge); configuration, batching, stopping
    data/       dataset layouts, labels and boxes; decoding; the listing; per-image seeds
    models/     the model registry and wrappers; the speed policy; scoring's folded model;
                randomisation
    methods/    saliency methods as plug-ins: meaningful/, extremal/, gradcam; perturbations
    metrics/    deletion/insertion, pointing, localization, ROAD, similarity; comparisons and
                their cache; scoring
    store/      the mask file's writer, the one reader of a run folder, the output lock
    reports/    the column schema, tables, summary text, pictures, gallery; the report writer
    errors, logs
"""

__version__ = "0.1.0"
