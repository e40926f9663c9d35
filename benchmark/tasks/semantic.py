"""Semantic segmentation: one class per pixel; scored by IoU from a confusion matrix (protocols.md).

Training target at step t: one binary mask per class of C_t present in the augmented crop (old, future and
void pixels belong to no target; VOC's background is a target only at step 0, where it is a class of the
step). Evaluation: one confusion matrix over *all* the dataset's classes (``class_ids`` = the protocol's
native ids, ascending, plus UNASSIGNED_ID; rows = ground truth, columns = prediction; pixels whose ground
truth is not a class, e.g. void 255 or ADE's 0, are ignored), computed at the original image size with the
shared semantic inference (:mod:`benchmark.engine.inference`). The model predicts only the seen columns;
they are mapped to native ids through ``protocol.class_order``. Stored: ``confusion.npz`` and
``per_image.npz`` (tp / fp / fn per image and class); rows: metric ``iou``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from benchmark.data.transforms import augment_semantic
from benchmark.engine.inference import SEMANTIC_MODES, semantic_inference
from benchmark.errors import ConfigError
from benchmark.metrics import confusion_matrix, index_lookup, native_to_index, new_confusion, reduce_confusion
from benchmark.metrics.confusion import VOID
from benchmark.metrics.per_image import SemanticPerImage
from benchmark.metrics.rows import semantic_rows

from .base import EvalResult, Evaluator, Task

# The class id of the confusion matrix's last row/column: pixels left without a class by the inference. It
# is the void id of VOC (255), never a class of any dataset, so no protocol reports it.
UNASSIGNED_ID = 255


@dataclass(frozen=True)
class SemanticInference:
    """How semantic predictions are formed (``--set eval.KEY=VALUE``); see :mod:`benchmark.engine.inference`.

    mode: "segments" (default; CoMFormer's MASK_BG False, used by the Mask2Former-based continual semantic
    results) or "sum" (Mask2Former's / CisDQ's arg-max over classes, every pixel takes a class).
    object_threshold / overlap_threshold: the segments' OBJECT_MASK_THRESHOLD and OVERLAP_THRESHOLD, 0.0 in
    CoMFormer's config (``mask2former/config.py`` L68-69) and scripts.
    """

    mode: str = "segments"
    object_threshold: float = 0.0
    overlap_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in SEMANTIC_MODES:
            raise ConfigError(f"eval.mode={self.mode!r} is not a semantic inference",
                              hint=f"use one of {', '.join(SEMANTIC_MODES)}")
        for name in ("object_threshold", "overlap_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"eval.{name}={getattr(self, name)!r} must be in [0, 1]")


class SemanticTask(Task):
    name = "semantic"
    metrics = ("iou",)
    summary_metrics = {"iou": "miou"}
    metric_labels = {"miou": "mIoU"}
    per_class_label = "IoU"
    instance_targets = False
    eval_options = SemanticInference

    def train_sample(self, ds, i, columns, aug, rng):
        image, label = ds.load_pair(i)
        image, label = augment_semantic(image, label, tuple(columns), aug, rng)
        present = set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist())
        classes = [c for c in columns if c in present]
        masks = np.stack([label == c for c in classes]) if classes else np.zeros((0, *label.shape), bool)
        return image, masks, [columns[c] for c in classes]

    def eval_target(self, target):
        return target.astype(np.int64)

    def gt_objects(self, target):
        """One object per class present, its pixels taken together (void excluded): a semantic label map
        does not tell instances apart."""
        return [(int(c), target == c) for c in np.unique(target) if c != VOID]

    def evaluator(self, protocol, step, device, *, options, mask_mode, top_k, score_threshold):
        return SemanticEvaluator(protocol, step, device, options or SemanticInference(), mask_mode)

    def store_step(self, store, step, result, *, val_ds, ident, weights_path, extra):
        rows = semantic_rows(matrix=result.matrix, class_ids=result.class_ids, step=step, **ident)
        store.write_step(step, confusion=(result.matrix, result.class_ids), per_image=result.per_image,
                         weights_path=weights_path, metrics_rows=rows, extra=extra)


class SemanticEvaluator(Evaluator):
    """The step's confusion matrix and per-image tp / fp / fn (module doc)."""

    def __init__(self, protocol, step: int, device: torch.device, inference: SemanticInference, mask_mode: str):
        self.step, self.device, self.inference, self.mask_mode = step, device, inference, mask_mode
        num_seen = len(protocol.seen(step))
        self.lookup = index_lookup(protocol.all_classes, device)          # ground truth: void stays -1 (ignored)
        seen_ids = torch.as_tensor(protocol.class_order[:num_seen], dtype=torch.int64, device=device)
        # Prediction columns -> matrix rows; UNASSIGNED (-1) -> the last row.
        self.column_to_row = torch.cat([self.lookup[seen_ids],
                                        torch.tensor([len(protocol.all_classes)], device=device)])
        self.class_ids = tuple(protocol.all_classes) + (UNASSIGNED_ID,)
        self.matrix = new_confusion(len(self.class_ids), device)
        self.per_image = SemanticPerImage(self.class_ids)

    def add(self, sample, class_probs, mask_logits, *, input_size, padded_size, out_size, position, no_object=None):
        inf = self.inference
        columns = semantic_inference(class_probs, mask_logits, input_size, out_size, padded_size=padded_size,
                                     mask_mode=self.mask_mode, mode=inf.mode, object_threshold=inf.object_threshold,
                                     overlap_threshold=inf.overlap_threshold, no_object=no_object)
        target = native_to_index(torch.as_tensor(np.asarray(sample.target), device=self.device), self.lookup)
        image_matrix = confusion_matrix(self.column_to_row[columns], target, len(self.class_ids))
        self.matrix += image_matrix
        self.per_image.add(sample.image_id, image_matrix, position=position)

    def result(self, num_images, rank, world):
        if world == 1:
            stats = self.per_image.result()
        else:
            reduce_confusion(self.matrix)
            parts = [None] * world if rank == 0 else None
            dist.gather_object(self.per_image.parts(), parts, dst=0)
            stats = self.per_image.result(parts) if rank == 0 else None
        return EvalResult("semantic", self.step, self.class_ids, num_images, self.matrix.cpu().numpy(),
                          per_image=stats)
