"""ADE20K / SceneParse150 (20,210 train, 2,000 val images), native ids 1..150, void 255.

Layout: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with either the raw annotation PNGs
``annotations/{training,validation}/*.png`` (values 0..150, 0 = 'other' -> void 255) or Mask2Former's
``annotations_detectron2/`` (values 0..149 -> ids 1..150, 255 = void). The raw folder wins when both
exist. Images are in sorted file-name order (the order MiB's and CoMFormer's step-index files assume).

The synthetic dataset is written in this layout with K classes and read by the same code
(``num_classes=K``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import DataError

from .imageio import semantic_codec
from .semantic import SemanticDataset, SemanticRecord, file_stats, missing_error

FOLDER = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PREPARE_HINT = "run `python -m benchmark.data.prepare {dataset} --root {root}` to see what is missing " \
               "(add --download to fetch it)"


@dataclass(frozen=True)
class AdeLayout:
    folder: Path

    def images(self, split: str) -> Path:
        return self.folder / "images" / SPLIT_DIRS[split]

    def raw_annotations(self, split: str) -> Path:
        return self.folder / "annotations" / SPLIT_DIRS[split]

    def detectron2_annotations(self, split: str) -> Path:
        return self.folder / "annotations_detectron2" / SPLIT_DIRS[split]

    def annotations(self, split: str) -> Path | None:
        for folder in (self.raw_annotations(split), self.detectron2_annotations(split)):
            if folder.is_dir():
                return folder
        return None


def expected_text(root: Path) -> str:
    return (f"{root}/{FOLDER}/images/{{training,validation}} and {root}/{FOLDER}/annotations/"
            f"{{training,validation}} (or annotations_detectron2/)")


def locate(root: Path, dataset: str = "ade") -> AdeLayout:
    hint = PREPARE_HINT.format(dataset=dataset, root=root)
    if not root.is_dir():
        raise DataError(f"the data root {root} does not exist (looking for ADE20K: {expected_text(root)})",
                        hint=hint)
    for folder in (root / FOLDER, root):
        if (folder / "images").is_dir():
            return AdeLayout(folder)
    raise DataError(f"ADE20K not found under {root}: expected {expected_text(root)}", hint=hint)


def codecs(num_classes: int, name: str):
    """(raw codec, annotations_detectron2 codec) for ids 1..num_classes."""
    raw = semantic_codec(name, range(1, num_classes + 1), void_raw=(0,))
    d2 = semantic_codec(f"{name} (annotations_detectron2)", range(0, num_classes), void_raw=(255,), shift=1)
    return raw, d2


def open_ade(root: Path, split: str, cache_dir=None, *, num_classes: int = 150, name: str = "ade",
             dataset: str = "ade") -> SemanticDataset:
    hint = PREPARE_HINT.format(dataset=dataset, root=root)
    layout = locate(root, dataset)
    images_dir, labels_dir = layout.images(split), layout.annotations(split)
    missing = [str(p) for p in (images_dir,) if not p.is_dir()]
    if labels_dir is None:
        missing.append(f"{layout.raw_annotations(split)} (or {layout.detectron2_annotations(split)})")
    if missing:
        raise DataError(f"ADE20K under {layout.folder} is incomplete; missing: {', '.join(missing)}", hint=hint)
    images = file_stats(images_dir, IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images (*.jpg) in {images_dir}", hint=hint)
    labels = file_stats(labels_dir, (".png",))
    stems = sorted(images)
    absent = [s for s in stems if s not in labels]
    if absent:
        raise missing_error("annotation PNGs", labels_dir, [f"{s}.png" for s in absent], hint)
    raw_codec, d2_codec = codecs(num_classes, name)
    codec = raw_codec if labels_dir == layout.raw_annotations(split) else d2_codec
    records = [SemanticRecord(s, images_dir / images[s][0], labels_dir / labels[s][0]) for s in stems]
    return SemanticDataset(name, split, records, codec, labels, tuple(range(1, num_classes + 1)), cache_dir,
                           layout.folder)
