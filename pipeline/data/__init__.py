"""The images: dataset layouts with their labels and boxes (datasets), decoding and the torch
Dataset (images), a run's listing of paths with file stamps (listing), per-image seeds."""
