"""Instance segmentation: scored by mask AP with pycocotools (protocols.md).

Training target at step t: the instances of C_t (crowd excluded by the reader). Evaluation: Mask2Former's
instance inference (top-k (query, class) pairs) into COCO results (RLE masks, native category ids, scores),
stored as ``detections.json`` and scored against the validation json (run.json ``val_annotations``); rows:
metrics ``ap``, ``ap50``, ``ap75``. No per-image statistics: AP intervals come from seeds
(:mod:`benchmark.metrics.per_image`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from benchmark.data.transforms import augment_instance
from benchmark.engine.inference import instance_inference
from benchmark.metrics import masks_to_coco_results
from benchmark.metrics.rows import instance_rows

from .base import EvalResult, Evaluator, Task


class InstanceTask(Task):
    name = "instance"
    metrics = ("ap", "ap50", "ap75")
    summary_metrics = {"ap": "ap", "ap50": "ap50", "ap75": "ap75"}
    metric_labels = {"ap": "AP", "ap50": "AP50", "ap75": "AP75"}
    per_class_label = "AP"
    instance_targets = True
    eval_options = None

    def prepare_dataset(self, ds) -> None:
        ds.index_annotations()

    def train_sample(self, ds, i, columns, aug, rng):
        image, instances = ds.load(i, classes=columns)
        chosen = sorted((columns[c], k) for k, (c, _) in enumerate(instances))
        labels = np.asarray([column for column, _ in chosen], dtype=np.int64)
        masks = np.stack([instances[k][1] for _, k in chosen]) if chosen else np.zeros((0, *image.shape[:2]), bool)
        image, masks, keep = augment_instance(image, masks, aug, rng)
        return image, masks, labels[keep]

    def gt_objects(self, target):
        """Every annotated instance (the target is already ``[(class id, mask)]``)."""
        return [(int(c), np.asarray(mask, bool)) for c, mask in target]

    def evaluator(self, protocol, step, device, *, options, mask_mode, top_k, score_threshold):
        return InstanceEvaluator(protocol, step, mask_mode, top_k, score_threshold)

    def run_header(self, val_ds):
        return {"val_annotations": str(val_ds.coco_json_path)}

    def store_step(self, store, step, result, *, val_ds, ident, weights_path, extra):
        rows = instance_rows(per_class=result.per_class_ap(val_ds.coco_json_path), step=step, **ident)
        store.write_step(step, detections=result.detections, per_image=result.per_image, weights_path=weights_path,
                         metrics_rows=rows, extra=extra)


class InstanceEvaluator(Evaluator):
    """COCO-format detections of every image (module doc)."""

    def __init__(self, protocol, step: int, mask_mode: str, top_k: int, score_threshold: float):
        self.step, self.mask_mode, self.top_k, self.score_threshold = step, mask_mode, top_k, score_threshold
        self.seen_ids = torch.as_tensor(protocol.class_order[:len(protocol.seen(step))], dtype=torch.int64)
        self.class_ids = tuple(protocol.all_classes)
        self.detections: list[dict] = []

    def add(self, sample, class_probs, mask_logits, *, input_size, padded_size, out_size, position, no_object=None):
        # Mask2Former's instance inference ranks (query, class) pairs by class score alone: no-object plays no part.
        scores, columns, masks = instance_inference(class_probs, mask_logits, input_size, out_size, self.top_k,
                                                    self.score_threshold, padded_size=padded_size,
                                                    mask_mode=self.mask_mode)
        self.detections.extend(masks_to_coco_results(sample.image_id, scores.cpu().tolist(),
                                                     self.seen_ids[columns.cpu()].tolist(), masks.cpu().numpy()))

    def result(self, num_images, rank, world):
        detections = self.detections
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(detections, gathered, dst=0)
            detections = [d for part in gathered for d in part] if rank == 0 else []
        return EvalResult("instance", self.step, self.class_ids, num_images, None, detections)
