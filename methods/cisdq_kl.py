"""CisDQ's alternative distillation (``cisdq_ade`` / ``cisdq_voc``): KL on classes, SmoothL1 on masks.

../shared/reference/cisdq-original-code.md section 2.4 (model l. 8093-9314 of weijiawu/CisDQ). Per old group
g with n_g queries and N = sum_g n_g old queries, final decoder layer, identity query correspondence:

  class: (n_g / N) * w0 * (1 / (B n_g)) * sum_{b,q} KL(softmax(teacher) || softmax(student))  (C_g + 1 classes)
  mask:  (n_g / N) * w1 * SmoothL1(student mask logits, teacher mask logits)                  (beta 1, mean)

Summed over the groups these are plain means over every old query: the KL sum over all old queries divided
by B * N, and the SmoothL1 mean over all old queries' mask pixels (the groups' n_g weights cancel the
per-group means). :func:`kl_distillation` returns those two unweighted values; the method multiplies by
w0 / w1 and adds the POD terms (w2, w3, w4) and the new group's ground-truth loss times w5.

``self.w`` per setting is data (:data:`KL_WEIGHTS`, :func:`kl_weights_for`); for VOC the ``cisdq_voc``
column is used (the variant written for VOC), for the other datasets the ``cisdq_ade`` column (the two agree
outside VOC).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    from benchmark.engine.outputs import ModelOutputs

# (w0 KL, w1 mask SmoothL1, w2 POD-res, w3 POD-mask, w4 POD-query, w5 new-GT), model l. 8165 / 8777.
# "everything else" row of the table: ADE 100-10, 100-5, ADE-instance, VOC 15-1 / 10-1.
KL_WEIGHTS_DEFAULT: tuple[float, ...] = (300.0, 5.0, 100.0, 10000.0, 1.0, 0.1)
KL_WEIGHTS: dict[str, tuple[float, ...]] = {
    "ade-100-50": (300.0, 5.0, 10.0, 1000.0, 0.2, 1.0),
    "ade-50-50": (300.0, 5.0, 10.0, 1000.0, 0.2, 1.0),
    "voc-15-5": (300.0, 5.0, 100.0, 10000.0, 1.0, 0.1),     # cisdq_voc (cisdq_ade: 300,5,10,1000,0.2,1)
    "voc-19-1": (300.0, 5.0, 1.0, 100.0, 0.1, 1.0),         # cisdq_voc (cisdq_ade: 300,5,10,1000,0.2,1)
    "voc-15-1": KL_WEIGHTS_DEFAULT,
    "voc-10-1": KL_WEIGHTS_DEFAULT,
    "coco-40-40": (120.0, 2.0, 10.0, 1000.0, 1.0, 0.4),
}
# "other coco_incrementalins" row (40-20, 40-8, 40-4, 60-20).
KL_WEIGHTS_COCO: tuple[float, ...] = (300.0, 5.0, 10.0, 1000.0, 0.2, 0.1)


def split_name(protocol_name: str) -> str:
    """``voc-15-5-disjoint@b~synth`` -> ``voc-15-5``: the split the original's weight table is keyed by."""
    name = protocol_name.lower().split("~")[0].split("@")[0]
    for suffix in ("-disjoint", "-overlap"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def kl_weights_for(protocol_name: str) -> tuple[float, ...]:
    """The variant's weight row for a protocol (ref. 2.4 table)."""
    split = split_name(protocol_name)
    if split in KL_WEIGHTS:
        return KL_WEIGHTS[split]
    if split.startswith("coco-"):
        return KL_WEIGHTS_COCO
    return KL_WEIGHTS_DEFAULT


def kl_distillation(outputs: "ModelOutputs", old_outputs: "ModelOutputs", num_old_groups: int
                    ) -> tuple[Tensor, Tensor]:
    """(KL, SmoothL1) of the old groups' final-layer predictions, unweighted (see the module docstring).

    KL per query over its own group's C_g + 1 classes, ``sum_c q_c (log q_c - log p_c)``, temperature 1; the
    teacher's tensors are constants. Computed in float32.
    """
    if num_old_groups < 1:
        raise ValueError("the KL distillation needs at least one old group")
    kl_sum = None
    num_queries, batch = 0, outputs.class_logits(0).shape[0]
    for g in range(num_old_groups):
        student = outputs.class_logits(g).float().log_softmax(-1)
        teacher = old_outputs.class_logits(g).detach().float().log_softmax(-1)
        # log_target keeps 0 * log 0 = 0 for teacher probabilities that underflow.
        value = F.kl_div(student, teacher, reduction="sum", log_target=True)
        kl_sum = value if kl_sum is None else kl_sum + value
        num_queries += student.shape[1]
    old_queries = slice(0, outputs.group_queries[num_old_groups - 1].stop)
    student_masks = outputs.mask_logits()[:, old_queries].float()
    teacher_masks = old_outputs.mask_logits()[:, old_queries].detach().float()
    mask_l1 = F.smooth_l1_loss(student_masks, teacher_masks, beta=1.0)
    return kl_sum / (batch * num_queries), mask_l1

