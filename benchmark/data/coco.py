"""COCO 2017 instance segmentation (80 categories, ids 1..90 with gaps; crowd annotations ignored).

Layout: ``coco/{train2017,val2017}/*.jpg`` and ``coco/annotations/instances_{train,val}2017.json``
(polygons and RLE). A root that *is* the ``coco`` folder is accepted too. Images are ordered by image id
(detectron2's order); ``image_id`` is the COCO image id and ``coco_json_path`` the original json.
"""

from __future__ import annotations

from pathlib import Path

from benchmark.errors import DataError

from .instance import CocoFormatDataset

NAME = "coco"
FOLDER = "coco"
PREPARE_HINT = "run `python -m benchmark.data.prepare coco --root {root}` to see what is missing " \
               "(add --download to fetch it)"


def expected_text(root: Path) -> str:
    return f"{root}/{FOLDER}/{{train2017,val2017}} and {root}/{FOLDER}/annotations/instances_{{train,val}}2017.json"


def locate(root: Path) -> Path:
    hint = PREPARE_HINT.format(root=root)
    if not root.is_dir():
        raise DataError(f"the data root {root} does not exist (looking for COCO: {expected_text(root)})", hint=hint)
    for folder in (root / FOLDER, root):
        if (folder / "annotations").is_dir():
            return folder
    raise DataError(f"COCO not found under {root}: expected {expected_text(root)}", hint=hint)


def paths(folder: Path, split: str) -> tuple[Path, Path]:
    """(instance json, image folder) of a split."""
    return folder / "annotations" / f"instances_{split}2017.json", folder / f"{split}2017"


def coco_ids() -> tuple[int, ...]:
    from protocols.datasets import COCO_NAMES

    return tuple(i for i, _ in COCO_NAMES)


def open_coco(root: Path, split: str, cache_dir=None) -> CocoFormatDataset:
    folder = locate(root)
    json_path, image_dir = paths(folder, split)
    hint = PREPARE_HINT.format(root=root)
    missing = [str(p) for p in (json_path, image_dir) if not p.exists()]
    if missing:
        raise DataError(f"COCO under {folder} is incomplete; missing: {', '.join(missing)}", hint=hint)
    return CocoFormatDataset(NAME, split, json_path, image_dir, id_space=coco_ids(), cache_dir=cache_dir,
                             root=folder, prepare_hint=hint)
