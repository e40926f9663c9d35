"""Confusion-matrix accumulation for semantic segmentation, on the tensors' own device.

Rows are ground truth, columns are predictions, both indexed by *row index*: position of a native class
id in a ``class_ids`` list (the matrix's companion array in ``step_XX/confusion.npz``). The helpers
``native_to_index`` / ``index_to_native`` convert between native ids (protocols.md) and row indices, so
ids with gaps (COCO) or without a class 0 (ADE's void) need no special case.

The matrix is a plain int64 tensor, so summing it over DDP ranks is one ``all_reduce(SUM)``
(:func:`reduce_confusion`). Accumulation is a single ``torch.bincount`` over ``target * N + pred``: no
Python loop over pixels or classes, no host round trip except the one sanity check per call.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

VOID = 255


def new_confusion(num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """An all-zero ``[num_classes, num_classes]`` int64 matrix."""
    return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)


def confusion_update(matrix: Tensor, pred: Tensor, target: Tensor, num_classes: int | None = None,
                     ignore_index: int = VOID) -> Tensor:
    """Add the pixels of one prediction to ``matrix`` in place and return it.

    ``pred`` and ``target`` are integer tensors of the same shape holding row indices. A target pixel
    equal to ``ignore_index`` or negative (void, or a native id that :func:`native_to_index` mapped to -1)
    is not counted. Any other target outside ``0..N-1``, or a prediction outside it on a counted pixel, is
    a bug upstream and raises ``ValueError`` rather than silently distorting IoU.
    """
    n = matrix.shape[0] if num_classes is None else int(num_classes)
    if matrix.shape != (n, n) or matrix.dtype != torch.int64:
        raise ValueError(f"confusion matrix must be int64 of shape ({n}, {n}), got {tuple(matrix.shape)} {matrix.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    # int64 before any arithmetic: uint8 label maps would overflow in target * n.
    p = pred.to(matrix.device, torch.int64).reshape(-1)
    t = target.to(matrix.device, torch.int64).reshape(-1)
    counted = (t >= 0) & (t < n)
    bad_target = (t >= n) & (t != ignore_index)
    bad_pred = counted & ((p < 0) | (p >= n))
    if bool((bad_target | bad_pred).any()):
        raise ValueError(
            f"labels outside 0..{n - 1}: target values {_examples(t[bad_target])}, "
            f"prediction values {_examples(p[bad_pred])} (map native ids with native_to_index first)")
    # Uncounted pixels go to a spare bin n*n that is dropped: no boolean indexing, no extra sync.
    flat = torch.where(counted, t * n + p, torch.full_like(t, n * n))
    matrix += torch.bincount(flat, minlength=n * n + 1)[: n * n].view(n, n)
    return matrix


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = VOID) -> Tensor:
    """The confusion matrix of one prediction (a fresh tensor on ``pred``'s device)."""
    return confusion_update(new_confusion(num_classes, pred.device), pred, target, num_classes, ignore_index)


def reduce_confusion(matrix: Tensor) -> Tensor:
    """Sum ``matrix`` over all DDP ranks in place (no-op outside a process group); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return matrix


def index_lookup(class_ids: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Lookup table ``native id -> row index`` (-1 for ids that are not rows, e.g. void)."""
    ids = torch.as_tensor(list(class_ids), dtype=torch.int64)
    if ids.numel() == 0 or int(ids.min()) < 0:
        raise ValueError("class_ids must be a non-empty list of non-negative native ids")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"class_ids has duplicates: {list(class_ids)}")
    lut = torch.full((max(int(ids.max()) + 1, VOID + 1),), -1, dtype=torch.int64)
    lut[ids] = torch.arange(ids.numel(), dtype=torch.int64)
    return lut.to(device)


def native_to_index(labels: Tensor, class_ids: Sequence[int] | Tensor) -> Tensor:
    """Map native ids to row indices; ids not in ``class_ids`` (void 255, ADE 0, ...) become -1.

    ``class_ids`` may also be a lookup table from :func:`index_lookup` (reuse it across images).
    """
    lut = class_ids if isinstance(class_ids, Tensor) else index_lookup(class_ids)
    lut = lut.to(labels.device)
    x = labels.to(torch.int64)
    inside = (x >= 0) & (x < lut.numel())
    return torch.where(inside, lut[x.clamp(0, lut.numel() - 1)], torch.full_like(x, -1))


def index_to_native(indices: Tensor, class_ids: Sequence[int]) -> Tensor:
    """Map row indices back to native ids (indices must be valid rows)."""
    ids = torch.as_tensor(list(class_ids), dtype=torch.int64, device=indices.device)
    return ids[indices.to(torch.int64)]


def _examples(values: Tensor, limit: int = 5) -> list[int]:
    return values.unique()[:limit].tolist()
