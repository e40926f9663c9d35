"""Decoded samples kept in memory by a reader whose whole split fits there (the embedded synthetic dataset).

Why: the ``cpu`` schedule loads in the training process (``data.workers=0``: two runs already use the two
cores), so every iteration decoded its 8 JPEGs and label / panoptic-id PNGs again, epoch after epoch, though
the synthetic train split (600 images of 64-96 px) decodes to 22 MB (semantic) / 60 MB (panoptic). A reader
with :meth:`keep_decoded` on decodes each image once. Real datasets do not turn it on (ADE20K's train split
decodes to tens of GB).

The arrays handed out are read-only, kept or not, so a transform that wrote into its input (and would so
change every later epoch's samples) fails in the tests instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def frozen(value):
    """``value`` with every numpy array in it (tuples, lists, dataclasses) made read-only; returns it."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, (tuple, list)):
        for item in value:
            frozen(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            frozen(getattr(value, field.name))
    return value


class DecodedMemo:
    """Per-reader memo ``index -> decoded sample`` (off until :meth:`enable`; unbounded: enable it only for a
    split that fits in memory)."""

    def __init__(self):
        self._items: dict | None = None

    def enable(self) -> None:
        if self._items is None:
            self._items = {}

    def get(self, key, decode):
        """The sample of ``key``: from the memo, or ``decode()`` (frozen, and kept when enabled)."""
        if self._items is not None and key in self._items:
            return self._items[key]
        value = frozen(decode())
        if self._items is not None:
            self._items[key] = value
        return value
