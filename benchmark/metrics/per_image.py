"""Per-image sufficient statistics of an evaluated step (``step_XX/per_image.npz``), and the scores they give.

Every aggregate the report prints is a function of sums of per-image counts, so storing the counts per
validation image lets the reporter recompute any score on a resampled image set (the bootstrap of
:mod:`benchmark.report.bootstrap`) without the predictions.

``per_image.npz`` holds ``image_ids`` [N] (the dataset's ids, int or str, evaluation order),
``class_ids`` [K] (native ids, the order of ``confusion.npz``) and one int64 array [N, K] per statistic.
Which statistics a task stores, and how a per-class score is computed from their sums, is declared once
in :data:`PER_IMAGE_METRICS` (long-table metric -> statistic names and score function); a new task (e.g.
panoptic: ``iou_sum``, ``tp``, ``fp``, ``fn`` -> PQ) adds one entry and stores its arrays under those
names, and the store and the reporter need no other change.

- semantic (metric ``iou``): ``tp``, ``fp``, ``fn`` = pixel counts per image and class. Summed over the
  images they are the confusion matrix's diagonal, column sums minus diagonal and row sums minus
  diagonal (:func:`check_against_confusion`). They are taken from each image's own confusion matrix
  (one ``bincount`` over the image's pixels, the same one that is added to the step's matrix), so the
  evaluation loop does one pass over the pixels, as before, and the sums equal ``confusion.npz`` by
  construction.
- panoptic (``pq``, ``sq``, ``rq``): ``iou_sum`` (float64: the summed IoU of the image's matched segments
  of the class), ``tp``, ``fp``, ``fn`` (segment counts), panopticapi's sufficient statistics
  (:mod:`benchmark.metrics.pq`).
- instance (``ap``): nothing is stored per image. pycocotools' AP is a ranking over all images' detections,
  not a sum of per-image counts; it can be recomputed on a resampled image set from ``detections.json`` and
  the ground-truth json (``COCOeval`` with the resampled ``imgIds``, one full evaluation per resample), which
  is too slow for a default report. The reporter therefore gives AP intervals from seeds only and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .pq import PANOPTIC_STATS, pq_from_stats, rq_from_stats, sq_from_stats

SEMANTIC_STATS = ("tp", "fp", "fn")


def iou_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """IoU in percent, ``100 tp / (tp + fp + fn)``, NaN where the class has no ground truth (tp + fn = 0).

    Works on any shape (e.g. ``[B, K]`` resampled sums): the convention of :func:`benchmark.metrics.iou_per_class`.
    """
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    gt = tp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gt > 0, 100.0 * tp / (gt + fp), np.nan)


# long-table metric -> (statistic names in per_image.npz, per-class score in percent from their sums)
PER_IMAGE_METRICS: Mapping[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "iou": (SEMANTIC_STATS, iou_from_counts),
    "pq": (PANOPTIC_STATS, pq_from_stats),
    "sq": (PANOPTIC_STATS, sq_from_stats),
    "rq": (PANOPTIC_STATS, rq_from_stats),
}


@dataclass
class PerImageStats:
    """Per-image statistics of one step: ``arrays[name]`` is ``[len(image_ids), len(class_ids)]``, int64 counts
    (or float64 sums, e.g. panoptic's matched IoU)."""

    image_ids: np.ndarray
    class_ids: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_ids = _id_array(self.image_ids)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64)
        n, k = len(self.image_ids), len(self.class_ids)
        for name, value in list(self.arrays.items()):
            a = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            integer = np.issubdtype(a.dtype, np.integer)
            if a.shape != (n, k) or not (integer or np.issubdtype(a.dtype, np.floating)):
                raise ValueError(f"per-image statistic {name!r} must be numeric [{n}, {k}], got {a.dtype} {a.shape}")
            # Counts are int64; sums of scores (panoptic's matched IoU) float64.
            self.arrays[name] = a.astype(np.int64 if integer else np.float64, copy=False)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def metrics(self) -> list[str]:
        """The long-table metrics these statistics can recompute (see :data:`PER_IMAGE_METRICS`)."""
        found = {m: set(names) for m, (names, _) in PER_IMAGE_METRICS.items() if set(names) <= set(self.arrays)}
        # The most specific declarations win: panoptic's (iou_sum, tp, fp, fn) are segment counts, so the
        # semantic (tp, fp, fn) they contain do not make an IoU.
        return [m for m, names in found.items() if not any(names < other for other in found.values())]

    def stacked(self, metric: str) -> np.ndarray:
        """The statistics of ``metric`` side by side: ``[N, S * K]`` (statistic-major), for one matrix product."""
        names, _ = PER_IMAGE_METRICS[metric]
        return np.concatenate([self.arrays[n] for n in names], axis=1)

    def aligned_to(self, image_ids: np.ndarray) -> "PerImageStats | None":
        """These statistics in the order of ``image_ids`` (None when the image sets differ)."""
        ids = _id_array(image_ids)
        if len(ids) != len(self.image_ids):
            return None
        if np.array_equal(ids, self.image_ids):
            return self
        position = {v: i for i, v in enumerate(self.image_ids.tolist())}
        try:
            order = np.asarray([position[v] for v in ids.tolist()])
        except KeyError:
            return None
        return PerImageStats(ids, self.class_ids, {k: v[order] for k, v in self.arrays.items()})

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        return {"image_ids": self.image_ids, "class_ids": self.class_ids, **self.arrays}

    @classmethod
    def from_npz(cls, data: Mapping[str, np.ndarray]) -> "PerImageStats":
        arrays = {k: np.asarray(data[k]) for k in data if k not in ("image_ids", "class_ids")}
        return cls(np.asarray(data["image_ids"]), np.asarray(data["class_ids"]), arrays)


