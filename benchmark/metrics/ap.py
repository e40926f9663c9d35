"""Mask AP per class with pycocotools' COCOeval (iouType "segm"), on COCO-format RLE detections.

Per-class values are read from ``COCOeval.eval['precision']`` ([T iou thresholds, R recall points,
K classes, A area ranges, M max-detections]) the way pycocotools' own ``summarize`` and detectron2's
``COCOEvaluator._derive_coco_results`` do: area range "all", 100 detections per image, mean over the
entries that are not -1. AP = mean over IoU 0.50:0.95, AP50 / AP75 = the single thresholds. A class
with no (non-crowd) ground-truth instance has NaN (pycocotools marks it -1); a class with ground truth
and no detection has 0. Values are fractions in [0, 1]; the results store converts them to percent.
Category ids are native ids (protocols.md); the ground-truth json must use the same ids.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmark.errors import DataError

AP_METRICS = ("ap", "ap50", "ap75")
_REQUIRED_KEYS = ("image_id", "category_id", "segmentation", "score")


def masks_to_coco_results(image_id, scores: Sequence[float], category_ids: Sequence[int], masks) -> list[dict]:
    """One COCO result dict per mask: ``{image_id, category_id, segmentation (RLE, str counts), score}``.

    ``masks`` is an ``[n, H, W]`` boolean array (numpy or tensor) at the image's original size.
    """
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    n = len(scores)
    if masks.ndim != 3 or masks.shape[0] != n or len(category_ids) != n:
        raise ValueError(f"need masks [n, H, W] with n = len(scores) = len(category_ids); got masks {masks.shape}, "
                         f"{n} scores, {len(category_ids)} category ids")
    if n == 0:
        return []
    # pycocotools wants column-major uint8 [H, W, n].
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    results = []
    for rle, score, cat in zip(rles, scores, category_ids):
        rle["counts"] = rle["counts"].decode("ascii")   # bytes are not JSON
        results.append({"image_id": _plain(image_id), "category_id": int(cat), "segmentation": rle,
                        "score": float(score)})
    return results


def load_coco_gt(gt_json_path: str | Path) -> COCO:
    """The ground-truth json as a pycocotools COCO object (quietly, with errors that name the file)."""
    path = Path(gt_json_path)
    if not path.is_file():
        raise DataError(f"ground-truth annotations {path} do not exist",
                        hint="AP needs the COCO-format validation json the run was evaluated on "
                             "(run.json 'val_annotations'); re-create it with the prepare command")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read ground-truth annotations {path}: {err}", hint="re-create the file") from err
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"{path} is not a COCO instance json (no {', '.join(missing)})",
                        hint="point to the instance annotations json of the validation split")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_instance_counts(coco: COCO, class_ids: Iterable[int]) -> dict[int, int]:
    """Ground-truth instances per class that COCOeval counts (crowd and 'ignore' annotations excluded)."""
    counts = {int(c): 0 for c in class_ids}
    for ann in coco.dataset["annotations"]:
        c = int(ann["category_id"])
        if c in counts and not ann.get("iscrowd", 0) and not ann.get("ignore", 0):
            counts[c] += 1
    return counts


def mask_ap(gt_json_path: str | Path | COCO, detections: list[dict],
            class_ids: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
    """Per-class ``{"ap", "ap50", "ap75", "num_gt"}`` over every image of the ground truth.

    ``class_ids`` defaults to every category of the json. An empty detection list (pycocotools cannot
    load one) gives 0 for classes with ground truth and NaN for the others, exactly what COCOeval
    reports for a class without detections.
    """
    coco = gt_json_path if isinstance(gt_json_path, COCO) else load_coco_gt(gt_json_path)
    ids = sorted({int(c) for c in (class_ids if class_ids is not None else coco.getCatIds())})
    num_gt = gt_instance_counts(coco, ids)
    if not ids:
        return {}
    if not detections:
        return {c: {**{m: (0.0 if num_gt[c] else float("nan")) for m in AP_METRICS}, "num_gt": num_gt[c]}
                for c in ids}
    _check_detections(coco, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes([dict(d) for d in detections])   # loadRes adds area/bbox/id in place: copy
        ev = COCOeval(coco, dt, iouType="segm")
        ev.params.catIds = ids
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, _area_all(ev), -1]   # [T, R, K]
    thresholds = ev.params.iouThrs
    t50 = int(np.flatnonzero(np.isclose(thresholds, 0.50))[0])
    t75 = int(np.flatnonzero(np.isclose(thresholds, 0.75))[0])
    out = {}
    for k, c in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        out[int(c)] = {"ap": _valid_mean(p), "ap50": _valid_mean(p[t50]), "ap75": _valid_mean(p[t75]),
                       "num_gt": num_gt[int(c)]}
    return out


def _area_all(ev: COCOeval) -> int:
    return ev.params.areaRngLbl.index("all")


def _valid_mean(values: np.ndarray) -> float:
    v = values[values > -1]
    return float(v.mean()) if v.size else float("nan")


def _check_detections(coco: COCO, detections: list[Mapping]) -> None:
    bad = next((d for d in detections if any(k not in d for k in _REQUIRED_KEYS)), None)
    if bad is not None:
        raise DataError(f"a detection lacks {[k for k in _REQUIRED_KEYS if k not in bad]}: {_short(bad)}",
                        hint="detections are COCO results dicts from masks_to_coco_results()")
    known = set(coco.getImgIds())
    unknown = {d["image_id"] for d in detections} - known
    if unknown:
        raise DataError(f"{len(unknown)} detection image id(s) are not in the ground truth, e.g. "
                        f"{sorted(unknown, key=str)[:3]}",
                        hint="evaluate against the annotations json of the split the detections were made on")


def _short(d: Mapping) -> str:
    return str({k: v for k, v in d.items() if k != "segmentation"})


def _plain(value):
    """numpy scalars -> Python scalars, for JSON."""
    return value.item() if hasattr(value, "item") else value
