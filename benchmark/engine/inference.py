"""Semantic, instance and panoptic inference shared by every method (Mask2Former's post-processing).

Both functions take one image's ``class_probs`` [Q, K] in global class columns with no-object dropped
(``ModelOutputs.class_probs()``: for query groups each query's softmax runs over its own group's head) and
its mask logits [Q, h, w] at 1/4 of the (padded) input resolution. As in Mask2Former
(facebookresearch/Mask2Former ``maskformer_model.py``: ``F.interpolate`` to the padded input size, then
``sem_seg_postprocess``), mask logits are upsampled bilinearly to the padded input size and cropped to the
valid input region. Instance inference then resizes the logits bilinearly to the original image size before
anything else (Mask2Former's ``sem_seg_postprocess_before_inference``, on with ``INSTANCE_ON``); semantic
inference forms the class score maps at the input size first and resizes those (its semantic configs keep
``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE`` False, ``maskformer_model.py`` L246-250).

Two semantic inferences (``SEMANTIC_MODES``):

* ``"segments"`` (the default): CoMFormer's ``MODEL.MASK_FORMER.TEST.MASK_BG False`` procedure, which every
  Mask2Former-based continual *semantic* result on ADE20K uses (CoMFormer, ECLIPSE, BalConpas scripts;
  fcdl94/CoMFormer ``mask2former/maskformer_model.py`` L340-376): keep the queries whose most likely
  class is not no-object and whose score exceeds ``object_threshold`` (0.0); each pixel goes to the
  kept query with the largest ``score * mask``; it takes that query's class only where the query's own
  mask is >= 0.5 (and the query's visible area is >= ``overlap_threshold`` of its mask, 0.0), otherwise it
  is left **unassigned** (column -1: the original's background 0). The one-hot map (background first) is
  resized bilinearly to the original size and arg-maxed, as the original's ``sem_seg_postprocess`` and
  evaluator do. A model can so say "none of my classes": a step-0 model leaves the objects of future
  classes unassigned instead of painting them with a base class, and a fine-tuned model leaves the objects
  of classes it forgot unassigned instead of painting them with the new classes. With the arg-max over
  classes below, every pixel must take a learned class, so the step-0 base mIoU of the embedded benchmark
  was 53.7 (future-class pixels counted as false positives of the base classes) against 96.6 with those
  pixels ignored, and fine-tune's new-class mIoU 33 with a recall of 99 % (issue 13's calibration).
* ``"sum"``: Mask2Former's semantic inference (``maskformer_model.py`` ``semantic_inference``: per pixel
  ``argmax_c sum_q p(c | q) * mask_q``), as CisDQ evaluates; every pixel takes a class.

``mask_mode="softmax"`` (CoMFormer's engine variant) replaces the per-query sigmoid by a softmax over the
queries at each pixel; an instance mask is then the pixels where that probability exceeds 0.5 (the sigmoid
rule ``logit > 0`` is the same threshold on the sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, int]
SEMANTIC_MODES = ("segments", "sum")
UNASSIGNED = -1          # column of a pixel that the "segments" inference leaves without a class


def resize_mask_logits(mask_logits: Tensor, input_size: Size, out_size: Size,
                       padded_size: Size | None = None) -> Tensor:
    """[Q, h, w] mask logits -> [Q, H, W] float32 at the original image size.

    ``input_size`` is the valid (unpadded) region of the network input, ``padded_size`` the full input
    (default: no padding), ``out_size`` the original image size.
    """
    padded = tuple(padded_size) if padded_size is not None else tuple(input_size)
    x = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)
    x = x[:, :, : input_size[0], : input_size[1]]
    if tuple(out_size) != tuple(input_size):
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    return x[0]


def mask_probs(logits: Tensor, mask_mode: str) -> Tensor:
    """Mask probabilities of [Q, ...] mask logits: per-query sigmoid (Mask2Former) or a softmax over the
    queries (CoMFormer's "MxF" criterion, ``loss.mask_mode=softmax``)."""
    if mask_mode == "sigmoid":
        return logits.sigmoid()
    if mask_mode == "softmax":
        return logits.softmax(dim=0)
    raise ValueError(f"unknown mask_mode {mask_mode!r}: use 'sigmoid' or 'softmax'")


def semantic_inference(class_probs: Tensor, mask_logits: Tensor, input_size: Size, out_size: Size, *,
                       padded_size: Size | None = None, mask_mode: str = "sigmoid", mode: str = "segments",
                       object_threshold: float = 0.0, overlap_threshold: float = 0.0,
                       no_object: Tensor | None = None) -> Tensor:
    """[H, W] int64 class columns (UNASSIGNED = -1 where ``mode="segments"`` assigns no class); see the module."""
    if mode == "segments":
        return segment_semantic_inference(class_probs, mask_logits, input_size, out_size, padded_size=padded_size,
                                          mask_mode=mask_mode, object_threshold=object_threshold,
                                          overlap_threshold=overlap_threshold, no_object=no_object)
    if mode != "sum":
        raise ValueError(f"unknown semantic inference {mode!r}: use one of {', '.join(SEMANTIC_MODES)}")
    return sum_semantic_inference(class_probs, mask_logits, input_size, out_size, padded_size=padded_size,
                                  mask_mode=mask_mode)


def segment_semantic_inference(class_probs: Tensor, mask_logits: Tensor, input_size: Size, out_size: Size, *,
                               padded_size: Size | None = None, mask_mode: str = "sigmoid",
                               object_threshold: float = 0.0, overlap_threshold: float = 0.0,
                               mask_threshold: float = 0.5, no_object: Tensor | None = None) -> Tensor:
    """[H, W] int64 class columns or UNASSIGNED: CoMFormer's ``MASK_BG False`` semantic inference (module doc).

    ``class_probs`` has no no-object column; a query's no-object probability is ``1 - sum_k p(k | q)`` (each
    query's softmax runs over its own group's classes and no-object) unless ``no_object`` [Q] gives it (a sigmoid
    classifier's independent no-object score, ECLIPSE). Ties between a class and no-object
    go to the class, as ``torch.max`` over ``[classes | no-object]`` does in the original.
    """
    _check(class_probs, mask_logits)
    probs = class_probs.float()
    scores, labels = probs.max(dim=1)
    no_object = 1.0 - probs.sum(dim=1) if no_object is None else no_object.float()
    keep = (scores >= no_object) & (scores > object_threshold)
    masks = mask_probs(resize_mask_logits(mask_logits, input_size, input_size, padded_size), mask_mode)[keep]
    scores, labels = scores[keep], labels[keep]
    height, width = masks.shape[-2:] if masks.numel() else tuple(input_size)
    semseg = torch.zeros(height, width, dtype=torch.int64, device=mask_logits.device)   # 0 = unassigned
    if len(labels):
        owner = (scores[:, None, None] * masks).argmax(dim=0)
        for k in range(len(labels)):
            visible = owner == k
            own_area = (masks[k] >= mask_threshold).sum()
            region = visible & (masks[k] >= mask_threshold)
            if visible.any() and own_area > 0 and region.any():
                if visible.sum() / own_area < overlap_threshold:
                    continue
                semseg[region] = labels[k] + 1
    num_columns = class_probs.shape[1]
    if tuple(out_size) != (height, width):
        onehot = F.one_hot(semseg, num_columns + 1).permute(2, 0, 1).float()
        onehot = F.interpolate(onehot[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        semseg = onehot.argmax(dim=0)
    return semseg - 1


def sum_semantic_inference(class_probs: Tensor, mask_logits: Tensor, input_size: Size, out_size: Size, *,
                           padded_size: Size | None = None, mask_mode: str = "sigmoid") -> Tensor:
    """[H, W] int64 class columns: per pixel ``argmax_c sum_q p(c | q) * mask_q`` (Mask2Former semantic inference).

    The score maps are formed at the input size and then resized to ``out_size`` (not the mask logits), as
    Mask2Former's semantic configs do.
    """
    _check(class_probs, mask_logits)
    masks = mask_probs(resize_mask_logits(mask_logits, input_size, input_size, padded_size), mask_mode)
    scores = torch.einsum("qk,qhw->khw", class_probs.float(), masks)
    if tuple(out_size) != tuple(input_size):
        scores = F.interpolate(scores[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return scores.argmax(dim=0)


def instance_inference(class_probs: Tensor, mask_logits: Tensor, input_size: Size, out_size: Size,
                       top_k: int = 100, score_threshold: float = 0.0, *, padded_size: Size | None = None,
                       mask_mode: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """Mask2Former's instance inference: ``(scores [n], columns [n], masks [n, H, W] bool)``, best first.

    The ``top_k`` (query, class) pairs by class probability (over all Q x K pairs; ``min(top_k, Q*K)``); a
    pair's mask is its query's mask at the original size thresholded at logit 0; its score is the class
    probability times the mean mask probability inside the mask (0 for an empty mask). Pairs with
    ``score <= score_threshold`` are dropped: the default 0.0 only drops empty masks, which cannot change AP
    (they match nothing and rank last); CisDQ's original code used 0.5.
    """
    _check(class_probs, mask_logits)
    num_queries, num_columns = class_probs.shape
    k = min(int(top_k), num_queries * num_columns)
    class_scores, flat = class_probs.float().flatten().topk(k, sorted=True)
    queries = torch.div(flat, num_columns, rounding_mode="floor")
    columns = flat % num_columns
    if mask_mode == "softmax":
        # Probabilities depend on every query at the pixel: resize all of them.
        probs = mask_probs(resize_mask_logits(mask_logits, input_size, out_size, padded_size), mask_mode)[queries]
        binary = probs > 0.5
    else:
        # Only the selected queries' masks are resized (each once); interpolation is per query, so this
        # equals resizing all of them first.
        unique, inverse = torch.unique(queries, return_inverse=True)
        logits = resize_mask_logits(mask_logits[unique], input_size, out_size, padded_size)[inverse]
        probs, binary = logits.sigmoid(), logits > 0
    inside = binary.flatten(1)
    mask_scores = (probs.flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    scores = class_scores * mask_scores
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] > score_threshold]
    return scores[order], columns[order], binary[order]


def _check(class_probs: Tensor, mask_logits: Tensor) -> None:
    if class_probs.dim() != 2 or mask_logits.dim() != 3 or class_probs.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"need class_probs [Q, K] and mask_logits [Q, h, w] of one image, got "
                         f"{tuple(class_probs.shape)} and {tuple(mask_logits.shape)}")


@dataclass(frozen=True)
class PanopticPrediction:
    """One image's panoptic prediction: ``segment_ids`` [H, W] int32 (0 = no segment) and, per segment id
    1..n, its class column and whether the class is a thing."""

    segment_ids: Tensor
    columns: tuple[int, ...]
    isthing: tuple[bool, ...]

    @property
    def segments(self) -> list[tuple[int, int, bool]]:
        """``[(segment id, class column, isthing)]``, ids from 1."""
        return [(i + 1, c, t) for i, (c, t) in enumerate(zip(self.columns, self.isthing))]


def panoptic_inference(class_probs: Tensor, mask_logits: Tensor, input_size: Size, out_size: Size, *,
                       thing_columns: Sequence[int] | Tensor, object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8, padded_size: Size | None = None,
                       mask_mode: str = "sigmoid", mask_threshold: float = 0.5,
                       no_object: Tensor | None = None) -> PanopticPrediction:
    """Mask2Former's panoptic inference (facebookresearch/Mask2Former ``maskformer_model.py``
    ``panoptic_inference``, L286-342), shared by every method.

    The mask logits are resized to the original image size first (``sem_seg_postprocess_before_inference``
    is on whenever ``PANOPTIC_ON``, L149-153). A query is kept when its most likely label is not no-object
    (``labels.ne(num_classes)``; here: its best class probability >= its no-object probability
    ``1 - sum_k p(k | q)``, ties to the class as in the semantic "segments" inference) and its score exceeds
    ``object_mask_threshold`` (0.8, ``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD`` in
    ``configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml`` L43-44, as ``OVERLAP_THRESHOLD``;
    BalConpas keeps both at 0.8, reference B8; the panoptic task passes CoMFormer's and ECLIPSE's 0.0 / 0.0,
    ``benchmark.tasks.panoptic.PanopticInference``). Each pixel goes to the kept query
    with the largest ``score * mask``; a query's segment is the pixels it wins where its own mask is >= 0.5;
    it is dropped when the pixels it wins are fewer than ``overlap_threshold`` (0.8) x its own mask area.
    Segments of one stuff class are merged into a single segment (the first one's id); every thing segment
    has its own id. Ids are 1, 2, ... in query order (kept queries in their original order), as the original.
    CoMFormer's panoptic inference (fcdl94/CoMFormer ``mask2former/maskformer_model.py``) is the same
    procedure on its own probabilities; ECLIPSE uses sigmoid class scores and thresholds 0.0 / 0.0
    (reference A6), which a method supplies through its probabilities, ``no_object`` [Q] (the sigmoid no-object
    score replacing ``1 - sum_k p(k | q)``) and its evaluation defaults (``Method.eval_defaults``).
    """
    _check(class_probs, mask_logits)
    probs = class_probs.float()
    scores, labels = probs.max(dim=1)
    no_object = 1.0 - probs.sum(dim=1) if no_object is None else no_object.float()
    keep = (scores >= no_object) & (scores > object_mask_threshold)
    masks = mask_probs(resize_mask_logits(mask_logits, input_size, out_size, padded_size), mask_mode)[keep]
    scores, labels = scores[keep], labels[keep]
    things = set(int(c) for c in torch.as_tensor(thing_columns).flatten().tolist())
    height, width = tuple(out_size)
    segment_ids = torch.zeros(height, width, dtype=torch.int32, device=mask_logits.device)
    columns: list[int] = []
    isthing: list[bool] = []
    if len(labels):
        owner = (scores[:, None, None] * masks).argmax(dim=0)
        stuff_segment: dict[int, int] = {}
        for k in range(len(labels)):
            column = int(labels[k])
            won = owner == k
            own = masks[k] >= mask_threshold
            region = won & own
            won_area, own_area = int(won.sum()), int(own.sum())
            if won_area == 0 or own_area == 0 or not bool(region.any()):
                continue
            if won_area / own_area < overlap_threshold:
                continue
            thing = column in things
            if not thing and column in stuff_segment:
                segment_ids[region] = stuff_segment[column]
                continue
            columns.append(column)
            isthing.append(thing)
            segment_ids[region] = len(columns)
            if not thing:
                stuff_segment[column] = len(columns)
    return PanopticPrediction(segment_ids, tuple(columns), tuple(isthing))
