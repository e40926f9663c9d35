"""ADE20K instance segmentation: the 100 'thing' classes of Mask2Former's ``ade20k_instance_{train,val}.json``.

Layout: ``ADEChallengeData2016/ade20k_instance_{train,val}.json`` next to ``images/{training,validation}``.
Mask2Former's ``datasets/prepare_ade20k_ins_seg.py`` writes category id = SceneParse150 id - 1 and the image
file stem as image id; the reader adds 1, so classes are SceneParse150 ids (protocols.md), and
``coco_json_path`` is a converted copy with those ids. ``prepare ade-inst --download`` builds the jsons the
same way from ``annotations_instance/`` (see :mod:`benchmark.data.convert`).
"""

from __future__ import annotations

from pathlib import Path

from benchmark.errors import DataError

from .ade import FOLDER, SPLIT_DIRS
from .instance import CocoFormatDataset

NAME = "ade-inst"
PREPARE_HINT = "run `python -m benchmark.data.prepare ade-inst --root {root}` to see what is missing " \
               "(add --download to fetch and convert it)"


def expected_text(root: Path) -> str:
    return (f"{root}/{FOLDER}/ade20k_instance_{{train,val}}.json and "
            f"{root}/{FOLDER}/images/{{training,validation}}")


def locate(root: Path) -> Path:
    hint = PREPARE_HINT.format(root=root)
    if not root.is_dir():
        raise DataError(f"the data root {root} does not exist (looking for ADE20K-instance: {expected_text(root)})",
                        hint=hint)
    for folder in (root / FOLDER, root):
        if (folder / "images").is_dir() or any(folder.glob("ade20k_instance_*.json")):
            return folder
    raise DataError(f"ADE20K-instance not found under {root}: expected {expected_text(root)}", hint=hint)


def paths(folder: Path, split: str) -> tuple[Path, Path]:
    return folder / f"ade20k_instance_{split}.json", folder / "images" / SPLIT_DIRS[split]


def thing_ids() -> tuple[int, ...]:
    from protocols.datasets import ADE_THING_IDS

    return tuple(ADE_THING_IDS)


def open_ade_instance(root: Path, split: str, cache_dir=None) -> CocoFormatDataset:
    folder = locate(root)
    json_path, image_dir = paths(folder, split)
    hint = PREPARE_HINT.format(root=root)
    missing = [str(p) for p in (json_path, image_dir) if not p.exists()]
    if missing:
        raise DataError(f"ADE20K-instance under {folder} is incomplete; missing: {', '.join(missing)}", hint=hint)
    return CocoFormatDataset(NAME, split, json_path, image_dir, category_offset=1, id_space=thing_ids(),
                             cache_dir=cache_dir, root=folder, prepare_hint=hint)
