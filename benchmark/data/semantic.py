"""A semantic-segmentation dataset: a list of (image, label PNG) files plus a label codec.

Every reader (VOC, ADE20K, the synthetic dataset) builds one of these. Native ids follow protocols.md:
void is 255 everywhere; ADE's raw 0 becomes 255.

Class presence per image (``classes_in``) needs every label map read once; it is computed on first use
(threads, with a progress bar) and cached on disk under ``<cache>/presence/``, keyed by the dataset's
fingerprint: the reader version, the codec and the name, size and modification time of every label
file. Changing, adding or removing a label file therefore invalidates it.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmark.errors import DataError

from .cache import cache_root, digest, read_json, write_json
from .decoded import DecodedMemo
from .imageio import LabelCodec, read_image, read_label_raw

log = logging.getLogger(__name__)

SEMANTIC = "semantic"
PRESENCE_VERSION = 1


@dataclass(frozen=True)
class SemanticRecord:
    image_id: str
    image: Path
    label: Path


def file_stats(folder: Path, suffixes: tuple[str, ...]) -> dict[str, tuple[str, int, int]]:
    """``stem -> (file name, size, mtime_ns)`` of the files in ``folder`` with one of ``suffixes``."""
    out = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in suffixes and entry.is_file():
                st = entry.stat()
                out[stem] = (entry.name, st.st_size, st.st_mtime_ns)
    return out


def missing_error(what: str, folder: Path, missing: list[str], hint: str) -> DataError:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return DataError(f"{len(missing)} {what} missing in {folder}: {shown}", hint=hint)


class SemanticDataset:
    """Images with per-pixel native class ids (see module docstring)."""

    task = SEMANTIC

    def __init__(self, name: str, split: str, records: list[SemanticRecord], codec: LabelCodec,
                 label_stats: dict[str, tuple[str, int, int]], class_ids: tuple[int, ...],
                 cache_dir: str | os.PathLike | None = None, root: Path | None = None):
        self.name = name
        self.split = split
        self.codec = codec
        self.class_ids = class_ids
        self.root = root
        self._records = records
        self.cache_dir = cache_root(cache_dir)
        self.fingerprint = digest("semantic", PRESENCE_VERSION, name, split, codec.table,
                                  [(r.image_id, label_stats[r.label.stem]) for r in records])
        self._presence: list[tuple[int, ...]] | None = None
        self._decoded = DecodedMemo()

    def keep_decoded(self) -> None:
        """Decode each image once and keep it (benchmark.data.decoded): for a split that fits in memory."""
        self._decoded.enable()

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"SemanticDataset({self.name!r}, {self.split!r}, {len(self)} images, root={str(self.root)!r})"

    def image_id(self, i: int) -> str:
        return self._records[i].image_id

    def image_path(self, i: int) -> Path:
        return self._records[i].image

    def label_path(self, i: int) -> Path:
        return self._records[i].label

    def classes_in(self, i: int) -> tuple[int, ...]:
        """Native class ids present in image ``i`` (void excluded), from the cached presence table."""
        return self.presence()[i]

    def presence(self) -> list[tuple[int, ...]]:
        if self._presence is None:
            self._presence = self._load_or_compute_presence()
        return self._presence

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self._records[i].image)

    def load_label(self, i: int) -> np.ndarray:
        """Native ids as an HxW uint8 array (void = 255)."""
        path = self._records[i].label
        return self.codec.decode(read_label_raw(path), path)

    def load_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 image, HxW uint8 native ids), checked to have the same size; read-only arrays."""
        return self._decoded.get(i, lambda: self._decode_pair(i))

    def _decode_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.load_image(i), self.load_label(i)
        if image.shape[:2] != label.shape:
            rec = self._records[i]
            raise DataError(f"image {rec.image} is {image.shape[1]}x{image.shape[0]} but its label map "
                            f"{rec.label} is {label.shape[1]}x{label.shape[0]}",
                            hint="the two files do not belong together; replace the label map")
        return image, label

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 image, HxW int64 native ids with void = 255)."""
        image, label = self.load_pair(i)
        return image, label.astype(np.int64)

    # ---- presence table ------------------------------------------------------------------------
    def _presence_file(self) -> Path:
        return self.cache_dir / "presence" / f"{self.name}-{self.split}-{self.fingerprint[:20]}.json"

    def _load_or_compute_presence(self) -> list[tuple[int, ...]]:
        path = self._presence_file()
        cached = read_json(path)
        if cached and cached.get("fingerprint") == self.fingerprint and len(cached["classes"]) == len(self):
            return [tuple(c) for c in cached["classes"]]

        def classes(rec: SemanticRecord) -> tuple[int, ...]:
            return self.codec.classes(read_label_raw(rec.label), rec.label)

        workers = min(8, os.cpu_count() or 1)
        # A bar on a terminal only; a log file (SLURM, ``> file``) gets one plain line, no carriage returns.
        bar = len(self) >= 500 and sys.stderr.isatty()
        if not bar:
            log.info("class presence %s/%s: reading %d label maps once (cached in %s)", self.name, self.split,
                     len(self), path)
        with ThreadPoolExecutor(workers) as pool:
            table = list(tqdm(pool.map(classes, self._records), total=len(self), unit="img", leave=False,
                              desc=f"class presence {self.name}/{self.split}", disable=not bar))
        write_json(path, {"fingerprint": self.fingerprint, "classes": [list(c) for c in table]})
        return table
