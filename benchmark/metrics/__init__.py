"""Metrics: confusion-matrix IoU, COCO mask AP (pycocotools), class groups, continual aggregates.

Everything here is a pure function of raw evaluation outputs (confusion matrices, COCO results); the
long-format rows of ``metrics.csv`` are built by :func:`semantic_rows` / :func:`instance_rows`.
"""

from .ap import AP_METRICS, gt_instance_counts, load_coco_gt, mask_ap, masks_to_coco_results
from .confusion import (
    confusion_matrix,
    confusion_update,
    index_lookup,
    index_to_native,
    native_to_index,
    new_confusion,
    reduce_confusion,
)
from .continual import average_incremental, forgetting_per_class, mean_forgetting
from .groups import GROUPS, VOC_BACKGROUND_OPTIONS, class_groups, group_member, groups_from_class_steps
from .iou import class_support, iou_per_class, mean_iou
from .rows import COLUMNS, instance_rows, semantic_rows

__all__ = [
    "AP_METRICS", "COLUMNS", "GROUPS", "VOC_BACKGROUND_OPTIONS",
    "average_incremental", "class_groups", "class_support", "confusion_matrix", "confusion_update",
    "forgetting_per_class", "group_member", "groups_from_class_steps", "gt_instance_counts", "index_lookup",
    "index_to_native", "instance_rows", "iou_per_class", "load_coco_gt", "mask_ap", "masks_to_coco_results",
    "mean_forgetting", "mean_iou", "native_to_index", "new_confusion", "reduce_confusion", "semantic_rows",
]
