"""Reading images and label maps, with errors that name the file.

Label maps are palette ("P") or grayscale ("L", 16/32-bit "I") PNGs whose pixel values are the class ids
(palette PNGs store the id as the palette index, as VOC's SegmentationClass does). A :class:`LabelCodec`
turns raw values into native ids and rejects values outside the dataset's id space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from benchmark.errors import DataError

VOID = 255
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def read_image(path: Path) -> np.ndarray:
    """The image as an HxWx3 uint8 RGB array (EXIF orientation applied, as detectron2's reader does)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image file is missing: {path}", hint="re-extract the dataset or run "
                        "`python -m benchmark.data.prepare <dataset> --root <data root>` to check it") from None
    except _READ_ERRORS as err:
        raise DataError(f"cannot read image {path}: {err}",
                        hint="the file is corrupt or truncated; replace it with a fresh copy") from None


def read_label_raw(path: Path) -> np.ndarray:
    """The raw pixel values of a label PNG (palette indices or gray levels), as an HxW integer array."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"label map {path} is a {im.mode} image; expected a palette or grayscale PNG "
                                "whose pixel values are class ids",
                                hint="colour-coded label maps must be converted to class-id PNGs first")
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"label file is missing: {path}", hint="re-extract the dataset or run "
                        "`python -m benchmark.data.prepare <dataset> --root <data root>` to check it") from None
    except _READ_ERRORS as err:
        raise DataError(f"cannot read label map {path}: {err}",
                        hint="the file is corrupt or truncated; replace it with a fresh copy") from None


@dataclass(frozen=True)
class LabelCodec:
    """Raw label value -> native class id, as a 256-entry lookup table (-1 = not allowed).

    ``describe`` names the accepted raw values in error messages.
    """

    name: str
    table: tuple[int, ...]
    describe: str

    @staticmethod
    def build(name: str, mapping: dict[int, int], describe: str) -> "LabelCodec":
        table = [-1] * 256
        for raw, native in mapping.items():
            table[raw] = native
        return LabelCodec(name, tuple(table), describe)

    @property
    def lut(self) -> np.ndarray:
        return np.asarray(self.table, dtype=np.int16)

    def invalid_values(self, raw_values: np.ndarray) -> list[int]:
        values = np.asarray(raw_values).astype(np.int64).ravel()
        lut = self.lut
        bad = (values < 0) | (values > 255)
        bad[~bad] = lut[values[~bad]] < 0
        return sorted(set(values[bad].tolist()))

    def check(self, raw_values: np.ndarray, path: Path) -> None:
        bad = self.invalid_values(raw_values)
        if bad:
            shown = ", ".join(map(str, bad[:12])) + (", ..." if len(bad) > 12 else "")
            raise DataError(f"label map {path} has values outside the {self.name} id space: {shown}",
                            hint=f"{self.name} label values must be {self.describe}")

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Native ids (void = 255) as an HxW uint8 array; raises DataError naming ``path`` on bad values."""
        if raw.dtype != np.uint8:
            if raw.size and (raw.min() < 0 or raw.max() > 255):
                self.check(np.unique(raw), path)
            raw = raw.astype(np.uint8)
        native = self.lut[raw]
        if (native < 0).any():
            self.check(np.unique(raw), path)
        return native.astype(np.uint8)

    def classes(self, raw: np.ndarray, path: Path) -> tuple[int, ...]:
        """Native class ids present in a raw label map (void excluded), validating every value."""
        present = np.flatnonzero(np.bincount(raw.ravel().astype(np.int64), minlength=256)) if raw.size and \
            raw.min() >= 0 else np.unique(raw)
        self.check(present, path)
        lut = self.lut
        return tuple(sorted({int(lut[v]) for v in present} - {VOID}))


def semantic_codec(name: str, valid: range, *, void_raw: tuple[int, ...] = (), shift: int = 0) -> LabelCodec:
    """Identity (or shifted) ids for ``valid`` raw values; ``void_raw`` values map to void 255."""
    mapping = {raw: raw + shift for raw in valid}
    mapping.update({raw: VOID for raw in void_raw})
    lo, hi = valid.start, valid.stop - 1
    parts = [f"{lo}..{hi}"] + [str(v) for v in void_raw]
    return LabelCodec.build(name, mapping, " or ".join(parts) + (f" (void: {', '.join(map(str, void_raw))})"
                                                                  if void_raw else ""))
