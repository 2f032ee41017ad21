"""Comparison scores kept across runs (`--comparison-cache DIR`), so that the centre, random
and Grad-CAM rows of the same images, model and protocol are scored once, not once per run.

A comparison's scores depend on the image, its explained class and boxes, the model, the
scoring protocol and the code; never on the run's own method. Each image's scores for one
comparison are one file, named by a SHA-256 of everything they depend on:

- the image: its path (the random baseline is seeded by it), the bytes of the decoded input
  tensor, its original size, the explained class and the boxes of that class;
- the comparison's name and the mask grid (the random baseline's resolution);
- the model: its name and a SHA-256 of every parameter and buffer (so other weights, a
  randomised stage of `mpbatch sanity` or a fine-tuned copy never share an entry);
- the protocol: EvalOptions.settings() without the list of comparisons (step, tolerance,
  smoothing, seed, ROAD, precision), the scoring batch size, the device type;
- the code: a SHA-256 of every module of the `pipeline` package (read once per process), of
  the source of the comparison's own functions (a comparison registered from outside the
  package), and of the source files that define the model's layers outside torch;
- the versions of mpbatch, torch and numpy.

Anything that could change a number changes the name, so a stale entry is never read; old
entries are simply never asked for again. An entry is written to a temporary file and
renamed, so a killed run leaves none half-written, and one that cannot be read (truncated,
not a zip, a bad CRC) is a miss: scored again and rewritten, with one warning.
Layout: DIR/<first two hex digits>/<digest>.npz, one array per column.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import marshal
import os
import sys
import tempfile
import weakref
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import __version__

log = logging.getLogger(__name__)

_MODEL_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def package_digest() -> str:
    """SHA-256 of the source of every module of the `pipeline` package (paths and bytes):
    any change of the code a score may depend on changes it. Read once per process."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def function_digest(*functions: Callable | None) -> str:
    """SHA-256 of the functions' source (their compiled code where there is no source)."""
    digest = hashlib.sha256()
    for function in functions:
        if function is None:
            digest.update(b"none")
            continue
        try:
            digest.update(inspect.getsource(function).encode())
        except (OSError, TypeError):
            code = getattr(function, "__code__", None)
            digest.update(marshal.dumps(code) if code is not None else repr(function).encode())
    return digest.hexdigest()


def _model_code(model: torch.nn.Module, digest) -> None:
    """Add the source files that define the model's layer classes, torch's own excepted
    (torch's version is in the context): a custom `module:function` model's edited forward."""
    files = set()
    for module in model.modules():
        name = type(module).__module__
        if name.split(".")[0] == "torch":
            continue
        source = getattr(sys.modules.get(name), "__file__", None)
        if source:
            files.add(source)
    for file in sorted(files):
        digest.update(Path(file).name.encode() + b"\0")
        digest.update(Path(file).read_bytes())


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's name, the source of its layer classes (outside torch) and
    every parameter and buffer (names, dtypes, shapes, bytes); cached per model until any of
    them is written in place."""
    tensors = list(model.state_dict().items())
    versions = tuple((name, t._version) for name, t in tensors)
    cached = _MODEL_DIGESTS.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = hashlib.sha256(str(getattr(model, "name", type(model).__name__)).encode())
    _model_code(model, digest)
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d counters too
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    _MODEL_DIGESTS[model] = (versions, value)
    return value


class ComparisonCache:
    """The comparison scores under `root` for one model, protocol and device (`context`)."""

    def __init__(self, root: str | os.PathLike, context: dict) -> None:
        self.root = Path(root)
        self.context = json.dumps(
            {
                **context,
                "mpbatch": __version__,
                "code": package_digest(),
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
            sort_keys=True,
            default=str,
        )
        self.hits = 0
        self.misses = 0

    def key(
        self, name: str, code: str, path: str, image: torch.Tensor, size, target: int, boxes
    ) -> str:
        """The entry's digest for one image (3×H×W) of a comparison; `code`: the digest of
        the comparison's own functions (function_digest)."""
        digest = hashlib.sha256(self.context.encode())
        fields = {
            "comparison": name,
            "code": code,
            "path": path,
            "size": [int(v) for v in size],
            "target": int(target),
            "boxes": None if boxes is None else boxes.tolist(),
            "shape": list(image.shape),
            "dtype": str(image.dtype),
        }
        digest.update(json.dumps(fields, sort_keys=True).encode())
        digest.update(image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """One image's columns, or None when absent or unreadable."""
        file = self._file(key)
        if not file.is_file():
            self.misses += 1
            return None
        try:
            with np.load(file, allow_pickle=False) as stored:
                columns = {name: stored[name] for name in stored.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            log.warning("comparison cache entry %s unreadable (%s); scoring it again", file, error)
            self.misses += 1
            return None
        self.hits += 1
        return columns

    def put(self, key: str, columns: dict[str, np.ndarray]) -> None:
        """Store one image's columns (written to a temporary file, then renamed)."""
        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **columns)
            os.replace(temporary, file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