def counts_from_confusion(matrix: Tensor) -> Tensor:
    """``[3, K]`` int64 (tp, fp, fn) of one image's ``[K, K]`` confusion matrix (rows = ground truth)."""
    tp = torch.diagonal(matrix)
    return torch.stack([tp, matrix.sum(0) - tp, matrix.sum(1) - tp])


class SemanticPerImage:
    """Collects (tp, fp, fn) per image in the evaluation loop; counts stay on the device until :meth:`result`."""

    def __init__(self, class_ids: Sequence[int]):
        self.class_ids = [int(c) for c in class_ids]
        self.image_ids: list = []
        self.positions: list[int] = []
        self._counts: list[Tensor] = []

    def add(self, image_id, image_matrix: Tensor, position: int | None = None) -> None:
        """One image's confusion matrix; ``position`` = its index in the loader (for DDP gathering)."""
        self.image_ids.append(_plain(image_id))
        self.positions.append(len(self.positions) if position is None else int(position))
        self._counts.append(counts_from_confusion(image_matrix))

    def parts(self) -> tuple[list[int], list, np.ndarray]:
        """(positions, image ids, counts [n, 3, K]) of this process, on the host."""
        k = len(self.class_ids)
        counts = torch.stack(self._counts).cpu().numpy() if self._counts else np.zeros((0, 3, k), np.int64)
        return self.positions, self.image_ids, counts

    def result(self, parts: Sequence[tuple[list[int], list, np.ndarray]] | None = None) -> PerImageStats:
        """The statistics in loader order, from this process or from every rank's :meth:`parts`."""
        parts = [self.parts()] if parts is None else list(parts)
        positions = [p for part in parts for p in part[0]]
        ids = [i for part in parts for i in part[1]]
        counts = np.concatenate([part[2] for part in parts]) if parts else np.zeros((0, 3, len(self.class_ids)))
        order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
        counts = counts[order]
        return PerImageStats(np.asarray([ids[i] for i in order]) if ids else np.zeros(0, np.int64), self.class_ids,
                             {name: counts[:, j] for j, name in enumerate(SEMANTIC_STATS)})


def check_against_confusion(stats: PerImageStats, matrix: np.ndarray) -> None:
    """Raise ValueError unless the per-image sums equal the confusion matrix's tp / fp / fn."""
    m = np.asarray(matrix, dtype=np.int64)
    tp = np.diag(m)
    expected = {"tp": tp, "fp": m.sum(0) - tp, "fn": m.sum(1) - tp}
    for name, value in expected.items():
        if not np.array_equal(stats.arrays[name].sum(0), value):
            raise ValueError(f"per-image {name} sums differ from the confusion matrix")


def _id_array(ids) -> np.ndarray:
    """Image ids as a plain numpy array: int64 when every id is an integer, else unicode strings (no pickle)."""
    values = [_plain(v) for v in (ids.tolist() if hasattr(ids, "tolist") else list(ids))]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([str(v) for v in values], dtype=str)


def _plain(value):
    return value.item() if hasattr(value, "item") else value
