"""ROAD's reference imputer: road_evaluation's NoisyLinearImputer as ported in grad-cam 1.5.7
(`pytorch_grad_cam/metrics/road.py`), loaded without its package's __init__, which imports
OpenCV and ttach that the imputer does not need. Used by tests/test_road.py and bench_road."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


def load_road_reference() -> types.ModuleType | None:
    """grad-cam's road module, or None when grad-cam is not installed (`make references`
    installs it, without its dependencies)."""
    spec = importlib.util.find_spec("pytorch_grad_cam")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0])
    stub_cv2 = importlib.util.find_spec("cv2") is None
    try:
        if stub_cv2:
            sys.modules["cv2"] = types.ModuleType("cv2")  # used by the Otsu threshold only
        for name, folder in (
            ("pytorch_grad_cam", root),
            ("pytorch_grad_cam.metrics", root / "metrics"),
        ):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        return importlib.import_module("pytorch_grad_cam.metrics.road")
    finally:  # leave no stub behind (numpy, scipy and torch stay as they were imported)
        for name in [n for n in sys.modules if n.split(".")[0] == "pytorch_grad_cam"]:
            sys.modules.pop(name)
        if stub_cv2:
            sys.modules.pop("cv2", None)
