"""Panoptic quality (PQ, SQ, RQ) exactly as panopticapi computes it (Kirillov et al., CVPR 2019).

cocodataset/panopticapi ``panopticapi/evaluation.py``: ``pq_compute_single_core`` (L77-165 at the stored
revision) accumulates, per image and category, the sufficient statistics ``iou`` (summed IoU of matched
segments), ``tp``, ``fp``, ``fn``; ``PQStat.pq_average`` (L49-75) turns their sums into per-class scores:

* a ground-truth segment and a predicted segment of the same category match when their IoU > 0.5, where the
  union leaves out the predicted segment's pixels on VOID (id 0):
  ``union = area(pred) + area(gt) - intersection - |pred on VOID|`` (crowd ground-truth segments never
  match); a segment matches at most one other (IoU > 0.5 makes matches unique);
* unmatched non-crowd ground-truth segments are false negatives;
* an unmatched predicted segment is a false positive unless more than half of its pixels lie on VOID or on
  the crowd region of its own category (the last crowd segment of that category in the image, as the
  original's ``crowd_labels_dict`` keeps one id per category);
* per class: ``PQ = iou / (tp + fp/2 + fn/2)``, ``SQ = iou / tp``, ``RQ = tp / (tp + fp/2 + fn/2)``; a class
  with ``tp + fp + fn == 0`` is left out of the means (NaN here; the original skips it). A class with only
  false positives has PQ 0 and counts, as in panopticapi.

Ground-truth areas are counted from the ground-truth id map (panopticapi reads them from the json's
``area``; the two agree for consistent annotations, which the readers check). Scores are in percent like
mIoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

VOID = 0
PANOPTIC_STATS = ("iou_sum", "tp", "fp", "fn")
_OFFSET = 1 << 32      # segment ids are < 256**3, so gt * OFFSET + pred is a unique pair key


@dataclass(frozen=True)
class Segment:
    """One segment of an id map: its id, native category id and crowd flag."""

    id: int
    category_id: int
    iscrowd: bool = False


def image_pq_stats(gt_ids: np.ndarray, gt_segments: Sequence[Segment], pred_ids: np.ndarray,
                   pred_segments: Sequence[Segment], class_ids: Sequence[int]) -> np.ndarray:
    """``[4, K]`` float64 (iou_sum, tp, fp, fn) of one image for the categories ``class_ids`` (module doc).

    ``gt_ids`` / ``pred_ids`` are [H, W] integer segment ids (0 = VOID / no segment); every non-zero id of a
    map must be in its segment list (ValueError otherwise); listed segments without pixels are ignored.
    Segments of categories outside ``class_ids`` take part in matching but are not counted.
    """
    gt_ids = np.asarray(gt_ids, dtype=np.int64)
    pred_ids = np.asarray(pred_ids, dtype=np.int64)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size")
    column = {int(c): k for k, c in enumerate(class_ids)}
    stats = np.zeros((4, len(column)), np.float64)
    gt = {int(s.id): s for s in gt_segments}
    pred = {int(s.id): s for s in pred_segments}
    gt_area = _areas(gt_ids, gt, "ground-truth")
    pred_area = _areas(pred_ids, pred, "predicted")
    keys, counts = np.unique(gt_ids * _OFFSET + pred_ids, return_counts=True)
    overlap = {(int(k) // _OFFSET, int(k) % _OFFSET): int(n) for k, n in zip(keys, counts)}

    def add(category: int, index: int, value: float) -> None:
        if category in column:
            stats[index, column[category]] += value

    gt_matched, pred_matched = set(), set()
    for (g, p), inter in overlap.items():
        if g not in gt_area or p not in pred_area or gt[g].iscrowd:
            continue
        if gt[g].category_id != pred[p].category_id:
            continue
        union = pred_area[p] + gt_area[g] - inter - overlap.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            add(gt[g].category_id, 0, iou)
            add(gt[g].category_id, 1, 1)
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_of: dict[int, int] = {}
    for g in gt_area:
        if g in gt_matched:
            continue
        if gt[g].iscrowd:
            crowd_of[gt[g].category_id] = g
            continue
        add(gt[g].category_id, 3, 1)
    for p, area in pred_area.items():
        if p in pred_matched:
            continue
        ignored = overlap.get((VOID, p), 0)
        if pred[p].category_id in crowd_of:
            ignored += overlap.get((crowd_of[pred[p].category_id], p), 0)
        if ignored / area > 0.5:
            continue
        add(pred[p].category_id, 2, 1)
    return stats


def _areas(ids: np.ndarray, segments: Mapping[int, Segment], what: str) -> dict[int, int]:
    values, counts = np.unique(ids, return_counts=True)
    areas = {}
    for v, n in zip(values.tolist(), counts.tolist()):
        if v == VOID:
            continue
        if v not in segments:
            raise ValueError(f"{what} segment id {v} is in the id map but not in the segment list")
        areas[v] = n
    return areas


def _safe(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _present(tp, fp, fn) -> np.ndarray:
    return (np.asarray(tp) + np.asarray(fp) + np.asarray(fn)) > 0


def pq_from_stats(iou_sum, tp, fp, fn) -> np.ndarray:
    """PQ in percent from summed statistics (any shape); NaN where ``tp + fp + fn == 0``."""
    iou_sum, tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (iou_sum, tp, fp, fn))
    return np.where(_present(tp, fp, fn), 100.0 * _safe(iou_sum, tp + 0.5 * fp + 0.5 * fn), np.nan)


def sq_from_stats(iou_sum, tp, fp, fn) -> np.ndarray:
    """SQ in percent (0 for a present class without a match, as panopticapi); NaN where absent."""
    iou_sum, tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (iou_sum, tp, fp, fn))
    return np.where(_present(tp, fp, fn), 100.0 * _safe(iou_sum, tp), np.nan)


def rq_from_stats(iou_sum, tp, fp, fn) -> np.ndarray:
    """RQ in percent; NaN where absent."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    return np.where(_present(tp, fp, fn), 100.0 * _safe(tp, tp + 0.5 * fp + 0.5 * fn), np.nan)


PANOPTIC_SCORES = {"pq": pq_from_stats, "sq": sq_from_stats, "rq": rq_from_stats}


def panoptic_scores(stats: np.ndarray) -> dict[str, np.ndarray]:
    """``{"pq", "sq", "rq"}`` per class (percent, NaN where absent) from summed ``[4, K]`` statistics."""
    return {name: fn(*stats) for name, fn in PANOPTIC_SCORES.items()}
