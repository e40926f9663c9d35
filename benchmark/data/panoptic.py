"""A panoptic dataset in COCO panoptic format (COCO 2017 panoptic, ADE20K panoptic, the synthetic one).

The format (cocodataset/panopticapi ``README.md``; ``panopticapi/utils.py`` ``rgb2id`` L73-79): a json with
``images`` (id, file_name, height, width), ``annotations`` (one per image: ``image_id``, ``file_name`` of
its PNG, ``segments_info`` = [{id, category_id, iscrowd, area, bbox}]) and ``categories`` (id, name,
isthing); a PNG per image whose RGB colour encodes the segment id ``R + 256 G + 256^2 B``, 0 = VOID
(unlabelled). Crowd segments (``iscrowd = 1``) are no training target and no class presence; at evaluation
they are ignore regions (benchmark.metrics.pq), as panopticapi treats them.

Layouts: COCO ``coco/annotations/panoptic_{train,val}2017.json`` + ``coco/panoptic_{train,val}2017/`` PNGs
(images in ``coco/{train,val}2017/``); ADE20K as Mask2Former's ``datasets/prepare_ade20k_pan_seg.py``
writes it: ``ADEChallengeData2016/ade20k_panoptic_{train,val}.json`` + ``ade20k_panoptic_{train,val}/``
(images in ``ADEChallengeData2016/images/{training,validation}/``). Category ids are native ids (COCO: the
json's ids 1..200); ``category_offset`` turns json ids into native ids: Mask2Former's ADE converter writes
the SceneParse150 index 0..149 (``prepare_ade20k_pan_seg.py`` L357-365, 0 = wall), so ``ade-pan`` reads it with
offset 1 to the harness's ADE ids 1..150, as ``ade-inst`` does; its things are the 100 classes of
``ade20k_instance_catid_mapping.txt`` (L345-354, ``isthing = cat_id in map_id.values()``).

Image records, class presence and categories are cached on disk keyed by the json's path, size and
modification time (as :mod:`benchmark.data.instance`), so step selection does not parse a large json again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from benchmark.errors import DataError
from benchmark.metrics.pq import VOID, Segment

from .cache import cache_root, digest, read_json, write_json
from .decoded import DecodedMemo
from .imageio import read_image

PANOPTIC = "panoptic"
PANOPTIC_VERSION = 1


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] int64 segment ids (``R + 256 G + 256^2 B``)."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] segment ids (< 256^3) -> [H, W, 3] uint8 colours (inverse of :func:`rgb_to_id`)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise ValueError("segment ids must be in [0, 256^3)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def write_id_png(path: Path, ids: np.ndarray) -> None:
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(path)


def read_id_png(path: Path) -> np.ndarray:
    """The segment-id map of a COCO-panoptic PNG; DataError naming the file when it is missing or corrupt."""
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise DataError(f"panoptic PNG {path} is a {im.mode} image; expected RGB-encoded segment ids",
                                hint="the file is not a COCO-panoptic PNG; re-create it")
            rgb = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"panoptic PNG is missing: {path}", hint="re-extract the panoptic annotations") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read panoptic PNG {path}: {err}",
                        hint="the file is corrupt or truncated; replace it with a fresh copy") from None
    return rgb_to_id(rgb)


@dataclass(frozen=True)
class PanopticTarget:
    """One image's panoptic ground truth: ``ids`` [H, W] int64 segment ids (0 = VOID) and its segments."""

    ids: np.ndarray
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class PanopticRecord:
    image_id: Any
    file_name: str          # the image
    png_name: str           # its segment-id PNG
    height: int
    width: int


