"""Conversions that turn official archives into what the readers need (run by ``prepare --download``).

- VOC ``train_aug.txt``: the 10,582 SegmentationClassAug stems that are not in VOC's ``val.txt``
  (SegmentationClassAug holds train_aug + val = 12,031 label maps), sorted, written next to ``val.txt``.
- ADE20K-instance jsons: ``ade20k_instance_{train,val}.json`` from the Places Challenge 2017
  ``annotations_instance/`` PNGs, as Mask2Former's ``datasets/prepare_ade20k_ins_seg.py`` builds them:
  R channel = Instance100 category (1..100), G channel = instance id (0 = none); one RLE annotation per
  instance id; category id = SceneParse150 id - 1 through Mask2Former's
  ``ade20k_instance_catid_mapping.txt``, which maps Instance100 category i to the i-th thing class in
  ascending SceneParse150 order (``protocols.datasets.ADE_THING_IDS``); image id = file stem.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

from benchmark.errors import DataError

from .cache import write_json
from .voc import read_list


def voc_train_aug_list(val_list: Path, labels_dir: Path) -> Path:
    """Write ``train_aug.txt`` next to ``val_list``: the label stems of ``labels_dir`` not in val; returns its path."""
    out = val_list.parent / "train_aug.txt"
    val = set(read_list(val_list))
    labels = sorted(os.path.splitext(n)[0] for n in os.listdir(labels_dir) if n.endswith(".png"))
    stems = [s for s in labels if s not in val]
    if not stems:
        raise DataError(f"no label map in {labels_dir} is outside {val_list}",
                        hint="SegmentationClassAug looks incomplete; delete it and run prepare --download again")
    tmp = out.with_suffix(".txt.tmp")
    tmp.write_text("".join(f"{s}\n" for s in stems))
    os.replace(tmp, out)
    return out


def ade_instance_categories() -> list[dict]:
    from protocols.datasets import ADE_NAMES, ADE_THING_IDS

    return [{"id": sem - 1, "name": ADE_NAMES[sem - 1], "instance_category": k + 1}
            for k, sem in enumerate(ADE_THING_IDS)]


def ade_instance_annotations(path: Path, image_id: str, first_ann_id: int, category_of: dict[int, int]) -> list[dict]:
    """COCO annotations (RLE) of one Places Challenge instance PNG."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                raise DataError(f"instance annotation {path} is a {im.mode} image; expected RGB "
                                "(R = category, G = instance id)", hint="replace it with the file from the archive")
            png = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"instance annotation is missing: {path}",
                        hint="re-extract annotations_instance.tar into ADEChallengeData2016/") from None
    except OSError as err:
        raise DataError(f"cannot read instance annotation {path}: {err}", hint="replace it with a fresh copy") from None
    categories, instances = png[..., 0], png[..., 1]
    annotations = []
    for inst in np.unique(instances):
        if inst == 0:
            continue
        mask = instances == inst
        cats = np.unique(categories[mask])
        if len(cats) != 1 or int(cats[0]) not in category_of:
            raise DataError(f"instance {inst} of {path} has category value(s) {cats.tolist()}; expected one "
                            f"Instance100 category in 1..{len(category_of)}",
                            hint="the file is not a Places Challenge 2017 instance annotation")
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({
            "id": first_ann_id + len(annotations), "image_id": image_id, "iscrowd": 0,
            "category_id": category_of[int(cats[0])],
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)),
        })
    return annotations


def ade_instance_json(ade_folder: Path, split: str, progress: bool = True) -> Path:
    """Write ``ADEChallengeData2016/ade20k_instance_<split>.json``; returns its path."""
    dirname = {"train": "training", "val": "validation"}[split]
    image_dir = ade_folder / "images" / dirname
    instance_dir = ade_folder / "annotations_instance" / dirname
    categories = ade_instance_categories()
    category_of = {c["instance_category"]: c["id"] for c in categories}
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".jpg"))
    images, annotations = [], []
    for name in tqdm(names, desc=f"ade20k_instance_{split}.json", unit="img", disable=not progress):
        stem = os.path.splitext(name)[0]
        with Image.open(image_dir / name) as im:
            width, height = im.size
        images.append({"id": stem, "file_name": name, "width": width, "height": height})
        annotations += ade_instance_annotations(instance_dir / f"{stem}.png", stem, len(annotations) + 1, category_of)
    out = ade_folder / f"ade20k_instance_{split}.json"
    write_json(out, {"images": images, "annotations": annotations,
                     "categories": [{"id": c["id"], "name": c["name"]} for c in categories]})
    return out

