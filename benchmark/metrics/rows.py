"""Long-format metric rows of one evaluated step (the rows of ``metrics.csv``, design.md).

One row per (class, metric) for every class of the protocol, future classes included (they carry their
``class_step``; the reporter restricts each step to what was learned). Values are in percent.

- semantic: metric ``iou``; ``support`` = ground-truth pixels of the class; NaN IoU when it is 0.
- instance: metrics ``ap``, ``ap50``, ``ap75``; ``support`` = non-crowd ground-truth instances.
- panoptic: metrics ``pq``, ``sq``, ``rq`` (panopticapi's, :mod:`benchmark.metrics.pq`); ``support`` = matched
  plus unmatched non-crowd ground-truth segments (tp + fn); NaN when the class has no segment at all.

For the joint upper bound, pass the *continual* protocol it bounds (the runner does): rows then carry
that protocol's name and class steps, which is how the reporter places joint in the protocol's table.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .ap import AP_METRICS, mask_ap
from .iou import as_matrix, class_support, iou_per_class
from .pq import PANOPTIC_STATS, panoptic_scores

COLUMNS = ("method", "protocol", "seed", "step", "class_id", "class_name", "class_step", "metric", "value", "support")


def semantic_rows(*, matrix, class_ids: Sequence[int], protocol, method: str, seed: int, step: int) -> list[dict]:
    """``iou`` rows from a raw confusion matrix whose row i is native class ``class_ids[i]``."""
    m = as_matrix(matrix)
    ids = [int(c) for c in class_ids]
    if m.shape[0] != len(ids):
        raise ValueError(f"confusion matrix has {m.shape[0]} rows but {len(ids)} class ids")
    _check_covers(protocol, ids, "the confusion matrix")
    iou = dict(zip(ids, iou_per_class(m)))
    support = dict(zip(ids, class_support(m)))
    return [_row(protocol, method, seed, step, c, "iou", 100.0 * iou[c], int(support[c]))
            for c in protocol.class_order]


def instance_rows(*, protocol, method: str, seed: int, step: int,
                  per_class: Mapping[int, Mapping[str, float]] | None = None,
                  detections: list[dict] | None = None, gt_json_path=None) -> list[dict]:
    """``ap``, ``ap50``, ``ap75`` rows, from :func:`mask_ap`'s per-class output or computed here.

    Either ``per_class`` (``{class id: {"ap", "ap50", "ap75", "num_gt"}}``, fractions) or
    ``detections`` with ``gt_json_path`` (then :func:`mask_ap` runs over every protocol class).
    """
    if per_class is None:
        if detections is None or gt_json_path is None:
            raise ValueError("instance_rows needs per_class, or detections and gt_json_path")
        per_class = mask_ap(gt_json_path, detections, protocol.class_order)
    per_class = {int(c): v for c, v in per_class.items()}
    _check_covers(protocol, list(per_class), "the per-class AP")
    missing_keys = [k for k in (*AP_METRICS, "num_gt") if k not in next(iter(per_class.values()), {})]
    if missing_keys:
        raise ValueError(f"per-class AP entries lack {missing_keys}; use benchmark.metrics.mask_ap")
    return [_row(protocol, method, seed, step, c, metric, 100.0 * float(per_class[c][metric]),
                 int(per_class[c]["num_gt"]))
            for c in protocol.class_order for metric in AP_METRICS]


def panoptic_rows(*, stats: Mapping[str, np.ndarray], class_ids: Sequence[int], protocol, method: str, seed: int,
                  step: int) -> list[dict]:
    """``pq``, ``sq``, ``rq`` rows from summed statistics ``{"iou_sum", "tp", "fp", "fn"}`` ([K] over
    ``class_ids``)."""
    ids = [int(c) for c in class_ids]
    _check_covers(protocol, ids, "the panoptic statistics")
    sums = [np.asarray(stats[name], dtype=np.float64) for name in PANOPTIC_STATS]
    scores = panoptic_scores(np.stack(sums))
    index = {c: k for k, c in enumerate(ids)}
    support = (sums[1] + sums[3]).astype(np.int64)
    return [_row(protocol, method, seed, step, c, metric, float(scores[metric][index[c]]), int(support[index[c]]))
            for c in protocol.class_order for metric in ("pq", "sq", "rq")]


def _row(protocol, method, seed, step, class_id, metric, value, support) -> dict:
    return {"method": str(method), "protocol": protocol.name, "seed": int(seed), "step": int(step),
            "class_id": int(class_id), "class_name": protocol.name_of(class_id),
            "class_step": int(protocol.step_of(class_id)), "metric": metric,
            "value": float(value) if np.isfinite(value) else float("nan"), "support": int(support)}


def _check_covers(protocol, ids: list[int], what: str) -> None:
    """Every protocol class needs a value; extra ids (e.g. a json with more categories) are ignored."""
    missing = sorted(set(protocol.class_order) - set(ids))
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} class(es) of protocol {protocol.name!r}, e.g. {missing[:10]}")
