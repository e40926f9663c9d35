"""Conversions that turn official archives into what the readers need (run by ``prepare --download``).

- VOC ``train_aug.txt``: the 10,582 SegmentationClassAug stems that are not in VOC's ``val.txt``
  (SegmentationClassAug holds train_aug + val = 12,031 label maps), sorted, written next to ``val.txt``.
- ADE20K-instance jsons: ``ade20k_instance_{train,val}.json`` from the Places Challenge 2017
  ``annotations_instance/`` PNGs, as Mask2Former's ``datasets/prepare_ade20k_ins_seg.py`` builds them:
  R channel = Instance100 category (1..100), G channel = instance id (0 = none); one RLE annotation per
  instance id; category id = SceneParse150 id - 1 through Mask2Former's
  ``ade20k_instance_catid_mapping.txt``, which maps Instance100 category i to the i-th thing class in
  ascending SceneParse150 order (``protocols.datasets.ADE_THING_IDS``); image id = file stem.
- ADE20K panoptic: ``ade20k_panoptic_{train,val}.json`` + ``ade20k_panoptic_{train,val}/`` PNGs, the files
  Mask2Former's ``datasets/prepare_ade20k_pan_seg.py`` (L330-470) writes, from the semantic ``annotations/``
  and the instance ``annotations_instance/`` PNGs: first one segment per *stuff* class of the semantic map
  (value - 1 = SceneParse150 index; thing classes of the semantic map are skipped, so a thing pixel without
  an instance is VOID), then one segment per instance id of the instance PNG, painted over the stuff, with
  the category of its Instance100 id mapped to SceneParse150 (category ids 0..149, ``isthing`` for the 100
  instance classes, as the original). Three documented differences, none of which changes what panopticapi
  scores: segment ids are ``(category + 1) * 1000 + k`` (k = 0 for stuff, the instance number for things)
  instead of panopticapi's random ``IdGenerator`` colours, so the files are reproducible byte for byte;
  areas and boxes are computed on the final PNG (the original computes a stuff area before the things
  cover part of it), and a segment with no pixel left is not listed (the original would list it, and
  panopticapi would count it as a false negative); the images are those with both annotation PNGs (the
  original lists those of ``ade20k_instance_imgCatIds.json``, the same set in the official archives).
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



def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _read_png(path: Path, what: str, hint: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{what} is missing: {path}", hint=hint) from None
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err}", hint="replace it with a fresh copy") from None


def ade_panoptic_image(semantic: np.ndarray, instance: np.ndarray, category_of: dict[int, int],
                       things: frozenset[int], where: Path) -> tuple[np.ndarray, list[dict]]:
    """(segment-id map, segments_info) of one image (the module doc's ADE20K panoptic conversion).

    ``semantic`` [H, W] SceneParse150 values (0 = void), ``instance`` [H, W, 3] (R = Instance100 id, G = instance
    id), ``category_of`` Instance100 id -> 0-based SceneParse150 index, ``things`` the 0-based thing indices."""
    if semantic.ndim != 2 or instance.ndim != 3 or semantic.shape != instance.shape[:2]:
        raise DataError(f"the semantic and instance annotations of {where.name} differ in size or format "
                        f"({semantic.shape} vs {instance.shape})", hint="re-extract both archives")
    ids = np.zeros(semantic.shape, np.int64)
    for value in np.unique(semantic):
        category = int(value) - 1
        if category < 0 or category in things:
            continue
        if category >= 150:
            raise DataError(f"semantic annotation {where} has value {value}; SceneParse150 uses 0..150",
                            hint="the file is not an ADEChallengeData2016 annotation")
        ids[semantic == value] = (category + 1) * 1000
    for inst in np.unique(instance[..., 1]):
        if inst == 0:
            continue
        mask = instance[..., 1] == inst
        cats = np.unique(instance[..., 0][mask])
        if len(cats) != 1 or int(cats[0]) not in category_of:
            raise DataError(f"instance {inst} of {where} has category value(s) {cats.tolist()}; expected one "
                            f"Instance100 category in 1..{len(category_of)}",
                            hint="the file is not a Places Challenge 2017 instance annotation")
        ids[mask] = (category_of[int(cats[0])] + 1) * 1000 + int(inst)
    segments = []
    for segment_id in np.unique(ids):
        if segment_id == 0:
            continue
        mask = ids == segment_id
        segments.append({"id": int(segment_id), "category_id": int(segment_id // 1000 - 1), "iscrowd": 0,
                         "area": int(mask.sum()), "bbox": _bbox(mask)})
    return ids, segments


def ade_panoptic(ade_folder: Path, split: str, progress: bool = True) -> Path:
    """Write ``ADEChallengeData2016/ade20k_panoptic_<split>.json`` and its PNG folder; returns the json's path.

    The PNGs are written first and the json last (atomically), so an interrupted conversion leaves no json
    and the next ``prepare`` redoes it."""
    from protocols.datasets import ADE_NAMES, ADE_THING_IDS

    from .panoptic import panoptic_json, write_id_png

    dirname = {"train": "training", "val": "validation"}[split]
    image_dir, semantic_dir = ade_folder / "images" / dirname, ade_folder / "annotations" / dirname
    instance_dir = ade_folder / "annotations_instance" / dirname
    out_dir = ade_folder / f"ade20k_panoptic_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    category_of = {c["instance_category"]: c["id"] for c in ade_instance_categories()}
    things = frozenset(t - 1 for t in ADE_THING_IDS)
    categories = [{"id": k, "name": ADE_NAMES[k], "isthing": int(k in things)} for k in range(150)]
    names = sorted(n for n in os.listdir(image_dir) if n.endswith(".jpg")
                   and (instance_dir / n.replace(".jpg", ".png")).exists())
    hint = "re-extract ADEChallengeData2016.zip and annotations_instance.tar"
    images, annotations = [], []
    for name in tqdm(names, desc=f"ade20k_panoptic_{split}", unit="img", disable=not progress):
        stem = os.path.splitext(name)[0]
        semantic = _read_png(semantic_dir / f"{stem}.png", "semantic annotation", hint)
        instance = _read_png(instance_dir / f"{stem}.png", "instance annotation", hint)
        ids, segments = ade_panoptic_image(semantic, instance, category_of, things, instance_dir / f"{stem}.png")
        write_id_png(out_dir / f"{stem}.png", ids)
        images.append({"id": stem, "file_name": name, "width": int(ids.shape[1]), "height": int(ids.shape[0])})
        annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments})
    out = ade_folder / f"ade20k_panoptic_{split}.json"
    write_json(out, panoptic_json(images, annotations, categories))
    return out
