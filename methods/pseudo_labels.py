"""Pseudo-labels of old classes built from the frozen previous-step model, as functions on tensors.

Three rules, one per method family (details and file references in ../shared/reference/):
  * CoMFormer's mask pseudo-labels (also CoMFormer's adaptation of PLOP): :func:`comformer_pseudo_labels`.
  * PLOP's entropy rule with per-class median thresholds, moved to masks: :func:`plop_pixel_stats`,
    :func:`plop_thresholds` (or :class:`EntropyHistogram` for datasets too large to keep every pixel),
    :func:`plop_pseudo_labels`.
  * CisDQ's per-group pseudo-instances (QGKD): :func:`cisdq_pseudo_instances`.

All work on one image; class logits have the no-object logit last (benchmark/engine/outputs.py) and the
returned labels are old-class columns ``0 .. K_old - 1`` (group-local for CisDQ). Masks are bool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(class_logits: Tensor, mask_logits: Tensor) -> None:
    if class_logits.dim() != 2 or class_logits.shape[1] < 1:
        raise ValueError(f"class logits must be [Q, K+1], got shape {tuple(class_logits.shape)}")
    if mask_logits.dim() != 3 or mask_logits.shape[0] != class_logits.shape[0]:
        raise ValueError(f"mask logits must be [Q, h, w] with Q={class_logits.shape[0]}, "
                         f"got shape {tuple(mask_logits.shape)}")


def _empty(size: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    return (torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, *size, dtype=torch.bool, device=device))


# --------------------------------------------------------------------------------------------------
# CoMFormer
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def comformer_pseudo_labels(old_class_logits: Tensor, old_mask_logits: Tensor, gt_masks: Tensor,
                            mask_activation: str = "sigmoid", score_threshold: float = 0.0,
                            mask_threshold: float = 0.5, min_kept_fraction: float = 0.5,
                            kept_area: str = "assigned") -> tuple[Tensor, Tensor]:
    """CoMFormer's ``make_pseudolabels2`` (fcdl94/CoMFormer continual/method_wrapper/maskformer.py L98-146).

    ``old_class_logits`` [Q, K_old+1] and ``old_mask_logits`` [Q, h, w]: the old model's final-layer
    prediction for one image; ``gt_masks`` [n, H, W]: the image's current-step targets (n may be 0). The
    mask logits are resized bilinearly to (H, W) first, as the original does, so the pseudo-masks come
    out at the targets' resolution.

    1. ``score_q, c_q`` = max / argmax of softmax over the K_old + 1 logits; keep queries with
       ``c_q != no-object`` and ``score_q > score_threshold`` (``PSEUDO_THRESHOLD`` 0.0, config.py L35).
    2. Mask probabilities ``s_q``: sigmoid (the shared engine's default) or, with
       ``mask_activation="softmax"``, a softmax over all queries (CoMFormer's MxF engine).
    3. Each pixel goes to the kept query maximising ``score_q * s_q(x)``; pixels covered by any
       ground-truth mask go to none.
    4. Kept query k becomes the segment ``{assigned to k} and {s_k >= mask_threshold}`` of class c_k
       when its assigned area is more than ``min_kept_fraction`` (0.5) of its own area
       ``#{s_k >= mask_threshold}`` and the segment is not empty; so a query whose mask is mostly
       covered by ground truth (or by stronger queries) is dropped. Several segments may share a class.
       ``kept_area="segment"`` compares the segment itself (assigned and ``s_k >= mask_threshold``) instead:
       BalConpas's ``generate_psd_targets`` (jinpeng0528/BalConpas maskformer_model.py L329-380, reference
       eclipse-balconpas B6) with ``min_kept_fraction`` 0.8 (its ``TEST.OVERLAP_THRESHOLD``).

    Returns ``(labels [m] long, masks [m, H, W] bool)``.
    """
    _check_pair(old_class_logits, old_mask_logits)
    if gt_masks.dim() != 3:
        raise ValueError(f"gt_masks must be [n, H, W], got shape {tuple(gt_masks.shape)}")
    if mask_activation not in ("sigmoid", "softmax"):
        raise ValueError(f"mask_activation must be 'sigmoid' or 'softmax', got {mask_activation!r}")
    size = (int(gt_masks.shape[-2]), int(gt_masks.shape[-1]))
    mask_logits = old_mask_logits.float()
    if tuple(mask_logits.shape[-2:]) != size:
        mask_logits = F.interpolate(mask_logits[None], size=size, mode="bilinear", align_corners=False)[0]
    mask_probs = mask_logits.softmax(dim=0) if mask_activation == "softmax" else mask_logits.sigmoid()

    scores, classes = old_class_logits.float().softmax(dim=-1).max(dim=-1)
    keep = (classes != old_class_logits.shape[1] - 1) & (scores > score_threshold)
    if not bool(keep.any()):
        return _empty(size, old_mask_logits.device)
    scores, classes, mask_probs = scores[keep], classes[keep], mask_probs[keep]

    owner = (scores[:, None, None] * mask_probs).argmax(dim=0)                     # [H, W]
    assigned = owner[None] == torch.arange(len(scores), device=owner.device)[:, None, None]
    if gt_masks.shape[0] > 0:
        assigned &= ~gt_masks.bool().any(dim=0)[None]
    own = mask_probs >= mask_threshold
    segments = assigned & own
    if kept_area not in ("assigned", "segment"):
        raise ValueError(f"kept_area must be 'assigned' or 'segment', got {kept_area!r}")
    area = (assigned if kept_area == "assigned" else segments).flatten(1).sum(1)
    own_area = own.flatten(1).sum(1)
    accept = (own_area > 0) & (segments.flatten(1).any(1)) & (area > min_kept_fraction * own_area)
    return classes[accept], segments[accept]


# --------------------------------------------------------------------------------------------------
# PLOP
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def plop_pixel_stats(class_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel normalised entropy and argmax of the old model's class distribution.

    ``class_scores`` [..., K_old, H, W]: non-negative per-class scores over the old classes, e.g. the
    engine's semantic scores ``sum_q p_q(c) sigmoid(m_q(x))`` or probabilities; they are normalised over
    the class axis (a pixel whose scores are all 0 counts as uniform, i.e. maximally uncertain).
    Returns ``(entropy [..., H, W] in [0, 1], argmax [..., H, W] long)`` with the entropy
    ``-sum_c p_c log p_c / log K_old`` (0 when K_old = 1).

    Deviation from PLOP (train.py ``entropy`` and ``find_median``): the original divides
    ``-mean_c p_c log p_c / log C_old`` once more by ``log K_t``, i.e. its value is this one divided by
    ``C_old * log K_t``. The rescaling does not change which pixels pass a median threshold, but it
    makes the original's floor 0.001 equivalent to ``0.001 * C_old * log K_t`` here (about 0.05 for
    VOC 15-5, 0.5 for ADE 100-50): pass that floor to :func:`plop_thresholds` to reproduce it.
    """
    if class_scores.dim() < 3:
        raise ValueError(f"class scores must be [..., K_old, H, W], got shape {tuple(class_scores.shape)}")
    scores = class_scores.float()
    num_classes = scores.shape[-3]
    total = scores.sum(dim=-3, keepdim=True)
    probs = torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny),
                        torch.full_like(scores, 1.0 / num_classes))
    argmax = scores.argmax(dim=-3)
    if num_classes == 1:
        return torch.zeros_like(argmax, dtype=scores.dtype), argmax
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-3) / math.log(num_classes)
    return entropy.clamp(0.0, 1.0), argmax


