"""Tiny classifiers for fast tests; importable as `tiny_models:NAME` by the model registry."""

from __future__ import annotations

import torch
from torch import nn

TINY = "tiny_models:make_tiny_cnn"  # the --model value that loads TinyCNN
# CLI options that load TinyCNN on 32-pixel images, decode in the test process, no progress bar
TINY_OPTIONS = ["--model", TINY, "--size", "32", "--workers", "0", "--quiet"]


class TinyCNN(nn.Module):
    """A few seeded random conv layers; pixels in [0, 1] -> logits B×num_classes."""

    def __init__(self, num_classes: int = 10, seed: int = 0, gain: float = 4.0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._build(num_classes)
        # PyTorch's default init gives near-uniform softmax here; scaling the weights makes
        # the scores depend on the image enough for masks to move within a few iterations.
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(gain)
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.class_names = [f"tiny_{i}" for i in range(num_classes)]

    def _build(self, num_classes: int) -> None:
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class BrightRegionModel(nn.Module):
    """Two classes; the logit of class 0 grows with the mean brightness of a fixed region.

    softmax(...)[0] = sigmoid(gain · (mean brightness in region − 0.5)): deleting the region
    (replacing it with dark pixels) is the only way to lower class 0's score.
    """

    def __init__(self, size: int = 32, region: tuple[int, int, int, int] = (8, 8, 20, 20)):
        super().__init__()
        top, left, bottom, right = region
        weight = torch.zeros(1, 1, size, size)
        weight[..., top:bottom, left:right] = 1.0
        self.register_buffer("region", weight / weight.sum())
        self.gain = 12.0
        self.mean = (0.0, 0.0, 0.0)
        self.std = (1.0, 1.0, 1.0)
        self.class_names = ["bright", "dark"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = (x.mean(1, keepdim=True) * self.region).flatten(1).sum(1)
        logit = self.gain * (brightness - 0.5)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def make_tiny_cnn() -> nn.Module:
    return TinyCNN()


def make_bright_region() -> nn.Module:
    return BrightRegionModel()


class FailingAfterFirstBatch(TinyCNN):
    """TinyCNN whose forward raises a RuntimeError (an unexpected error: a bug, a driver
    fault) once the folder named by MPBATCH_TEST_FAIL_WHEN holds a journal part, i.e. after
    the run committed its first batch. Without the variable it is TinyCNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        from pathlib import Path

        parts = os.environ.get("MPBATCH_TEST_FAIL_WHEN")
        if parts and any(Path(parts).glob("part-*.h5")):
            raise RuntimeError("simulated fault inside the model's forward")
        return super().forward(x)


def make_failing_cnn() -> nn.Module:
    return FailingAfterFirstBatch()
