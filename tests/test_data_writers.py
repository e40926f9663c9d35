"""Writers of tiny datasets in the real on-disk formats, shared by the tests/test_data_*.py files.

Each writer returns the ground truth it wrote so that tests compare the readers against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

VOC_PALETTE = [0, 0, 0] + [(37 * i) % 256 for i in range(3, 768)]


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_jpg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def save_label(path: Path, label: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(label, dtype=np.uint8)
    if palette:     # class ids are the palette indices, as in VOC's SegmentationClass PNGs
        im = Image.frombytes("P", (data.shape[1], data.shape[0]), data.tobytes())
        im.putpalette(VOC_PALETTE)
    else:
        im = Image.fromarray(data, mode="L")
    im.save(path)


def block_label(classes: list[int], height: int = 20, width: int = 24, fill: int = 0, void_border: bool = True):
    """A label map with one vertical band per class, ``fill`` elsewhere and an optional void border."""
    label = np.full((height, width), fill, np.uint8)
    for k, c in enumerate(classes):
        label[2:height - 2, 2 + 4 * k: 5 + 4 * k] = c
    if void_border:
        label[0, :] = 255
    return label


def write_voc(root: Path, train: dict[str, list[int]], val: dict[str, list[int]], *, layout: str = "PascalVOC12",
              palette: bool = True, pairs: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """VOC with one image per stem; ``train``/``val`` map stem -> classes drawn on background 0."""
    rng = np.random.default_rng(seed)
    folder = root / "PascalVOC12" if layout == "PascalVOC12" else root / "VOCdevkit" / "VOC2012"
    lists = folder / ("splits" if layout == "PascalVOC12" else "ImageSets/Segmentation")
    lists.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split_file, split in (("train_aug.txt", train), ("val.txt", val)):
        lines = []
        for stem, classes in split.items():
            label = block_label(classes)
            save_jpg(folder / "JPEGImages" / f"{stem}.jpg", random_image(rng, *label.shape))
            save_label(folder / "SegmentationClassAug" / f"{stem}.png", label, palette)
            labels[stem] = label
            lines.append(f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png" if pairs else stem)
        (lists / split_file).write_text("\n".join(lines) + "\n")
    return labels


def write_ade(root: Path, train: dict[str, list[int]], val: dict[str, list[int]], *, detectron2: bool = False,
              seed: int = 0) -> dict[str, np.ndarray]:
    """ADEChallengeData2016 with raw PNGs (0 = other) or annotations_detectron2 (id - 1, 255 = void)."""
    rng = np.random.default_rng(seed)
    folder = root / "ADEChallengeData2016"
    labels = {}
    for dirname, split in (("training", train), ("validation", val)):
        for stem, classes in split.items():
            native = block_label(classes, fill=0, void_border=False)          # raw: 0 = other
            save_jpg(folder / "images" / dirname / f"{stem}.jpg", random_image(rng, *native.shape))
            if detectron2:
                stored = np.where(native == 0, 255, native.astype(np.int64) - 1).astype(np.uint8)
                save_label(folder / "annotations_detectron2" / dirname / f"{stem}.png", stored, palette=False)
            else:
                save_label(folder / "annotations" / dirname / f"{stem}.png", native, palette=False)
            labels[stem] = np.where(native == 0, 255, native)
    return labels


def polygon_of_box(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_coco_json(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def instance_annotations(image_id, height: int, width: int, objects: list[tuple[int, tuple, str]], first_id: int,
                         crowd: set[int] = frozenset()) -> tuple[list[dict], list[tuple[int, np.ndarray]]]:
    """COCO annotations for boxes ``(category, (x0, y0, x1, y1), kind)``, kind in polygon / rle / rle-raw.

    Returns (annotations, [(category, expected bool mask)] of the non-crowd objects).
    """
    anns, expected = [], []
    for k, (category, (x0, y0, x1, y1), kind) in enumerate(objects):
        mask = np.zeros((height, width), bool)
        if kind == "polygon":
            segm = [polygon_of_box(x0, y0, x1, y1)]
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(segm, height, width))).astype(bool)
        else:
            mask[y0:y1, x0:x1] = True
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            if kind == "rle":
                segm = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            else:   # uncompressed RLE: run lengths in column-major order, starting with zeros
                flat = mask.T.ravel().astype(np.uint8)
                runs, current, count = [], 0, 0
                for v in flat:
                    if v == current:
                        count += 1
                    else:
                        runs.append(count)
                        current, count = v, 1
                runs.append(count)
                segm = {"size": [height, width], "counts": runs}
        is_crowd = k in crowd
        anns.append({"id": first_id + k, "image_id": image_id, "category_id": category, "iscrowd": int(is_crowd),
                     "segmentation": segm, "area": int(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0]})
        if not is_crowd:
            expected.append((category, mask))
    return anns, expected


def write_coco(root: Path, split_objects: dict[str, dict[int, list]], crowd: dict[int, set] | None = None,
               seed: int = 0, size: tuple[int, int] = (24, 32)) -> dict[int, list[tuple[int, np.ndarray]]]:
    """``coco/{split}2017`` images + ``coco/annotations/instances_{split}2017.json``; ids are COCO ids."""
    rng = np.random.default_rng(seed)
    crowd = crowd or {}
    categories = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in (1, 2, 3, 18, 62, 90)]
    truth = {}
    for split, objects_by_image in split_objects.items():
        images, annotations = [], []
        for image_id, objects in objects_by_image.items():
            h, w = size
            name = f"{image_id:012d}.jpg"
            save_jpg(root / "coco" / f"{split}2017" / name, random_image(rng, h, w))
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            anns, expected = instance_annotations(image_id, h, w, objects, len(annotations) + 1,
                                                  crowd.get(image_id, set()))
            annotations += anns
            truth[image_id] = expected
        write_coco_json(root / "coco" / "annotations" / f"instances_{split}2017.json", images, annotations, categories)
    return truth


def write_ade_instance(root: Path, split_objects: dict[str, dict[str, list]], seed: int = 0,
                       size: tuple[int, int] = (20, 28)) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Mask2Former's ade20k_instance_{train,val}.json: category id = SceneParse150 id - 1, image id = stem.

    Objects are given with SceneParse150 ids; the truth returned uses them too.
    """
    rng = np.random.default_rng(seed)
    folder = root / "ADEChallengeData2016"
    from protocols.datasets import ADE_NAMES, ADE_THING_IDS

    categories = [{"id": sem - 1, "name": ADE_NAMES[sem - 1]} for sem in ADE_THING_IDS]
    truth = {}
    for split, objects_by_image in split_objects.items():
        dirname = "training" if split == "train" else "validation"
        images, annotations = [], []
        for stem, objects in objects_by_image.items():
            h, w = size
            save_jpg(folder / "images" / dirname / f"{stem}.jpg", random_image(rng, h, w))
            images.append({"id": stem, "file_name": f"{stem}.jpg", "height": h, "width": w})
            stored = [(c - 1, box, kind) for c, box, kind in objects]
            anns, expected = instance_annotations(stem, h, w, stored, len(annotations) + 1)
            annotations += anns
            truth[stem] = [(c + 1, m) for c, m in expected]
        write_coco_json(folder / f"ade20k_instance_{split}.json", images, annotations, categories)
    return truth


def test_writers_produce_the_real_formats(tmp_path):
    labels = write_voc(tmp_path, {"a": [1, 2]}, {"b": [3]}, palette=True)
    with Image.open(tmp_path / "PascalVOC12" / "SegmentationClassAug" / "a.png") as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), labels["a"])
    write_ade(tmp_path, {"ADE_train_1": [5]}, {"ADE_val_1": [7]})
    with Image.open(tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_1.png") as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 5}
    truth = write_coco(tmp_path, {"val": {7: [(1, (2, 3, 10, 12), "polygon"), (2, (4, 4, 9, 9), "rle-raw")]}})
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    assert isinstance(data["annotations"][1]["segmentation"]["counts"], list)
    decoded = mask_util.decode(mask_util.frPyObjects(data["annotations"][1]["segmentation"], 24, 32)).astype(bool)
    assert np.array_equal(decoded, truth[7][1][1])
