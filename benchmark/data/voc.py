"""Pascal VOC 2012 (SegmentationClassAug: train_aug 10,582 images, val 1,449), ids 0..20, void 255.

Accepted layouts under the data root (the first that exists is used):

- ``PascalVOC12/{JPEGImages,SegmentationClassAug,splits/{train_aug,val}.txt}`` (the Mask2Former-based
  continual repositories: CoMFormer, CisDQ);
- ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,ImageSets/Segmentation/{train_aug,val}.txt}``;
- the root itself holding ``JPEGImages`` (a root that *is* one of the folders above).

A list file holds one image stem per line; MiB/PLOP's ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
path pairs are accepted too (the image stem is used; labels are looked up in ``SegmentationClassAug``).
Images keep the list order (MiB's step-index files index into ``train_aug.txt`` in file order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import DataError

from .imageio import semantic_codec
from .semantic import SemanticDataset, SemanticRecord, file_stats, missing_error

NAME = "voc"
LIST_NAMES = {"train": "train_aug.txt", "val": "val.txt"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CODEC = semantic_codec(NAME, range(0, 21), void_raw=(255,))
PREPARE_HINT = "run `python -m benchmark.data.prepare voc --root {root}` to see what is missing " \
               "(add --download to fetch and convert it)"


@dataclass(frozen=True)
class VocLayout:
    folder: Path
    list_dirs: tuple[str, ...]     # where split lists are looked up, relative to ``folder``

    @property
    def images(self) -> Path:
        return self.folder / "JPEGImages"

    @property
    def labels(self) -> Path:
        return self.folder / "SegmentationClassAug"

    def list_file(self, split: str) -> Path:
        name = LIST_NAMES[split]
        candidates = [self.folder / d / name for d in self.list_dirs]
        return next((c for c in candidates if c.is_file()), candidates[0])

    def required(self) -> list[Path]:
        return [self.images, self.labels] + [self.list_file(s) for s in LIST_NAMES]


def layouts(root: Path) -> list[VocLayout]:
    return [
        VocLayout(root / "PascalVOC12", ("splits", "ImageSets/Segmentation")),
        VocLayout(root / "VOCdevkit" / "VOC2012", ("ImageSets/Segmentation", "splits")),
        VocLayout(root, ("splits", "ImageSets/Segmentation")),
    ]


def expected_text(root: Path) -> str:
    return (f"{root}/PascalVOC12/{{JPEGImages,SegmentationClassAug,splits/train_aug.txt,splits/val.txt}} or "
            f"{root}/VOCdevkit/VOC2012/{{JPEGImages,SegmentationClassAug,"
            f"ImageSets/Segmentation/train_aug.txt,ImageSets/Segmentation/val.txt}}")


def locate(root: Path) -> VocLayout:
    """The layout under ``root``; DataError naming the expected folders when none is complete enough."""
    if not root.is_dir():
        raise DataError(f"the data root {root} does not exist (looking for Pascal VOC: {expected_text(root)})",
                        hint=PREPARE_HINT.format(root=root))
    found = [lay for lay in layouts(root) if lay.images.is_dir()]
    if not found:
        raise DataError(f"Pascal VOC not found under {root}: expected {expected_text(root)}",
                        hint=PREPARE_HINT.format(root=root))
    complete = [lay for lay in found if all(p.exists() for p in lay.required())]
    return (complete or found)[0]


def read_list(path: Path) -> list[str]:
    """Image stems of a split list (``stem`` or ``/JPEGImages/stem.jpg /SegmentationClassAug/stem.png``)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split list {path}: {err}", hint="replace the file") from None
    stems = []
    for line in lines:
        if line.strip():
            first = line.split()[0]
            stems.append(os.path.splitext(os.path.basename(first))[0])
    return stems


def open_voc(root: Path, split: str, cache_dir=None) -> SemanticDataset:
    layout = locate(root)
    missing = [p for p in layout.required() if not p.exists()]
    if missing:
        raise DataError(f"Pascal VOC under {layout.folder} is incomplete; missing: "
                        + ", ".join(str(p) for p in missing),
                        hint=PREPARE_HINT.format(root=root))
    stems = read_list(layout.list_file(split))
    if not stems:
        raise DataError(f"split list {layout.list_file(split)} is empty", hint=PREPARE_HINT.format(root=root))
    images = file_stats(layout.images, IMAGE_SUFFIXES)
    labels = file_stats(layout.labels, (".png",))
    for what, table, folder in (("images", images, layout.images), ("label maps", labels, layout.labels)):
        absent = [s for s in stems if s not in table]
        if absent:
            raise missing_error(f"{what} of {layout.list_file(split).name}", folder, absent,
                                PREPARE_HINT.format(root=root))
    records = [SemanticRecord(s, layout.images / images[s][0], layout.labels / labels[s][0]) for s in stems]
    return SemanticDataset(NAME, split, records, CODEC, labels, tuple(range(21)), cache_dir, layout.folder)