class PanopticDataset:
    """A COCO-panoptic-format split (module doc). ``load(i)`` -> (image, :class:`PanopticTarget`)."""

    task = PANOPTIC

    def __init__(self, name: str, split: str, json_path: Path, png_dir: Path, image_dir: Path, *,
                 category_offset: int = 0, cache_dir=None, prepare_hint: str = ""):
        self.name, self.split = name, split
        self.category_offset = category_offset
        self.json_path, self.png_dir, self.image_dir = Path(json_path), Path(png_dir), Path(image_dir)
        self._hint = prepare_hint
        self.cache_dir = cache_root(cache_dir)
        try:
            st = self.json_path.stat()
        except OSError:
            raise DataError(f"panoptic annotation file is missing: {self.json_path}", hint=prepare_hint) from None
        self.fingerprint = digest(PANOPTIC, PANOPTIC_VERSION, name, split, category_offset,
                                  str(self.json_path.resolve()), st.st_size, st.st_mtime_ns)
        self._segments: dict[Any, tuple[Segment, ...]] | None = None
        self._decoded = DecodedMemo()
        cached = read_json(self._presence_file())
        if cached and cached.get("fingerprint") == self.fingerprint:
            self._images = [PanopticRecord(*r) for r in cached["images"]]
            self._classes = [tuple(c) for c in cached["classes"]]
            self.categories = {int(k): (v[0], bool(v[1])) for k, v in cached["categories"].items()}
        else:
            self._parse()
            write_json(self._presence_file(), {
                "fingerprint": self.fingerprint,
                "images": [[r.image_id, r.file_name, r.png_name, r.height, r.width] for r in self._images],
                "classes": [list(c) for c in self._classes],
                "categories": {str(k): [n, t] for k, (n, t) in self.categories.items()},
            })

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return f"PanopticDataset({self.name!r}, {self.split!r}, {len(self)} images, json={str(self.json_path)!r})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_segments": None}     # workers re-read the json lazily

    # ---- the common dataset interface (benchmark.data.registry) -------------------------------
    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.categories))

    @property
    def class_names(self) -> dict[int, str]:
        return {k: n for k, (n, _) in self.categories.items()}

    @property
    def thing_ids(self) -> frozenset[int]:
        return frozenset(k for k, (_, thing) in self.categories.items() if thing)

    def image_id(self, i: int) -> Any:
        return self._images[i].image_id

    def image_path(self, i: int) -> Path:
        return self.image_dir / self._images[i].file_name

    def png_path(self, i: int) -> Path:
        return self.png_dir / self._images[i].png_name

    def classes_in(self, i: int) -> tuple[int, ...]:
        """Native categories of the image's non-crowd segments."""
        return self._classes[i]

    def presence(self) -> list[tuple[int, ...]]:
        return self._classes

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def load_target(self, i: int) -> PanopticTarget:
        """The segment-id map and segments of image ``i``, checked against each other."""
        rec = self._images[i]
        path = self.png_path(i)
        ids = read_id_png(path)
        if ids.shape != (rec.height, rec.width):
            raise DataError(f"panoptic PNG {path} is {ids.shape[1]}x{ids.shape[0]} but {self.json_path} says "
                            f"{rec.width}x{rec.height}", hint="the PNG and the json do not match")
        segments = self._segment_table()[rec.image_id]
        known = {s.id for s in segments}
        present = set(np.unique(ids).tolist()) - {VOID}
        missing = sorted(present - known)
        if missing:
            raise DataError(f"panoptic PNG {path} has segment id(s) {missing[:5]} that {self.json_path} does not "
                            f"list for image {rec.image_id!r}", hint="the PNG and the json do not match; re-create "
                                                                     "the panoptic annotations")
        return PanopticTarget(ids, tuple(s for s in segments if s.id in present))

    def keep_decoded(self) -> None:
        """Decode each image once and keep it (benchmark.data.decoded): for a split that fits in memory."""
        self._decoded.enable()

    def load(self, i: int) -> tuple[np.ndarray, PanopticTarget]:
        """(HxWx3 uint8 image, its target), checked against the json; read-only arrays."""
        return self._decoded.get(i, lambda: self._decode(i))

    def _decode(self, i: int) -> tuple[np.ndarray, PanopticTarget]:
        image = self.load_image(i)
        rec = self._images[i]
        if image.shape[:2] != (rec.height, rec.width):
            raise DataError(f"image {self.image_path(i)} is {image.shape[1]}x{image.shape[0]} but {self.json_path} "
                            f"says {rec.width}x{rec.height}", hint="the image and the json do not match")
        return image, self.load_target(i)

    # ---- parsing ---------------------------------------------------------------------------------
    def _presence_file(self) -> Path:
        return self.cache_dir / "presence" / f"{self.name}-{self.split}-{self.fingerprint[:20]}.json"

    def _raw(self) -> dict:
        try:
            with open(self.json_path, "rb") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read panoptic annotation file {self.json_path}: {err}",
                            hint="the file is corrupt or truncated; replace it with a fresh copy") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                  for k in ("images", "annotations", "categories")):
            raise DataError(f"{self.json_path} is not a COCO-panoptic json (needs the lists images, annotations, "
                            "categories)", hint=self._hint or "point the reader at the panoptic json")
        return data

    def _parse(self) -> None:
        data = self._raw()
        try:
            off = self.category_offset
            self.categories = {int(c["id"]) + off: (str(c["name"]), bool(c.get("isthing", 0)))
                               for c in data["categories"]}
            by_image = {a["image_id"]: a for a in data["annotations"]}
            records, classes = [], []
            for im in sorted(data["images"], key=lambda m: str(m["file_name"])):
                ann = by_image.get(im["id"])
                if ann is None:
                    continue          # an image without panoptic annotation is not part of the split
                records.append(PanopticRecord(im["id"], str(im["file_name"]), str(ann["file_name"]),
                                              int(im["height"]), int(im["width"])))
                classes.append(tuple(sorted({int(s["category_id"]) + off for s in ann["segments_info"]
                                             if not s.get("iscrowd", 0)})))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{self.json_path} has a malformed entry: {err!r}",
                            hint="every image needs id/file_name/height/width, every annotation image_id/"
                                 "file_name/segments_info") from None
        unknown = sorted({c for cs in classes for c in cs} - set(self.categories))
        if unknown:
            raise DataError(f"{self.json_path} uses category id(s) {unknown[:5]} that its categories do not list",
                            hint="fix the json's categories")
        self._images, self._classes = records, classes

    def _segment_table(self) -> Mapping[Any, tuple[Segment, ...]]:
        if self._segments is None:
            self._segments = {
                a["image_id"]: tuple(Segment(int(s["id"]), int(s["category_id"]) + self.category_offset,
                                             bool(s.get("iscrowd", 0)))
                                     for s in a["segments_info"])
                for a in self._raw()["annotations"]}
        return self._segments


