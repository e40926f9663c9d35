"""Where derived data lives (class-presence tables, step indices, converted jsons, the synthetic dataset)
and how it is written: atomically (temp file + rename), so a kill never leaves a half-written file.

The cache root is ``$CISDQ_BENCH_CACHE`` when set, else ``~/.cache/cisdq-bench``; every function that
writes there also accepts an explicit folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "CISDQ_BENCH_CACHE"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``explicit`` if given, else ``$CISDQ_BENCH_CACHE``, else ``~/.cache/cisdq-bench``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cisdq-bench"


def digest(*parts: Any) -> str:
    """A stable hex digest of JSON-serialisable parts (used as cache keys and fingerprints)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, separators=(",", ":")).encode()))


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is absent or unreadable (a cache miss, never an error)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_array(path: Path, array: np.ndarray) -> None:
    _atomic_write(Path(path), lambda f: np.save(f, array, allow_pickle=False))


def read_array(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
