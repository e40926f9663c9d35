"""Per-class IoU from a confusion matrix (rows = ground truth, columns = prediction).

IoU_c = TP / (TP + FP + FN) (protocols.md). A class without ground-truth pixels gets NaN even when it
was predicted somewhere: the convention of MiB/PLOP (``stream_metrics.py``) and detectron2's
``SemSegEvaluator``, where such classes are left out of every mean. Values are fractions in [0, 1];
the results store converts them to percent.
"""

from __future__ import annotations

import numpy as np


def as_matrix(matrix) -> np.ndarray:
    """A square int64 numpy matrix from a numpy array or a (possibly CUDA) tensor."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"a confusion matrix holds integer counts, got dtype {m.dtype}")
    return m.astype(np.int64, copy=False)


def class_support(matrix) -> np.ndarray:
    """Ground-truth pixel count of each class (row sums)."""
    return as_matrix(matrix).sum(axis=1)


def iou_per_class(matrix) -> np.ndarray:
    """IoU of each row's class, NaN where the class has no ground-truth pixel."""
    m = as_matrix(matrix)
    tp = np.diag(m).astype(np.float64)
    gt = m.sum(axis=1)
    union = gt + m.sum(axis=0) - np.diag(m)
    iou = np.full(m.shape[0], np.nan)
    has_gt = gt > 0
    iou[has_gt] = tp[has_gt] / union[has_gt]
    return iou


def mean_iou(matrix) -> float:
    """Mean IoU over the classes that have ground truth (NaN if none has)."""
    iou = iou_per_class(matrix)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
