"""MiB on the mask engine: unbiased cross-entropy, unbiased knowledge distillation, MiB initialisation.

Cermelli et al., "Modeling the Background for Incremental Learning in Semantic Segmentation", CVPR 2020
(fcdl94/MiB), in the mask-classification form of CoMFormer (Cermelli et al., CVPR 2023, fcdl94/CoMFormer,
README "MiB": ``CONT.DIST.KD_WEIGHT 200.0 CONT.DIST.UKD True CONT.DIST.UCE True``); details and line
references in ../shared/reference/baselines-original-code.md section 2 ("ref." below).

At step t > 0 (columns ``[old | new | no-object]``, the old model's ``[old | no-object]``):

* Unbiased CE on every decoder layer (ref. 2.2, CoMFormer ``continual/method_wrapper/loss.py`` L27-37): the
  engine's set loss with its class term replaced by :func:`methods.losses.unbiased_ce`, where the no-object
  probability absorbs the old classes; matched queries target their new class, the others no-object
  (weight 0.1, Mask2Former's). With the engine's ``mask_mode="softmax"`` (CoMFormer's MxF engine) the class
  term is CoMFormer's ``focal_uce_loss`` instead (per-query UCE, focal alpha 5 / gamma 1, mean over queries).
* Unbiased KD on the final layer (ref. 2.2, loss.py L90-106): :func:`methods.losses.unbiased_kd` between the
  old model's ``[old | no-object]`` distribution and the student's with its no-object merged with every new
  class, mean over all queries, weight 200.
* MiB's initialisation of the new rows (fcdl94/MiB ``modules/segmentation_module.py`` L85-97, ``init_balanced``):
  :func:`methods.losses.mib_init_` copies the no-object row into every new class and sets their biases and
  the no-object bias to ``b_no-object - log(|C_t| + 1)``; old logits are unchanged and the old no-object
  probability is split evenly over {no-object} and the new classes, so the KD starts at exactly 0.

Differences from the originals:
  * CoMFormer's adaptation has no initialisation (the new class block keeps PyTorch's default init, ref. 2.2);
    MiB's is on here (``mib_init=True``, methods.md) and can be turned off to reproduce CoMFormer's row.
  * The KD is CoMFormer's true KL per query, not the per-pixel original's cross-entropy divided by the number
    of old outputs with weight 10 (ref. 2.1); the weight 200 is CoMFormer's value for that form.
  * Queries of the old and new model are compared index by index, as in CoMFormer (ref. section 0).
Step 0 is the standard engine step: the loss equals fine-tuning's (the flags do nothing at step 0, as in
CoMFormer where ``uce`` requires ``old_classes != 0``, set_criterion.py L31).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from benchmark.errors import ConfigError
from methods.base import HParams, Method, StepContext
from methods.losses import kd_query_weights, mib_init_, unbiased_ce, unbiased_kd

if TYPE_CHECKING:  # pragma: no cover - typing only
    from benchmark.batch import Batch
    from benchmark.engine.outputs import ModelOutputs


@dataclass(frozen=True)
class MiBParams(HParams):
    """MiB's hyper-parameters (mask-classification form).

    kd_weight: weight of the unbiased KD, 200 (CoMFormer README "MiB", ``CONT.DIST.KD_WEIGHT 200.0``).
    kd_alpha: inverse temperature on the teacher's logits, 1 (MiB ``--alpha`` default 1, argparser.py;
        CoMFormer ``CONT.DIST.ALPHA 1.0``, continual/config.py L23).
    uce: replace the class term by the unbiased CE at t > 0 (CoMFormer ``CONT.DIST.UCE True``).
    mib_init: MiB's initialisation of the new class rows (MiB ``init_balanced``, segmentation_module.py
        L85-97; CoMFormer's adaptation had none).
    """

    kd_weight: float = 200.0
    kd_alpha: float = 1.0
    uce: bool = True
    mib_init: bool = True

    def __post_init__(self) -> None:
        if not self.kd_weight >= 0:
            raise ConfigError(f"mib: method.kd_weight={self.kd_weight!r} must be >= 0",
                              hint="200 is CoMFormer's MiB setting; 0 switches the KD off")
        if not self.kd_alpha > 0:
            raise ConfigError(f"mib: method.kd_alpha={self.kd_alpha!r} must be > 0",
                              hint="1.0 is the original (no temperature)")


# --------------------------------------------------------------------------------------------------
# helpers shared by the single-head baselines (MiB, PLOP, CoMFormer)
# --------------------------------------------------------------------------------------------------

def grow_head(model, ctx: StepContext, mib_init: bool) -> None:
    """Grow the class head to the step's seen columns, with MiB's initialisation of the new rows if asked."""
    model.grow_head(ctx.num_seen, init=mib_init_ if mib_init else None)


def check_single_head(name: str, outputs: "ModelOutputs", old_outputs: "ModelOutputs | None",
                      ctx: StepContext) -> None:
    """The shapes these single-head methods rely on, with a message that says what is wrong."""
    if outputs.num_groups != 1:
        raise ValueError(f"{name} works on a single-head model, got {outputs.num_groups} query groups")
    if outputs.num_columns != ctx.num_seen:
        raise ValueError(f"{name} step {ctx.step}: the model predicts {outputs.num_columns} columns, the step "
                         f"has {ctx.num_seen} seen classes (was configure_model called?)")
    if old_outputs is None:
        raise ValueError(f"{name} step {ctx.step} needs the previous model's outputs (needs_old_model is set; "
                         f"the engine passes them for t > 0)")
    if old_outputs.num_groups != 1 or old_outputs.num_columns != ctx.num_old:
        raise ValueError(f"{name} step {ctx.step}: the old model predicts {old_outputs.num_columns} columns in "
                         f"{old_outputs.num_groups} group(s), expected one head over the {ctx.num_old} old classes")


def mask_mode(ctx: StepContext) -> str:
    """The engine's mask normalisation ("sigmoid" standard, "softmax" CoMFormer's MxF)."""
    return getattr(ctx.criterion, "mask_mode", "sigmoid")


def unbiased_nll(logits: Tensor, targets: Tensor, num_old: int) -> Tensor:
    """Per-query ``-log p~(target)`` of :func:`methods.losses.unbiased_ce` (no reduction), [N].

    Needed for CoMFormer's ``focal_uce_loss`` (loss.py L16-24), which re-weights each query's UCE before
    averaging; ``unbiased_ce`` only returns the weighted mean.
    """
    z = logits.reshape(-1, logits.shape[-1]).float()
    log_p = z.log_softmax(dim=-1)
    no_object = torch.logsumexp(torch.cat([log_p[:, :num_old], log_p[:, -1:]], dim=-1), dim=-1)
    log_p = torch.cat([log_p[:, :-1], no_object[:, None]], dim=-1)
    return -log_p.gather(1, targets.reshape(-1, 1).long()).squeeze(1)


def unbiased_class_loss(criterion, num_old: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The criterion's ``class_loss`` hook for the unbiased CE, in the criterion's own class-loss form.

    Standard engine: weighted UCE with the criterion's no-object weight (CoMFormer loss.py L63-65 path).
    Softmax engine: focal UCE ``alpha (1 - e^-l)^gamma l`` averaged over all queries, no no-object weight
    (loss.py L16-24, set_criterion.py L60-62).
    """
    if getattr(criterion, "mask_mode", "sigmoid") == "softmax":
        alpha, gamma = criterion.focal_alpha, criterion.focal_gamma

        def focal_uce(logits: Tensor, targets: Tensor) -> Tensor:
            nll = unbiased_nll(logits, targets, num_old)
            return (alpha * (1 - torch.exp(-nll)) ** gamma * nll).mean()

        return focal_uce
    no_object_weight = criterion.no_object_weight

    def uce(logits: Tensor, targets: Tensor) -> Tensor:
        return unbiased_ce(logits, targets, num_old, no_object_weight)

    return uce


