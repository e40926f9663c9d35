"""An instance-segmentation dataset read from a COCO-format json (COCO 2017, ADE20K-instance, synthetic).

Segmentations may be polygons, uncompressed RLE or compressed RLE (decoded with pycocotools). Crowd
annotations (``iscrowd = 1``) are ignored for targets and class presence; they stay in the json that
``coco_json_path`` points to, where COCOeval treats them as ignore regions.

``category_offset`` turns json category ids into native ids (ADE20K-instance stores SceneParse150 id - 1:
offset 1). When it is not 0, ``coco_json_path`` is a converted copy with native ids, written once into
the cache folder.

Image records and class presence are cached on disk (``<cache>/presence/``) keyed by the json file's
path, size and modification time, so ``len``, ``image_id`` and ``classes_in`` (all step selection needs)
do not parse a large json again; it is parsed on the first ``load``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from benchmark.errors import DataError

from .cache import cache_root, digest, read_json, write_json
from .imageio import read_image

INSTANCE = "instance"
INSTANCE_VERSION = 1


@dataclass(frozen=True)
class ImageRecord:
    image_id: Any          # int for COCO, str (the file stem) for Mask2Former's ADE20K-instance json
    file_name: str
    height: int
    width: int


def _sort_key(image_id: Any) -> tuple:
    return (0, image_id, "") if isinstance(image_id, int) else (1, 0, str(image_id))


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict | None:
    """A compressed RLE for any COCO segmentation; None for a polygon list without a valid polygon."""
    if isinstance(segm, list):
        # pycocotools cannot rasterise polygons with fewer than 3 points (detectron2 drops them too).
        polygons = [p for p in segm if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return None
        return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if isinstance(segm["counts"], list):
            return mask_util.frPyObjects(segm, height, width)
        counts = segm["counts"]
        return {"size": list(segm["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError("segmentation is neither a polygon list nor an RLE dict")


class CocoFormatDataset:
    """Images with a list of (native class id, HxW bool mask) per image (see module docstring)."""

    task = INSTANCE

    def __init__(self, name: str, split: str, json_path: Path, image_dir: Path, *, category_offset: int = 0,
                 id_space: tuple[int, ...] | None = None, cache_dir=None, root: Path | None = None,
                 prepare_hint: str = ""):
        self.name = name
        self.split = split
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.category_offset = category_offset
        self.id_space = None if id_space is None else tuple(sorted(id_space))
        self.root = root
        self._hint = prepare_hint
        self.cache_dir = cache_root(cache_dir)
        try:
            st = self.json_path.stat()
        except OSError:
            raise DataError(f"annotation file is missing: {self.json_path}", hint=prepare_hint) from None
        self.fingerprint = digest("instance", INSTANCE_VERSION, name, split, category_offset, self.id_space,
                                  str(self.json_path.resolve()), st.st_size, st.st_mtime_ns)
        self._anns: dict[Any, list[dict]] | None = None
        self._raw: dict | None = None
        cached = read_json(self._presence_file())
        if cached and cached.get("fingerprint") == self.fingerprint:
            self._images = [ImageRecord(*r) for r in cached["images"]]
            self._classes = [tuple(c) for c in cached["classes"]]
            self.class_names = {int(k): v for k, v in cached["categories"].items()}
        else:
            self._parse()
            write_json(self._presence_file(), {
                "fingerprint": self.fingerprint,
                "images": [[r.image_id, r.file_name, r.height, r.width] for r in self._images],
                "classes": [list(c) for c in self._classes],
                "categories": {str(k): v for k, v in self.class_names.items()},
            })
        self._check_image_files()

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return f"CocoFormatDataset({self.name!r}, {self.split!r}, {len(self)} images, json={str(self.json_path)!r})"

    def __getstate__(self) -> dict:
        # Never ship a raw json to worker processes (it is only held while converting).
        return {**self.__dict__, "_raw": None}

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.class_names))

    def image_id(self, i: int) -> Any:
        return self._images[i].image_id

    def image_path(self, i: int) -> Path:
        name = self._images[i].file_name
        path = self.image_dir / name
        return path if path.exists() or "/" not in name else self.image_dir / os.path.basename(name)

    def classes_in(self, i: int) -> tuple[int, ...]:
        """Native categories of the image's non-crowd instances."""
        return self._classes[i]

    def presence(self) -> list[tuple[int, ...]]:
        return self._classes

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def load_target(self, i: int, classes=None) -> list[tuple[int, np.ndarray]]:
        """[(native class id, HxW bool mask)] of the non-crowd instances (only those of ``classes`` if given)."""
        rec = self._images[i]
        out = []
        for ann in self._annotations()[rec.image_id]:
            class_id = int(ann["category_id"]) + self.category_offset
            if classes is not None and class_id not in classes:
                continue
            try:
                rle = segmentation_to_rle(ann["segmentation"], rec.height, rec.width)
            except (ValueError, TypeError, KeyError) as err:
                raise DataError(f"annotation {ann.get('id')} of image {rec.image_id!r} in {self.json_path} has an "
                                f"unreadable segmentation: {err}", hint="fix or remove that annotation") from None
            if rle is None:
                mask = np.zeros((rec.height, rec.width), dtype=bool)
            else:
                if tuple(rle["size"]) != (rec.height, rec.width):
                    raise DataError(f"annotation {ann.get('id')} in {self.json_path} is {rle['size'][1]}x"
                                    f"{rle['size'][0]} but its image {rec.file_name!r} is {rec.width}x{rec.height}",
                                    hint="the annotation does not belong to that image; fix the json")
                mask = mask_util.decode(rle).astype(bool)
            out.append((class_id, mask))
        return out

    def load(self, i: int, classes=None) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """(HxWx3 uint8 image, its instances as in :meth:`load_target`)."""
        image = self.load_image(i)
        rec = self._images[i]
        if image.shape[:2] != (rec.height, rec.width):
            raise DataError(f"image {self.image_path(i)} is {image.shape[1]}x{image.shape[0]} but {self.json_path} "
                            f"says {rec.width}x{rec.height}", hint="the image and the json do not match")
        return image, self.load_target(i, classes)

    @property
    def coco_json_path(self) -> Path:
        """A COCO-format json of this split whose image ids and category ids are native ids."""
        if self.category_offset == 0:
            return self.json_path
        path = self.cache_dir / "converted" / f"{self.name}-{self.split}-{self.fingerprint[:20]}.json"
        if not path.exists():
            data = self._raw_json()
            off = self.category_offset
            converted = dict(data)
            converted["categories"] = [{**c, "id": int(c["id"]) + off} for c in data["categories"]]
            converted["annotations"] = [{**a, "category_id": int(a["category_id"]) + off}
                                        for a in data["annotations"]]
            write_json(path, converted)
        return path

    # ---- parsing -------------------------------------------------------------------------------
    def _presence_file(self) -> Path:
        return self.cache_dir / "presence" / f"{self.name}-{self.split}-{self.fingerprint[:20]}.json"

    def _raw_json(self) -> dict:
        if self._raw is None:
            try:
                with open(self.json_path, "rb") as handle:
                    data = json.load(handle)
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read annotation file {self.json_path}: {err}",
                                hint="the file is corrupt or truncated; replace it with a fresh copy") from None
            if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                      for k in ("images", "annotations", "categories")):
                raise DataError(f"{self.json_path} is not a COCO-format instance json "
                                "(needs lists 'images', 'annotations' and 'categories')", hint=self._hint)
            self._raw = data
        return self._raw

    def _annotations(self) -> dict[Any, list[dict]]:
        if self._anns is None:
            self._parse()
        return self._anns

    def index_annotations(self) -> None:
        """Parse the json now (if the presence cache spared it so far), e.g. before forking loader workers
        so that they share one parsed copy instead of each parsing it again."""
        self._annotations()

    def _parse(self) -> None:
        data = self._raw_json()
        where = self.json_path
        off = self.category_offset
        try:
            declared = {int(c["id"]) + off: str(c.get("name", c["id"])) for c in data["categories"]}
            images = [self._image_record(im) for im in data["images"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"malformed image or category entry in {where}: missing or bad field {err}",
                            hint=self._hint) from None
        images.sort(key=lambda r: _sort_key(r.image_id))
        anns: dict[Any, list[dict]] = {r.image_id: [] for r in images}
        for ann in data["annotations"]:
            try:
                if ann.get("iscrowd", 0):
                    continue
                image_id = ann["image_id"]
                int(ann["category_id"]), ann["segmentation"]      # present and well-typed
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise DataError(f"malformed annotation {ann.get('id') if isinstance(ann, dict) else ann!r} in "
                                f"{where}: missing or bad field {err}", hint=self._hint) from None
            if image_id not in anns:
                raise DataError(f"annotation {ann.get('id')} in {where} refers to image id {image_id!r}, which is "
                                "not in 'images'", hint="the json is inconsistent; replace it")
            anns[image_id].append(ann)
        used = {int(a["category_id"]) + off for group in anns.values() for a in group}
        undeclared = sorted(used - set(declared))
        if undeclared:
            raise DataError(f"{where} has annotations with category ids outside its categories: "
                            f"{', '.join(str(c - off) for c in undeclared[:12])}",
                            hint=f"declared category ids: {', '.join(str(c - off) for c in sorted(declared)[:12])}"
                                 + (", ..." if len(declared) > 12 else ""))
        if self.id_space is not None:
            outside = sorted(used - set(self.id_space))
            if outside:
                raise DataError(f"{where} has annotations with categories outside the {self.name} id space: "
                                f"{', '.join(str(c - off) for c in outside[:12])}"
                                + (f" (native ids {', '.join(map(str, outside[:12]))})" if off else ""),
                                hint=f"{self.name} native class ids are {len(self.id_space)} ids from "
                                     f"{self.id_space[0]} to {self.id_space[-1]} (protocols.md)"
                                     + (f"; the json stores native id - {off}" if off else ""))
            declared = {c: n for c, n in declared.items() if c in set(self.id_space)}
        self.class_names = dict(sorted(declared.items()))
        self._images = images
        self._anns = anns
        self._classes = [tuple(sorted({int(a["category_id"]) + off for a in anns[r.image_id]})) for r in images]
        self._raw = None        # the annotations are kept in ``anns``; the rest of the json is not needed

    def _image_record(self, entry: dict) -> ImageRecord:
        """A json image entry; height / width are read from the image file when the json omits them."""
        if "height" in entry and "width" in entry:
            return ImageRecord(entry["id"], str(entry["file_name"]), int(entry["height"]), int(entry["width"]))
        record = ImageRecord(entry["id"], str(entry["file_name"]), 0, 0)
        path = self.image_dir / record.file_name
        try:
            with Image.open(path) as im:
                width, height = im.size
        except OSError as err:
            raise DataError(f"{self.json_path} gives no size for image {record.file_name!r} and the image cannot be "
                            f"read: {err}", hint=self._hint) from None
        return ImageRecord(record.image_id, record.file_name, height, width)

    def _check_image_files(self) -> None:
        if not self.image_dir.is_dir():
            raise DataError(f"image folder is missing: {self.image_dir} (images of {self.json_path.name})",
                            hint=self._hint)
        present = set(os.listdir(self.image_dir))
        absent = [r.file_name for r in self._images
                  if os.path.basename(r.file_name) not in present and not (self.image_dir / r.file_name).exists()]
        if absent:
            shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            raise DataError(f"{len(absent)} images of {self.json_path.name} are missing in {self.image_dir}: {shown}",
                            hint=self._hint)
