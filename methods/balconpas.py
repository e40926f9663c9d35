"""BalConpas: past-class backtrace distillation and balanced anti-misguidance on pseudo-labelled targets.

Chen et al., "Strike a Balance in Continual Panoptic Segmentation", ECCV 2024; code jinpeng0528/BalConpas @3b76142
(no license: re-implemented, nothing copied). What the code does is in
../shared/reference/eclipse-balconpas-original-code.md part B ("ref." below). BalConpas counts steps from 1; here
step 0 is its base step ("step 1").

* Model (ref. B1-B3): plain Mask2Former with the softmax classifier, the no-object logit last; nothing is frozen.
  Step 0 is the shared standard step. A new step's class rows keep PyTorch's default ``nn.Linear`` init (the
  original adds a ``Linear(256, I)`` head that the checkpoint does not hold): :func:`linear_default_init_`.
* Pseudo-labels (ref. B4, B6): the frozen previous model's final prediction on the same batch: queries whose
  softmax arg-max is not no-object (no score threshold), masks = sigmoid of the mask logits resized to the targets'
  resolution, each pixel to the query with the largest ``score * mask``, ground-truth pixels removed, a segment kept
  when it is not empty and more than 0.8 (the test ``OVERLAP_THRESHOLD`` reused) of the query's own mask area
  (:func:`methods.pseudo_labels.comformer_pseudo_labels` with ``kept_area="segment"``). They are put *before* the
  ground truth in each image's targets and matched with it (criterion.py L254-266).
* Set loss (ref. B5): the engine's Mask2Former loss on ``[pseudo-labels ; ground truth]`` at every layer (class 2,
  mask 5, dice 5, no-object 0.1; ``N_masks`` counts the pseudo-labels).
* PCBD, past-class backtrace distillation (ref. B5.3): the queries matched at the **final** layer to pseudo-labels;
  for every prediction level (level 0 = the learnable queries themselves) the MSE between the student's and the
  frozen model's raw query states (before the decoder's LayerNorm: ``ModelOutputs.layer_query_states``) of those
  queries, mean over queries x channels, weight 5 per level (``CONT.MED_TOKENS_WEIGHT``), summed over levels.
* BAM, balanced anti-misguidance (ref. B5.1): only when the batch holds replayed images (``balconpas-r``; ``replay``
  flags of the batch): unmatched queries of replayed images get no-object weight 0, those of current images
  ``0.1 * (bg_replay + bg_current) / bg_current``, normalised by the standard weight sum
  (:func:`bam_no_object_scale`, the criterion's ``no_object_scale``). Replayed images get no pseudo-labels.

Defects of the original fixed here (documented, not reproduced):
* PCBD with no selected query in the whole batch is ``mse_loss`` of empty tensors, NaN (B11.4): here it is 0.
* The semantic mapper keeps the first class of the next step as a target (off-by-one, B11.1): the engine's data
  layer gives only the step's classes.
* On replayed images the original selects PCBD queries by the count of pseudo-labels the old model would have given
  (B5.3, a bug): replayed images have no pseudo-labels, so none of their queries is distilled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.batch import Target
from benchmark.errors import ConfigError
from methods.base import HParams, Method, StepContext
from methods.pseudo_labels import comformer_pseudo_labels

if TYPE_CHECKING:  # pragma: no cover - typing only
    from benchmark.batch import Batch
    from benchmark.engine.outputs import ModelOutputs


@dataclass(frozen=True)
class BalConpasParams(HParams):
    """BalConpas's hyper-parameters (ref. B5, B6, B9: the same in every setting of the release).

    pcbd_weight: ``CONT.MED_TOKENS_WEIGHT`` 5, applied to every level.
    pseudo_kept_fraction: a pseudo-segment is kept when larger than this share of its query's mask (0.8).
    mask_threshold: the mask probability that makes a pixel part of a query's mask (0.5).
    memory_size: replay memory of ``balconpas-r`` (300 images, ``memory_selection_*.py`` L96).
    """

    pcbd_weight: float = 5.0
    pseudo_kept_fraction: float = 0.8
    mask_threshold: float = 0.5
    memory_size: int = 300

    def __post_init__(self) -> None:
        if not self.pcbd_weight >= 0:
            raise ConfigError(f"balconpas: method.pcbd_weight={self.pcbd_weight!r} must be >= 0",
                              hint="the original uses 5; 0 switches the distillation off")
        if not 0 <= self.pseudo_kept_fraction < 1:
            raise ConfigError(f"balconpas: method.pseudo_kept_fraction={self.pseudo_kept_fraction!r} must be in "
                              f"[0, 1)", hint="the original uses 0.8")
        if self.memory_size < 0:
            raise ConfigError(f"balconpas: method.memory_size={self.memory_size!r} must be >= 0",
                              hint="the original keeps 300 images")


def linear_default_init_(head: nn.Linear, num_old: int) -> None:
    """New class rows ``num_old .. C-1`` with PyTorch's default Linear init, U(-1/sqrt(D), 1/sqrt(D)) for weight
    and bias (kaiming-uniform with a = sqrt(5)); the no-object row (last) is kept (ref. B3)."""
    bound = 1.0 / math.sqrt(head.in_features)
    head.weight[num_old:-1].uniform_(-bound, bound)
    head.bias[num_old:-1].uniform_(-bound, bound)


def pseudo_targets(old_outputs: "ModelOutputs", targets: Sequence[Target], replay: Sequence[bool],
                   kept_fraction: float = 0.8, mask_threshold: float = 0.5) -> tuple[list[Target], list[int]]:
    """``[pseudo-labels ; ground truth]`` per image and the number of pseudo-labels (first entries) of each.

    Replayed images keep their ground truth only (ref. B4 step 5).
    """
    class_logits = old_outputs.class_logits(0).detach()
    mask_logits = old_outputs.mask_logits(0).detach()
    out, counts = [], []
    for b, target in enumerate(targets):
        if replay[b]:
            out.append(target)
            counts.append(0)
            continue
        labels, masks = comformer_pseudo_labels(class_logits[b], mask_logits[b], target.masks,
                                                mask_threshold=mask_threshold, min_kept_fraction=kept_fraction,
                                                kept_area="segment")
        out.append(Target(torch.cat([labels.to(target.labels), target.labels]),
                          torch.cat([masks.to(target.masks.dtype), target.masks])))
        counts.append(int(labels.shape[0]))
    return out, counts


def pcbd_queries(matching: Sequence[tuple[Tensor, Tensor]], num_pseudo: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(image, query) index pairs of the queries matched to a pseudo-label (target index < n_i)."""
    images, queries = [], []
    for b, (rows, cols) in enumerate(matching):
        chosen = rows[cols < num_pseudo[b]]
        images.append(torch.full_like(chosen, b))
        queries.append(chosen)
    return torch.cat(images), torch.cat(queries)


