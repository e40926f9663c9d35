"""Which training images a step uses (protocols.md, "Image selection per step").

The rules are MiB's and PLOP's ``filter_images`` ([MiB]/[PLOP] dataset/utils.py L19-42, reference §6.5):

- overlap: keep image i at step t iff it contains at least one class of C_t. VOC's background 0 never
  counts (MiB removes 0 from the step's labels before filtering); void never counts (it is not in
  ``classes_in``).
- disjoint: additionally every class in the image is in O_t | C_t | {background}: classes of earlier
  steps are allowed, classes of future steps are not (MiB's ``labels_cum = labels + labels_old + [0, 255]``).
  A class that no step of the protocol contains therefore also excludes the image, as in MiB.

The result (sorted indices) is cached on disk under ``<cache>/steps/``, keyed by the dataset fingerprint
and by what decides the selection (mode, steps, background, step), so protocols that differ only in name
share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from benchmark.errors import ConfigError

from .cache import cache_root, digest, read_array, write_array

SELECTION_VERSION = 1
MODES = ("overlap", "disjoint")


def select_images(presence: Sequence[Iterable[int]], new: Iterable[int], seen: Iterable[int], mode: str,
                  background: int | None = None) -> list[int]:
    """Sorted indices of the images whose classes (``presence[i]``) satisfy the rule of ``mode``.

    ``new`` = C_t, ``seen`` = O_t | C_t (native ids); ``background`` = VOC's 0 or None.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown selection mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    wanted = set(new) - {background}
    allowed = set(seen) | ({background} if background is not None else set())
    keep = []
    for i, classes in enumerate(presence):
        classes = set(classes)
        if classes & wanted and (mode == "overlap" or classes <= allowed):
            keep.append(i)
    return keep


def step_indices(ds, protocol, step: int, *, cache_dir=None) -> list[int]:
    """Sorted indices into ``ds`` of the training images of ``step`` of ``protocol``."""
    num_steps = len(protocol.steps)
    if not 0 <= step < num_steps:
        raise ConfigError(f"protocol {protocol.name} has steps 0..{num_steps - 1}, not {step}")
    steps = [list(map(int, s)) for s in protocol.steps]
    background = getattr(protocol, "background", None)
    key = digest(SELECTION_VERSION, ds.fingerprint, protocol.mode, steps, background, step)
    folder = cache_root(cache_dir) if cache_dir is not None else getattr(ds, "cache_dir", cache_root())
    path = folder / "steps" / f"{ds.name}-{ds.split}-{key[:24]}.npy"
    cached = read_array(path)
    if cached is not None:
        return cached.tolist()
    seen = [c for s in steps[: step + 1] for c in s]
    indices = select_images(ds.presence(), steps[step], seen, protocol.mode, background)
    write_array(path, np.asarray(indices, dtype=np.int64))
    return indices
