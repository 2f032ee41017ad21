"""mpbatch: batched meaningful-perturbation saliency masks for whole image datasets.

Modules (see ../shared/DESIGN.md §2):
    datasets       dataset layouts, labels, boxes, the torch Dataset, sharding
    models         model registry; wrappers take pixels in [0, 1] and own the normalisation
    perturbations  perturbation substrates (blur, median blur, constant, ...)
    optimize       the batched mask optimiser
    metrics        deletion / insertion / pointing game
    store          HDF5 writing, reading, resume
    report         pandas tables and summaries
    visualize      figures (per-image panels, curves)
    runner         orchestration: loader -> optimise -> store -> evaluate
"""

__version__ = "0.1.0"