def final_kd(outputs: "ModelOutputs", old_outputs: "ModelOutputs", alpha: float,
             reweight_gamma: float | None = None) -> Tensor:
    """Unbiased KD on the final layer's class logits, query by query (CoMFormer loss.py L90-106).

    ``reweight_gamma``: CoMFormer's ``KD_REW`` query weights ``(1 - q_no-object)^gamma`` from the (tempered)
    teacher, normalised over all queries of the batch; None = plain mean (MiB).
    """
    old_logits = old_outputs.class_logits(0, -1).detach()
    if alpha != 1.0:
        old_logits = alpha * old_logits
    weights = None if reweight_gamma is None else kd_query_weights(old_logits, reweight_gamma)
    return unbiased_kd(outputs.class_logits(0, -1), old_logits, weights)


# --------------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------------

class MiB(Method):
    """MiB (see the module docstring): UCE on every layer + UKD (final layer, x200) + MiB initialisation."""

    name = "mib"
    needs_old_model = True
    hparams: MiBParams

    @classmethod
    def default_hparams(cls) -> MiBParams:
        return MiBParams()

    def configure_model(self, model, ctx: StepContext) -> None:
        grow_head(model, ctx, self.hparams.mib_init and ctx.step > 0)

    def loss(self, batch: "Batch", outputs: "ModelOutputs", old_outputs: "ModelOutputs | None",
             ctx: StepContext) -> dict[str, Tensor]:
        if ctx.step == 0:
            return super().loss(batch, outputs, old_outputs, ctx)
        hp = self.hparams
        check_single_head(self.name, outputs, old_outputs, ctx)
        class_loss = unbiased_class_loss(ctx.criterion, ctx.num_old) if hp.uce else None
        terms = ctx.criterion(outputs.layer_class_logits_of(0), outputs.layer_mask_logits, batch.targets,
                              class_loss=class_loss)
        if hp.kd_weight > 0:
            terms["kd"] = hp.kd_weight * final_kd(outputs, old_outputs, hp.kd_alpha)
        return terms