def _check_classes(argmax: Tensor, num_classes: int) -> None:
    if argmax.numel() and (int(argmax.min()) < 0 or int(argmax.max()) >= num_classes):
        raise ValueError(f"argmax classes must be in 0..{num_classes - 1}, "
                         f"got {int(argmax.min())}..{int(argmax.max())}")


@torch.no_grad()
def plop_thresholds(entropies: Tensor, argmax: Tensor, num_classes: int, floor: float = 0.001) -> Tensor:
    """PLOP's per-class thresholds ``tau_c = max(median_c, floor)`` [num_classes], float32.

    ``entropies`` and ``argmax``: the normalised entropy and predicted old class of every pixel used for
    the statistics (the caller keeps only pixels not covered by a current-class target), any equal
    shapes. ``median_c`` is the true median of the entropies of the pixels predicted as c (the mean of the
    two middle values for an even count, as ``numpy.median``); a class with no pixel gets ``floor``, so
    only near-certain pixels of it become pseudo-labels. ``floor`` 0.001 = PLOP's ``--threshold``.

    Faithfulness note: PLOP builds a 100-bin histogram per class and its median loop accumulates the
    bin *index* instead of the bin count (``running_sum += i``, train.py L563-571), so its tau_c is not
    the median (usually the first bin holding half of the mass, or a value above 1 that accepts every
    pixel). This function computes the median the paper describes.
    """
    e = entropies.reshape(-1).float()
    c = argmax.reshape(-1).long()
    if e.shape != c.shape:
        raise ValueError(f"entropies {tuple(entropies.shape)} and argmax {tuple(argmax.shape)} differ")
    _check_classes(c, num_classes)
    tau = torch.full((num_classes,), float(floor), dtype=torch.float32, device=e.device)
    if e.numel() == 0:
        return tau
    # Sort by entropy, then stably by class: each class's entropies end up contiguous and sorted.
    e, order = e.sort()
    c, by_class = c[order].sort(stable=True)
    e = e[by_class]
    counts = torch.bincount(c, minlength=num_classes)
    starts = counts.cumsum(0) - counts
    present = counts > 0
    lo = (starts + (counts - 1).clamp_min(0) // 2)[present]
    hi = (starts + counts // 2)[present]
    tau[present] = ((e[lo] + e[hi]) / 2).clamp_min(floor)
    return tau


@torch.no_grad()
def plop_code_thresholds(entropies: Tensor, argmax: Tensor, num_classes: int, num_seen: int,
                         floor: float = 0.001, bins: int = 100) -> Tensor:
    """The thresholds PLOP's released code computes (train.py ``find_median``, entropy mode), on this module's
    entropy scale: the ``threshold_rule="plop-code"`` option of PLOP, to measure what the true median changes.

    Written from the code's behaviour, not copied: the code's entropy is ours divided by
    ``num_classes * log(num_seen)`` (:func:`plop_pixel_stats`); it bins it into ``bins`` (100) bins per old
    class; per class it walks the bins with a running sum that adds each bin's *index* (not its count) and
    stops at the first bin ``i`` with ``running <= n/2 <= running + count_i``; tau = ``i/bins + (n/2 -
    running) / count_i / bins``, then ``max(tau, floor)`` on the code's scale; the result is multiplied back
    to this module's scale. Classes without pixels get 0 in the code, hence ``floor`` here. When the walk
    passes every bin (the running sum of indices outgrows n/2 before the condition holds) it ends on the last,
    empty bin and the code divides by zero: -inf, so tau is the floor and almost no pixel of that class is
    pseudo-labelled. The code's entropy values are tiny (at most 1 / (C log K)), so they occupy the first
    bins only and tau is a value inside an early bin, or the floor: not the median.
    """
    e = entropies.reshape(-1).double()
    c = argmax.reshape(-1).long()
    _check_classes(c, num_classes)
    scale = num_classes * math.log(num_seen) if num_seen > 1 else 1.0
    y = (e / scale * bins).long().clamp(0, bins - 1)
    hist = torch.bincount(c * bins + y, minlength=num_classes * bins).view(num_classes, bins).double().cpu()
    tau = torch.zeros(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        total = float(hist[k].sum())
        if total <= 0:
            continue
        half, running = total / 2, 0.0
        for i in range(bins):
            if running <= half <= running + float(hist[k, i]):
                break
            running += i
        count, rest = float(hist[k, i]), half - running
        # an empty last bin divides by 0 as the code's tensors do: -inf (hence the floor) or +inf
        step = rest / count if count > 0 else (math.copysign(math.inf, rest) if rest != 0 else math.nan)
        tau[k] = i / bins + step / bins
    return (tau.clamp_min(floor) * scale).float()


@dataclass(eq=False)
class EntropyHistogram:
    """Streaming per-class entropy histograms for :func:`plop_thresholds` on datasets too large to keep
    every pixel (PLOP's own approach, with a finer grid and a correct median).

    ``update`` adds pixels; ``thresholds`` returns ``max(median_c, floor)`` with the median linearly
    interpolated inside its bin, within ``1 / bins`` of the true median (4096 bins: 2.4e-4).
    """

    num_classes: int
    bins: int = 4096
    counts: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_classes, self.bins, dtype=torch.long)

    @torch.no_grad()
    def update(self, entropy: Tensor, argmax: Tensor, valid: Tensor | None = None) -> None:
        e, c = entropy.reshape(-1).float(), argmax.reshape(-1).long()
        if valid is not None:
            keep = valid.reshape(-1).bool()
            e, c = e[keep], c[keep]
        _check_classes(c, self.num_classes)
        b = (e.clamp(0.0, 1.0) * self.bins).long().clamp_max(self.bins - 1)
        flat = torch.bincount(c * self.bins + b, minlength=self.num_classes * self.bins)
        self.counts += flat.view(self.num_classes, self.bins).cpu()

    def thresholds(self, floor: float = 0.001) -> Tensor:
        counts = self.counts.double()
        total = counts.sum(1)
        cum = counts.cumsum(1)
        half = total / 2
        # first bin whose cumulative count reaches half of the class's pixels
        idx = (cum < half[:, None]).sum(1).clamp_max(self.bins - 1)
        before = cum.gather(1, idx[:, None]).squeeze(1) - counts.gather(1, idx[:, None]).squeeze(1)
        inside = counts.gather(1, idx[:, None]).squeeze(1)
        frac = torch.where(inside > 0, (half - before) / inside.clamp_min(1), torch.zeros_like(half))
        median = (idx.double() + frac) / self.bins
        tau = torch.where(total > 0, median.clamp_min(floor), torch.full_like(median, floor))
        return tau.float()


@torch.no_grad()
def plop_pseudo_labels(entropy: Tensor, argmax: Tensor, tau: Tensor, uncovered: Tensor) -> tuple[Tensor, Tensor]:
    """PLOP's entropy rule as mask targets for one image.

    ``entropy``, ``argmax`` [H, W] from :func:`plop_pixel_stats`; ``tau`` [K_old] from
    :func:`plop_thresholds`; ``uncovered`` [H, W] bool: pixels not covered by a current-class target
    (and real, not padding). A pixel is pseudo-labelled with its argmax class c iff it is uncovered and
    ``entropy < tau_c`` (strict, train.py L701-713). Returns one mask per old class present:
    ``(labels [m] long ascending, masks [m, H, W] bool)``.
    """
    if not (entropy.shape == argmax.shape == uncovered.shape) or entropy.dim() != 2:
        raise ValueError(f"entropy {tuple(entropy.shape)}, argmax {tuple(argmax.shape)} and uncovered "
                         f"{tuple(uncovered.shape)} must be the same [H, W]")
    cls = argmax.long()
    valid = uncovered.bool() & (entropy < tau.to(entropy.device)[cls])
    present = torch.bincount(cls[valid], minlength=tau.shape[0]) > 0
    labels = present.nonzero().squeeze(1)
    masks = (cls[None] == labels[:, None, None]) & valid[None]
    return labels, masks


# --------------------------------------------------------------------------------------------------
# CisDQ
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def cisdq_pseudo_instances(class_logits: Tensor, mask_logits: Tensor, threshold: float = 0.5,
                           max_detections: int = 100) -> tuple[Tensor, Tensor]:
    """CisDQ's per-group pseudo-instances from the old model (QGKD, cisdq model ``losskd`` L7695-7798).

    ``class_logits`` [Q, C+1] (one group's final-layer logits, its no-object last) and ``mask_logits``
    [Q, h, w] of the same queries. Mask2Former's instance inference at mask resolution: the top
    ``min(Q, max_detections)`` (query, class) pairs by class probability (softmax over the C + 1 logits,
    no-object excluded); binary mask = logit > 0; score = class probability x mean sigmoid of the mask
    logits over the mask's pixels (0 for an empty mask); keep score > ``threshold`` (0.5). Returns
    ``(labels [m] long, group-local 0..C-1, masks [m, h, w] bool)``, best class probability first.
    """
    _check_pair(class_logits, mask_logits)
    q, num_cols = class_logits.shape
    size = (int(mask_logits.shape[-2]), int(mask_logits.shape[-1]))
    num_classes = num_cols - 1
    k = min(q * num_classes, q, max_detections)
    if k == 0:
        return _empty(size, mask_logits.device)
    probs = class_logits.float().softmax(dim=-1)[:, :-1]
    class_prob, flat = probs.flatten().topk(k)
    query, labels = flat // num_classes, flat % num_classes
    logits = mask_logits[query].float()
    masks = logits > 0
    mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    keep = class_prob * mask_score > threshold
    return labels[keep], masks[keep]