def pcbd_loss(new_states: Sequence[Tensor], old_states: Sequence[Tensor], images: Tensor, queries: Tensor
              ) -> Tensor:
    """Sum over levels of the MSE between the selected queries' states [B, Q, D] (0 when none is selected)."""
    if images.numel() == 0:
        return sum(s.sum() * 0.0 for s in new_states)
    images, queries = images.to(new_states[0].device), queries.to(new_states[0].device)
    return sum(F.mse_loss(new[images, queries].float(), old[images, queries].detach().float())
               for new, old in zip(new_states, old_states))


def bam_no_object_scale(num_queries: int, num_targets: Sequence[int], replay: Sequence[bool]) -> Tensor | None:
    """Per-image factors of the no-object weight (ref. B5.1), or None when no image is replayed.

    Unmatched queries per image = ``Q - min(Q, n_targets)``. Replayed images: 0. Current images:
    ``(bg_replay + bg_current) / bg_current`` (only if bg_current > 0), so the batch's total no-object weight is
    unchanged but sits on the current images.
    """
    if not any(replay):
        return None
    background = [num_queries - min(num_queries, n) for n in num_targets]
    bg_replay = sum(bg for bg, r in zip(background, replay) if r)
    bg_current = sum(bg for bg, r in zip(background, replay) if not r)
    factor = (bg_replay + bg_current) / bg_current if bg_current > 0 else 1.0
    return torch.tensor([0.0 if r else factor for r in replay])


class BalConpas(Method):
    """BalConpas without replay (the setting that compares with exemplar-free methods); see the module docstring."""

    name = "balconpas"
    needs_old_model = True
    hparams: BalConpasParams

    @classmethod
    def default_hparams(cls) -> BalConpasParams:
        return BalConpasParams()

    def configure_model(self, model, ctx: StepContext) -> None:
        model.grow_head(ctx.num_seen, init=linear_default_init_)

    def loss(self, batch: "Batch", outputs: "ModelOutputs", old_outputs: "ModelOutputs | None",
             ctx: StepContext) -> dict[str, Tensor]:
        if ctx.step == 0:
            return super().loss(batch, outputs, old_outputs, ctx)
        if old_outputs is None:
            raise ValueError(f"balconpas step {ctx.step} needs the previous model's outputs")
        hp = self.hparams
        replay = list(getattr(batch, "replay", None) or [False] * len(batch))
        targets, num_pseudo = pseudo_targets(old_outputs, batch.targets, replay, hp.pseudo_kept_fraction,
                                             hp.mask_threshold)
        num_queries = outputs.layer_mask_logits[-1].shape[1]
        scale = bam_no_object_scale(num_queries, [len(t) for t in targets], replay)
        terms, matchings = ctx.criterion.loss_and_matching(
            outputs.layer_class_logits_of(0), outputs.layer_mask_logits, targets,
            no_object_scale=None if scale is None else scale.to(outputs.layer_mask_logits[-1].device))
        images, queries = pcbd_queries(matchings[-1], num_pseudo)
        terms["pcbd"] = hp.pcbd_weight * pcbd_loss(outputs.layer_query_states, old_outputs.layer_query_states,
                                                   images, queries)
        return terms


# The release keeps 300 images for ADE20K (25,574 panoptic / 20,210 semantic training images: about 1.5 %). The
# embedded synthetic data has 600 training images; decision: the same share, 10 images, on every synthetic protocol.
SYNTH_MEMORY_SIZE = 10


class BalConpasR(BalConpas):
    """``balconpas-r``: BalConpas with its class-proportional replay memory (run only when named)."""

    name = "balconpas-r"

    @classmethod
    def protocol_overrides(cls, protocol_name: str) -> dict[str, Any]:
        return {"memory_size": SYNTH_MEMORY_SIZE} if protocol_name.startswith("synth") else {}

    def replay_size(self) -> int:
        return self.hparams.memory_size
