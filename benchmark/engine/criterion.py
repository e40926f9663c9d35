"""The Mask2Former set criterion: Hungarian matching, class loss and point-sampled mask losses.

Standard mode (``mask_mode="sigmoid"``) is the loss of Mask2Former (Cheng et al., CVPR 2022;
facebookresearch/Mask2Former ``modeling/criterion.py`` and ``matcher.py``) as transformers 5.23 ships it
(``Mask2FormerLoss``): per image a Hungarian matching on the cost
``class_weight * (-p[c]) + mask_weight * BCE + dice_weight * dice`` over ``num_points`` uniformly drawn
points; cross-entropy over ``[classes | no-object]`` with the no-object class weighted 0.1; sigmoid BCE and
dice on ``num_points`` importance-sampled points (oversample 3, 75 % most uncertain); deep supervision
(every decoder layer matched and supervised on its own); weights 2 / 5 / 5 (Mask2Former's ADE configs).
With the same inputs and the same torch seed the terms equal the stock ``Mask2FormerLoss``: the random points
are drawn in the stock order (final layer first, then the others; per layer one draw per image for the
matching, then the loss draws).

Softmax mode (``mask_mode="softmax"``) is CoMFormer's "MxF" engine (Cermelli et al., CVPR 2023; fcdl94/CoMFormer
``mask2former/modeling/matcher.py`` SoftmaxMatcher, ``continual/method_wrapper/set_criterion.py``
SoftmaxKDSetCriterion, ``continual/method_wrapper/loss.py`` focal_loss): mask probabilities are a softmax over
the queries at every pixel; the matching cost is the negative harmonic mean ``-2 p d / (p + d)`` of the class
probability ``p`` and the soft dice coefficient ``d = (2 sum(s g) + 1) / (sum(s) + sum(g) + 1)``; the mask term is
``mean_points(-g log s)`` and the dice term ``1 - d`` on importance-sampled points (uncertainty ``-|2 s - 1|``);
the class term is a focal cross-entropy ``alpha (1 - p_t)^gamma CE`` (alpha 5, gamma 1, CoMFormer's
``mask2former/config.py``) averaged over all queries, without no-object down-weighting. The softmax runs over the
queries handed to the criterion (a query group's own queries when a method passes one group).

Cheaper than stock at equal numerics: target masks are converted to float once per call (not per layer),
target points are sampled directly from the unpadded targets (stock pads and gathers full-resolution masks
per layer), and each layer's cost matrices reach the CPU in one transfer (stock: one per image).

Under ``torch.distributed`` the number of target masks is averaged over ranks (an all-reduce), as in
Mask2Former: every rank must then call the criterion the same number of times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from transformers.models.mask2former.modeling_mask2former import (
    dice_loss,
    pair_wise_dice_loss,
    pair_wise_sigmoid_cross_entropy_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)

from benchmark.batch import Target
from benchmark.errors import ConfigError

MASK_MODES = ("sigmoid", "softmax")
POINT_SAMPLINGS = ("random", "grid")

# One matching of one layer: per image (query indices, target indices), int64 CPU tensors.
Matching = list[tuple[Tensor, Tensor]]
ClassLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SetCriterion:
    """Callable set loss; one instance serves every head size, query group and target set.

    ``num_points``: 12544 (= 112 x 112) in Mask2Former's configs; CPU presets use fewer
    (``ModelPreset.train_num_points``). ``focal_alpha`` / ``focal_gamma`` only apply to ``mask_mode="softmax"``.
    """

    num_points: int = 12544
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    mask_mode: str = "sigmoid"
    focal_alpha: float = 5.0
    focal_gamma: float = 1.0
    # "random": Mask2Former's points (uniform for the matching, importance-sampled for the loss). "grid": the
    # centres of a fixed sqrt(num_points) x sqrt(num_points) grid for both, the same for every image, layer and
    # mask: no random draw. With a mask-logit map of exactly that size (the tiny preset: 256 points, 16x16 logits
    # of a 64-px crop) the grid is every logit pixel once, so the loss is the dense loss Mask2Former's point
    # sampling approximates at high resolution, without its sampling noise or its 3x-oversampled uncertainty pass.
    # No preset uses it: with 480 validation images on synth-10-5 (3 seeds, 2026-12-06) it lowered the rms std
    # over seeds of the final scores from 4.46 to 3.84 but raised the largest (results/reference-experiments/).
    point_sampling: str = "random"

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"unknown mask_mode {self.mask_mode!r} for the set criterion",
                              hint=f"use one of {', '.join(MASK_MODES)}")
        if self.point_sampling not in POINT_SAMPLINGS:
            raise ConfigError(f"unknown point_sampling {self.point_sampling!r} for the set criterion",
                              hint=f"use one of {', '.join(POINT_SAMPLINGS)}")
        if self.num_points < 1:
            raise ConfigError(f"the set criterion needs num_points >= 1, got {self.num_points}",
                              hint="Mask2Former uses 12544; CPU presets use about 1000")
        if self.point_sampling == "grid" and math.isqrt(self.num_points) ** 2 != self.num_points:
            raise ConfigError(f"point_sampling 'grid' needs a square num_points, got {self.num_points}",
                              hint="e.g. 256 (16 x 16) or 12544 (112 x 112)")
        if self.oversample_ratio < 1:
            raise ConfigError(f"oversample_ratio must be >= 1, got {self.oversample_ratio}",
                              hint="Mask2Former uses 3.0")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise ConfigError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}",
                              hint="Mask2Former uses 0.75")

    # --- public API ----------------------------------------------------------------------------
    def __call__(self, class_logits: Sequence[Tensor], mask_logits: Sequence[Tensor], targets: Sequence[Target],
                 *, class_loss: ClassLoss | None = None, indices: Sequence[Matching] | None = None,
                 no_object_scale: Tensor | None = None) -> dict[str, Tensor]:
        """Weighted terms ``{"ce", "mask", "dice"}``, each summed over the decoder layers.

        class_logits: per layer [B, Q, C + 1] (no-object last); mask_logits: per layer [B, Q, h, w].
        targets: one per image; ``labels`` are the head's local classes 0..C-1, ``masks`` [n, H, W] (bool or
        float) at the padded input resolution, or any resolution covering the same padded extent (points are
        sampled in normalised coordinates). Images without targets are fine.
        class_loss: replaces the class term: ``class_loss(logits [B, Q, C + 1], target_classes [B, Q])`` with
        no-object = C; the criterion multiplies it by ``class_weight`` (e.g. MiB's unbiased CE).
        indices: a matching per layer (from :meth:`match`) to reuse instead of matching again.
        no_object_scale: [B] per-image factors of the no-object weight in the standard cross-entropy (the
        numerator's unmatched queries weigh ``no_object_weight * scale_b``); the normaliser stays the standard
        one, ``sum`` of the unscaled weights (BalConpas's balanced anti-misguidance weighting, reference B5.1).
        """
        return self.loss_and_matching(class_logits, mask_logits, targets, class_loss=class_loss, indices=indices,
                                      no_object_scale=no_object_scale)[0]

    def loss_and_matching(self, class_logits: Sequence[Tensor], mask_logits: Sequence[Tensor],
                          targets: Sequence[Target], *, class_loss: ClassLoss | None = None,
                          indices: Sequence[Matching] | None = None, no_object_scale: Tensor | None = None
                          ) -> tuple[dict[str, Tensor], list[Matching]]:
        """:meth:`__call__`'s terms and the matching it used at every layer (in layer order), for methods that
        select queries by their matched target (BalConpas's distillation of queries matched to pseudo-labels)."""
        num_layers = len(class_logits)
        if num_layers == 0 or len(mask_logits) != num_layers:
            raise ValueError(f"the set criterion needs one class and one mask tensor per decoder layer, got "
                             f"{num_layers} and {len(mask_logits)}")
        if indices is not None and len(indices) != num_layers:
            raise ValueError(f"indices must hold one matching per layer ({num_layers}), got {len(indices)}")
        prepared = _Targets.build(targets, class_logits[-1], mask_logits[-1])
        for logits, masks in zip(class_logits, mask_logits):
            prepared.check_shapes(logits, masks)
        num_masks = _num_masks(prepared.total, class_logits[-1].device)

        if no_object_scale is not None and (class_loss is not None or self.mask_mode != "sigmoid"):
            raise ValueError("no_object_scale applies to the standard cross-entropy only")
        terms: dict[str, list[Tensor]] = {"ce": [], "mask": [], "dice": []}
        matchings: list[Matching | None] = [None] * num_layers
        # The final layer first, then the others in order: the order in which stock draws its random points.
        for layer in (num_layers - 1, *range(num_layers - 1)):
            logits, masks = class_logits[layer], mask_logits[layer]
            matching = self._match(logits, masks, prepared) if indices is None else indices[layer]
            matchings[layer] = matching
            flat = prepared.flatten(matching, logits.device)
            terms["ce"].append(self.class_weight * self._class_term(logits, prepared, flat, class_loss,
                                                                    no_object_scale))
            mask_term, dice_term = self._mask_terms(masks, prepared, flat, num_masks)
            terms["mask"].append(self.mask_weight * mask_term)
            terms["dice"].append(self.dice_weight * dice_term)
        return {name: torch.stack(values).sum() for name, values in terms.items()}, matchings

    def match(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[Target]) -> Matching:
        """The Hungarian matching of one layer: per image (query indices, target indices), int64 on the CPU.

        Query indices are sorted; when an image has more targets than queries only ``Q`` targets are matched.
        """
        prepared = _Targets.build(targets, class_logits, mask_logits)
        prepared.check_shapes(class_logits, mask_logits)
        return self._match(class_logits, mask_logits, prepared)

    # --- matching ------------------------------------------------------------------------------
    @torch.no_grad()
    def _match(self, class_logits: Tensor, mask_logits: Tensor, prepared: "_Targets") -> Matching:
        batch, num_queries = class_logits.shape[:2]
        device = mask_logits.device
        coords = self._uniform_points(batch, device)
        if prepared.total == 0:
            return [_empty_match() for _ in range(batch)]
        with torch.autocast(device.type, enabled=False):
            masks = mask_logits.float()
            if self.mask_mode == "softmax":
                masks = masks.softmax(dim=1)
            pred_points = self._sample(masks, coords)                                 # [B, Q, P]
            target_points = prepared.sample(coords.repeat_interleave(prepared.counts_tensor(device), dim=0))
            class_probs = class_logits.float().softmax(-1)
            costs = []
            for b, (start, count) in enumerate(zip(prepared.offsets, prepared.counts)):
                labels = prepared.labels[start:start + count]
                pred, tgt = pred_points[b], target_points[start:start + count]
                if self.mask_mode == "sigmoid":
                    cost = (self.mask_weight * pair_wise_sigmoid_cross_entropy_loss(pred, tgt)
                            + self.class_weight * -class_probs[b][:, labels]
                            + self.dice_weight * pair_wise_dice_loss(pred, tgt))
                else:
                    prob = class_probs[b][:, labels]
                    dice = (2 * pred @ tgt.T + 1) / (pred.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
                    cost = -2 * prob * dice / (prob + dice)
                costs.append(cost.flatten())
            flat = torch.cat(costs)
            big = torch.finfo(flat.dtype).max
            # Invalid costs are matched last instead of crashing the assignment (as stock).
            flat = torch.nan_to_num(flat, nan=big, posinf=big, neginf=big).cpu()
        matching: Matching = []
        position = 0
        for count in prepared.counts:
            if count == 0:
                matching.append(_empty_match())
                continue
            cost = flat[position:position + num_queries * count].view(num_queries, count)
            position += num_queries * count
            rows, cols = linear_sum_assignment(cost.numpy())
            matching.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matching

    # --- losses --------------------------------------------------------------------------------
    def _class_term(self, class_logits: Tensor, prepared: "_Targets", flat: "_FlatMatch",
                    class_loss: ClassLoss | None, no_object_scale: Tensor | None = None) -> Tensor:
        batch, num_queries, width = class_logits.shape
        num_classes = width - 1
        target_classes = torch.full((batch, num_queries), num_classes, dtype=torch.int64,
                                    device=class_logits.device)
        target_classes[flat.image, flat.query] = prepared.labels[flat.target]
        if class_loss is not None:
            return class_loss(class_logits, target_classes)
        logits = class_logits.float().transpose(1, 2)
        if self.mask_mode == "softmax":
            ce = F.cross_entropy(logits, target_classes, reduction="none")
            return (self.focal_alpha * (1 - torch.exp(-ce)) ** self.focal_gamma * ce).mean()
        weight = torch.ones(width, device=class_logits.device)
        weight[-1] = self.no_object_weight
        if no_object_scale is None:
            return F.cross_entropy(logits, target_classes, weight)
        per_query = weight[target_classes]                                   # [B, Q] the standard weights
        scale = torch.where(target_classes == num_classes,
                            no_object_scale.to(per_query)[:, None].expand_as(per_query), torch.ones_like(per_query))
        ce = F.cross_entropy(logits, target_classes, reduction="none")        # [B, Q]
        return (per_query * scale * ce).sum() / per_query.sum()

    def _mask_terms(self, mask_logits: Tensor, prepared: "_Targets", flat: "_FlatMatch",
                    num_masks: float) -> tuple[Tensor, Tensor]:
        if flat.size == 0:
            # No pair to supervise: a zero that keeps the mask branch in the graph (DDP expects every
            # parameter that produced the loss to receive a gradient).
            zero = mask_logits.sum() * 0.0
            return zero, zero
        if self.mask_mode == "sigmoid":
            # float32 like the points: mask logits may be half precision under AMP.
            pred = mask_logits[flat.image, flat.query][:, None].float()               # [M, 1, h, w]
            with torch.no_grad():
                coords = self._importance_points(pred, lambda logits: -logits.abs())
                labels = prepared.sample_pairs(coords, flat.target)
            logits = self._sample(pred, coords).squeeze(1)
            return (sigmoid_cross_entropy_loss(logits, labels, num_masks),
                    dice_loss(logits, labels, num_masks))
        probs = mask_logits.float().softmax(dim=1)[flat.image, flat.query][:, None]
        log_probs = mask_logits.float().log_softmax(dim=1)[flat.image, flat.query][:, None]
        with torch.no_grad():
            coords = self._importance_points(probs, lambda p: -(2 * p - 1).abs())
            labels = prepared.sample_pairs(coords, flat.target)
        point_probs = self._sample(probs, coords).squeeze(1)
        point_log_probs = self._sample(log_probs, coords).squeeze(1)
        mask_term = (-point_log_probs * labels).mean(1).sum() / num_masks
        dice = (2 * (point_probs * labels).sum(-1) + 1) / (point_probs.sum(-1) + labels.sum(-1) + 1)
        return mask_term, (1 - dice).sum() / num_masks

    def _sample(self, maps: Tensor, coords: Tensor) -> Tensor:
        """``sample_point(maps [N, C, h, w], coords) -> [N, C, P]``; on the grid of a map of exactly the grid's
        size the bilinear samples are the pixels themselves (centres, ``align_corners=False``), read directly."""
        side = math.isqrt(self.num_points)
        if self.point_sampling == "grid" and maps.shape[-2:] == (side, side):
            return maps.flatten(-2)
        return sample_point(maps, coords, align_corners=False)

    def _uniform_points(self, count: int, device: torch.device) -> Tensor:
        """The matching's [count, P, 2] points: one uniform draw per image, as stock does (same random stream for
        a given seed), or the fixed grid."""
        if self.point_sampling == "grid":
            return self._grid(device).expand(count, -1, -1)
        return torch.cat([torch.rand(1, self.num_points, 2, device=device) for _ in range(count)])

    def _grid(self, device: torch.device) -> Tensor:
        """[1, P, 2] (x, y) centres of the regular sqrt(P) x sqrt(P) grid in [0, 1]."""
        side = math.isqrt(self.num_points)
        centres = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        return torch.stack([x.flatten(), y.flatten()], dim=-1)[None]

    def _importance_points(self, maps: Tensor, uncertainty: Callable[[Tensor], Tensor]) -> Tensor:
        """PointRend's uncertainty sampling as Mask2Former uses it: [M, P, 2] coordinates in [0, 1]
        (the fixed grid when ``point_sampling`` is "grid")."""
        count = maps.shape[0]
        if self.point_sampling == "grid":
            return self._grid(maps.device).expand(count, -1, -1)
        num_sampled = int(self.num_points * self.oversample_ratio)
        coords = torch.rand(count, num_sampled, 2, device=maps.device)
        scores = uncertainty(sample_point(maps, coords, align_corners=False))[:, 0]   # [M, num_sampled]
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        top = torch.topk(scores, k=num_uncertain, dim=1)[1]
        coords = torch.gather(coords, 1, top[..., None].expand(-1, -1, 2))
        num_random = self.num_points - num_uncertain
        if num_random > 0:
            coords = torch.cat([coords, torch.rand(count, num_random, 2, device=maps.device)], dim=1)
        return coords


# --- helpers -----------------------------------------------------------------------------------
@dataclass
class _FlatMatch:
    """A matching flattened over the batch, as device index tensors (image, query, global target)."""

    image: Tensor
    query: Tensor
    target: Tensor

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


@dataclass
class _Targets:
    """A batch's targets prepared once per call: labels concatenated, masks as float (stacked when possible)."""

    labels: Tensor                  # [N] int64, on the logits' device
    counts: list[int]
    offsets: list[int]
    stacked: Tensor | None          # [N, 1, H, W] float when every image's masks have one size
    per_image: list[Tensor]         # [n_b, 1, H_b, W_b] float per image otherwise

    @property
    def total(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def build(targets: Sequence[Target], class_logits: Tensor, mask_logits: Tensor) -> "_Targets":
        batch, _, width = class_logits.shape
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
        device = class_logits.device
        counts = [len(t) for t in targets]
        offsets = [sum(counts[:b]) for b in range(batch)]
        labels = [t.labels.to(device=device, dtype=torch.int64) for t in targets]
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
        for b, t in enumerate(targets):
            if t.masks.dim() != 3 or t.masks.shape[0] != counts[b]:
                raise ValueError(f"image {b}: target masks must be [n, H, W] with n = {counts[b]} labels, "
                                 f"got {tuple(t.masks.shape)}")
        if all_labels.numel() and bool(((all_labels < 0) | (all_labels >= width - 1)).any()):
            raise ValueError(f"target labels must be the head's local classes 0..{width - 2} (no-object "
                             f"{width - 1} is implicit), got {sorted(set(all_labels.tolist()))}")
        masks = [t.masks.to(device=mask_logits.device) for t in targets]
        sizes = {tuple(m.shape[-2:]) for m, n in zip(masks, counts) if n}
        stacked, per_image = None, []
        if len(sizes) <= 1:
            if sum(counts):
                stacked = torch.cat([m for m, n in zip(masks, counts) if n]).float()[:, None]
        else:
            per_image = [m.float()[:, None] for m in masks]
        return _Targets(all_labels, counts, offsets, stacked, per_image)

    def check_shapes(self, class_logits: Tensor, mask_logits: Tensor) -> None:
        if class_logits.dim() != 3 or mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
            raise ValueError(f"class logits [B, Q, C+1] and mask logits [B, Q, h, w] must agree, got "
                             f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
        if class_logits.shape[0] != len(self.counts):
            raise ValueError(f"{len(self.counts)} targets for a batch of {class_logits.shape[0]} images")
        if class_logits.shape[1] == 0:
            raise ValueError("the set criterion needs at least one query")

    def counts_tensor(self, device: torch.device) -> Tensor:
        return torch.tensor(self.counts, dtype=torch.int64, device=device)

    def sample(self, coords: Tensor) -> Tensor:
        """Target values at per-target points: coords [N, P, 2] -> [N, P] (bilinear, as stock)."""
        if self.stacked is not None:
            return sample_point(self.stacked, coords, align_corners=False).squeeze(1)
        parts = [sample_point(masks, coords[start:start + count], align_corners=False).squeeze(1)
                 for masks, start, count in zip(self.per_image, self.offsets, self.counts) if count]
        return torch.cat(parts)

    def sample_pairs(self, coords: Tensor, target: Tensor) -> Tensor:
        """Values of the matched targets at each pair's points: coords [M, P, 2] -> [M, P].

        Samples every target once at its pair's points instead of gathering full-resolution masks.
        """
        by_target = coords.new_zeros(self.total, *coords.shape[1:])
        by_target[target] = coords
        return self.sample(by_target)[target]

    def flatten(self, matching: Matching, device: torch.device) -> _FlatMatch:
        if len(matching) != len(self.counts):
            raise ValueError(f"a matching for {len(matching)} images, the batch has {len(self.counts)}")
        images, queries, targets = [], [], []
        for b, (rows, cols) in enumerate(matching):
            rows, cols = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
            images.append(torch.full_like(rows, b))
            queries.append(rows)
            targets.append(cols + self.offsets[b])
        cat = torch.cat
        return _FlatMatch(cat(images).to(device), cat(queries).to(device), cat(targets).to(device))


def _empty_match() -> tuple[Tensor, Tensor]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


def _num_masks(total: int, device: torch.device) -> float | Tensor:
    """Target masks per image batch, averaged over ranks under DDP (Mask2Former's normaliser), at least 1."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor(float(total), device=device)
        dist.all_reduce(count)
        return torch.clamp(count / dist.get_world_size(), min=1)
    return float(max(total, 1))