def panoptic_json(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    """A COCO-panoptic json document (the layout panopticapi reads)."""
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def panoptic_layout(name: str, root: Path, split: str) -> tuple[Path, Path, Path]:
    """(json, PNG folder, image folder) of split ``split`` of ``ade-pan`` or ``coco-pan`` under the data root
    (the module doc's layouts; a root that *is* the ``ADEChallengeData2016`` / ``coco`` folder works too)."""
    if name == "ade-pan":
        folder = root / "ADEChallengeData2016"
        folder = folder if folder.is_dir() else root
        return (folder / f"ade20k_panoptic_{split}.json", folder / f"ade20k_panoptic_{split}",
                folder / "images" / ("training" if split == "train" else "validation"))
    folder = root / "coco"
    folder = folder if folder.is_dir() else root
    return (folder / "annotations" / f"panoptic_{split}2017.json", folder / f"panoptic_{split}2017",
            folder / f"{split}2017")


def open_panoptic(name: str, root: Path, split: str, cache_dir=None) -> PanopticDataset:
    """``ade-pan`` (category offset 1: Mask2Former's converter writes 0..149) or ``coco-pan`` (native ids)."""
    json_path, png_dir, image_dir = panoptic_layout(name, Path(root), split)
    hint = f"run `python -m benchmark.data.prepare {name} --root {root}` to see what is missing"
    missing = [str(p) for p in (json_path, png_dir, image_dir) if not p.exists()]
    if missing:
        raise DataError(f"{name} under {root} is incomplete; missing: {', '.join(missing)}", hint=hint)
    return PanopticDataset(name, split, json_path, png_dir, image_dir, cache_dir=cache_dir, prepare_hint=hint,
                           category_offset=1 if name == "ade-pan" else 0)
