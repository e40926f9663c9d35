"""The evaluation loop: a model over a validation loader -> a confusion matrix or COCO detections.

Every validation image is evaluated at every step (protocols.md) with the shared inference of
:mod:`benchmark.engine.inference`. Semantic: one confusion matrix over *all* the dataset's classes
(``class_ids`` = the protocol's native ids, ascending; rows = ground truth, columns = prediction; pixels whose
ground truth is not a class, e.g. void 255 or ADE's 0, are ignored), computed at the original image size.
The model predicts only the ``num_seen`` columns learned so far; they are mapped to native ids through
``protocol.class_order``. Instance: COCO-format results (RLE masks, native category ids, scores) for the
pycocotools evaluation of :mod:`benchmark.metrics`.

Under ``torch.distributed`` every rank evaluates every ``world_size``-th image (this function shards the
loader itself, so duplicates that a padding sampler would add cannot be counted); the confusion matrices are
summed over ranks, and the detections and per-image counts gathered on rank 0 (other ranks return an empty
list and no per-image statistics).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

from benchmark.batch import EvalSample
from benchmark.data.loader import SIZE_DIVISIBILITY
from benchmark.engine.inference import SEMANTIC_MODES, instance_inference, semantic_inference
from benchmark.errors import ConfigError
from benchmark.metrics import (confusion_matrix, index_lookup, mask_ap, masks_to_coco_results, native_to_index,
                               new_confusion, reduce_confusion)
from benchmark.metrics.per_image import PerImageStats, SemanticPerImage

TASKS = ("semantic", "instance")


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


@dataclass
class EvalResult:
    """The raw evaluation output of one step.

    semantic: ``matrix`` [N, N] int64 (rows = ground truth, columns = prediction, both indexed like
    ``class_ids``: the arrays of ``step_XX/confusion.npz``; the last id is UNASSIGNED_ID, whose column holds
    the pixels left without a class and whose row is empty) and ``per_image`` (``step_XX/per_image.npz``, with
    the same class ids); instance: ``detections`` (COCO results format, native category ids, RLE masks), no
    per-image statistics.
    """

    task: str
    step: int
    class_ids: tuple[int, ...]
    num_images: int
    matrix: np.ndarray | None = None
    detections: list[dict] = field(default_factory=list)
    per_image: PerImageStats | None = None

    def per_class_ap(self, gt_json_path) -> dict[int, dict[str, float]]:
        """Mask AP per class of the protocol (``benchmark.metrics.mask_ap``) against the validation json."""
        if self.task != "instance":
            raise ValueError("per-class AP needs an instance evaluation")
        return mask_ap(gt_json_path, self.detections, self.class_ids)


def evaluate(model: nn.Module, loader: Iterable[EvalSample], protocol, step: int, device: torch.device | str,
             task: str, *, top_k: int = 100, score_threshold: float = 0.0, mask_mode: str = "sigmoid",
             semantic: SemanticInference | None = None, progress: bool = True) -> EvalResult:
    """Run ``model`` (a SegModel, possibly DDP-wrapped) on every EvalSample of ``loader``.

    ``top_k`` / ``score_threshold``: instance inference (Mask2Former keeps the top 100 pairs, no threshold).
    ``mask_mode``: "softmax" for models trained with CoMFormer's softmax-over-queries criterion.
    ``semantic``: the semantic inference (default :class:`SemanticInference`, CoMFormer's segments).
    Semantic results: the confusion matrix's last row/column is UNASSIGNED_ID, the pixels the inference left
    without a class (counted as false negatives of their ground-truth class, never as a class).
    The model is put in eval mode for the loop and restored to its previous mode afterwards.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown evaluation task {task!r}", hint=f"use one of {', '.join(TASKS)}")
    device = torch.device(device)
    net = model.module if isinstance(model, DistributedDataParallel) else model
    semantic = semantic or SemanticInference()
    num_seen = len(protocol.seen(step))
    lookup = index_lookup(protocol.all_classes, device)           # ground truth: void stays -1 (ignored)
    seen_ids = torch.as_tensor(protocol.class_order[:num_seen], dtype=torch.int64)
    # Prediction columns -> matrix rows; UNASSIGNED (-1) -> the last row.
    column_to_row = torch.cat([lookup[seen_ids.to(device)], torch.tensor([len(protocol.all_classes)], device=device)])
    class_ids = tuple(protocol.all_classes) + ((UNASSIGNED_ID,) if task == "semantic" else ())
    rank, world = _rank_and_world()

    matrix = new_confusion(len(class_ids), device) if task == "semantic" else None
    per_image = SemanticPerImage(class_ids) if task == "semantic" else None
    detections: list[dict] = []
    count = 0
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for sample in _progress(_shard(loader, rank, world), progress and rank == 0):
                # Zero-padded (the mean colour) to a multiple of 32 as Mask2Former's ImageList.from_tensors
                # (maskformer_model.py L195); the inference crops the padding off again.
                input_size = tuple(sample.pixel_values.shape[-2:])
                padded_size = tuple(-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in input_size)
                pixels = torch.nn.functional.pad(sample.pixel_values, (0, padded_size[1] - input_size[1],
                                                                       0, padded_size[0] - input_size[0]))
                outputs = net(pixels[None].to(device, non_blocking=True))
                if outputs.num_columns != num_seen:
                    raise ValueError(f"the model predicts {outputs.num_columns} class columns but step {step} of "
                                     f"{protocol.name} has {num_seen} seen classes")
                class_probs = outputs.class_probs()[0]
                mask_logits = outputs.mask_logits()[0]
                out_size = tuple(int(s) for s in sample.orig_size)
                if task == "semantic":
                    columns = semantic_inference(class_probs, mask_logits, input_size, out_size,
                                                 padded_size=padded_size, mask_mode=mask_mode, mode=semantic.mode,
                                                 object_threshold=semantic.object_threshold,
                                                 overlap_threshold=semantic.overlap_threshold)
                    target = native_to_index(torch.as_tensor(np.asarray(sample.target), device=device), lookup)
                    image_matrix = confusion_matrix(column_to_row[columns], target, len(class_ids))
                    matrix += image_matrix
                    per_image.add(sample.image_id, image_matrix, position=rank + count * world)
                else:
                    scores, columns, masks = instance_inference(class_probs, mask_logits, input_size, out_size,
                                                                top_k, score_threshold, padded_size=padded_size,
                                                                mask_mode=mask_mode)
                    detections.extend(masks_to_coco_results(sample.image_id, scores.cpu().tolist(),
                                                            seen_ids[columns.cpu()].tolist(), masks.cpu().numpy()))
                count += 1
    finally:
        net.train(was_training)

    stats = per_image.result() if per_image is not None and world == 1 else None
    if world > 1:
        count_tensor = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(count_tensor)
        count = int(count_tensor.item())
        if matrix is not None:
            reduce_confusion(matrix)
            parts = [None] * world if rank == 0 else None
            dist.gather_object(per_image.parts(), parts, dst=0)
            stats = per_image.result(parts) if rank == 0 else None
        else:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(detections, gathered, dst=0)
            detections = [d for part in gathered for d in part] if rank == 0 else []
    return EvalResult(task, step, class_ids, count, matrix.cpu().numpy() if matrix is not None else None, detections,
                      per_image=stats)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(loader: Iterable[EvalSample], rank: int, world: int) -> Iterable[EvalSample]:
    """This rank's images: every ``world``-th one starting at ``rank``.

    A DataLoader over a map-style dataset is rebuilt over the rank's subset so that other ranks' images are
    never loaded; any other iterable is filtered.
    """
    if world == 1:
        return loader
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) \
            and hasattr(loader.dataset, "__len__"):
        subset = Subset(loader.dataset, range(rank, len(loader.dataset), world))
        return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    return (sample for i, sample in enumerate(loader) if i % world == rank)


def _progress(samples: Iterable[EvalSample], enabled: bool) -> Iterator[EvalSample]:
    total = len(samples) if hasattr(samples, "__len__") else None
    return iter(tqdm(samples, total=total, desc="eval", unit="img", leave=False,
                     disable=not (enabled and sys.stderr.isatty())))
