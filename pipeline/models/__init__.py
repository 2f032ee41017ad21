"""The classifiers: the model registry and its wrappers, which take pixels in [0, 1] and own
the normalisation (registry); the one speed and precision policy that every method and
scoring read (speed); scoring's folded model (folding); the sanity check's
re-initialisation (randomisation)."""
