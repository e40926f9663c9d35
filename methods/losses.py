"""Pure loss functions of the continual methods (MiB, PLOP, CoMFormer, CisDQ) and MiB's head init.

Everything here is a function of tensors: no engine, no model, no state. Class logits follow the engine's
column convention (benchmark/engine/outputs.py): ``[old classes | new classes | no-object]``, no-object
last, so with ``num_old`` old classes the new classes are the columns ``num_old .. K - 1`` and the
no-object logit is column ``K``. Losses run in float32 whatever the input dtype (AMP-safe), and the
teacher's tensors (``old_*``) are treated as constants (detached): only the student gets gradients.

Sources (full citations in ../shared/reference/baselines-original-code.md and cisdq-original-code.md):
  * MiB: Cermelli et al., "Modeling the Background for Incremental Learning in Semantic Segmentation",
    CVPR 2020; fcdl94/MiB utils/loss.py (UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss),
    modules/segmentation_module.py ``init_new_classifier``.
  * The mask-classification form of UCE/UKD: CoMFormer, Cermelli et al., CVPR 2023; fcdl94/CoMFormer
    continual/method_wrapper/loss.py L27-37 (UCE), L90-106 (UKD with KD_REW).
  * Local POD: Douillard et al., "PLOP", CVPR 2021; arthurdouillard/CVPR2021_PLOP train.py
    ``features_distillation`` / ``_local_pod`` (L716-1014).
  * CisDQ's POD: weijiawu/CisDQ mask2former/utils/kd.py (a copy of PLOP's), with
    ``pod_options={"switch": {"after": {"factor": 1e-5}}}`` scaling the last list entry.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------
# MiB: unbiased cross-entropy and unbiased knowledge distillation (mask-classification form)
# --------------------------------------------------------------------------------------------------

def _check_logits(name: str, logits: Tensor) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a trailing class axis [..., K+1], got shape {tuple(logits.shape)}")


def unbiased_ce(logits: Tensor, targets: Tensor, num_old: int, no_object_weight: float = 0.1) -> Tensor:
    """MiB's unbiased cross-entropy on per-query class logits, no-object last.

    ``logits`` [N, K+1] (any leading shape [..., K+1] is flattened), ``targets`` [N] in ``0..K`` with
    ``K`` = no-object. The no-object probability absorbs the first ``num_old`` classes:
    ``log p(no-object) = logsumexp(z_K, z_0..z_{num_old-1}) - logsumexp(z)``; every other class keeps
    ``log p(c) = z_c - logsumexp(z)``. Returns the weighted mean of ``-log p(target)`` with weight
    ``no_object_weight`` for no-object targets and 1 otherwise (``sum w*l / sum w``, as
    ``F.nll_loss(weight=...)``; Mask2Former's no-object weight 0.1, CoMFormer loss.py L63-65).

    An old-class target (not produced by MiB, whose targets are new classes or no-object) gets the plain
    ``z_c - logsumexp(z)``, as in CoMFormer's mask adaptation (loss.py L27-37); the per-pixel original
    instead relabelled it to background. ``num_old = 0`` is the ordinary weighted cross-entropy.
    An empty batch gives 0 (connected to the graph).
    """
    _check_logits("logits", logits)
    num_cols = logits.shape[-1]
    if not 0 <= num_old <= num_cols - 1:
        raise ValueError(f"num_old={num_old} must be in 0..{num_cols - 1} for logits with {num_cols} columns")
    z = logits.reshape(-1, num_cols).float()
    t = targets.reshape(-1).long()
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if z.shape[0] == 0:
        return z.sum()
    lse_all = torch.logsumexp(z, dim=-1)
    lse_bg = torch.logsumexp(torch.cat([z[:, :num_old], z[:, -1:]], dim=-1), dim=-1)
    log_p = torch.cat([z[:, :-1] - lse_all[:, None], (lse_bg - lse_all)[:, None]], dim=-1)
    nll = -log_p.gather(1, t[:, None]).squeeze(1)
    weight = torch.where(t == num_cols - 1, nll.new_tensor(no_object_weight), nll.new_tensor(1.0))
    return (weight * nll).sum() / weight.sum().clamp_min(torch.finfo(nll.dtype).tiny)


def unbiased_kd(logits: Tensor, old_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """MiB's unbiased knowledge distillation, per query (CoMFormer loss.py L90-106, teacher alpha 1).

    ``old_logits`` [N, O+1]: the frozen model's O old classes then its no-object. ``logits`` [N, K+1] of
    the student (K >= O). Teacher ``q = softmax(old_logits)``; student ``log p_c = z_c - logsumexp(z)`` for
    the old classes ``c < O`` and ``log p_no-object = logsumexp(z_O .. z_K) - logsumexp(z)`` (its
    no-object merged with every new class). Per row ``KL(q || p) = sum_c q_c (log q_c - log p_c)`` (a true
    KL as in CoMFormer, not MiB's per-pixel cross-entropy divided by the number of old outputs).
    Reduction: mean over N, or ``sum w*l / sum w`` with ``weights`` [N] (CoMFormer's KD_REW weights, see
    :func:`kd_query_weights`). Leading dimensions are flattened. An empty batch gives 0.
    """
    _check_logits("logits", logits)
    _check_logits("old_logits", old_logits)
    num_cols, num_old_cols = logits.shape[-1], old_logits.shape[-1]
    if num_old_cols > num_cols:
        raise ValueError(f"old_logits has {num_old_cols} columns, more than the student's {num_cols}")
    z = logits.reshape(-1, num_cols).float()
    z_old = old_logits.detach().reshape(-1, num_old_cols).float()
    if z_old.shape[0] != z.shape[0]:
        raise ValueError(f"old_logits {tuple(old_logits.shape)} and logits {tuple(logits.shape)} differ in rows")
    if z.shape[0] == 0:
        return z.sum()
    num_old = num_old_cols - 1
    lse_all = torch.logsumexp(z, dim=-1, keepdim=True)
    log_p = torch.cat([z[:, :num_old], torch.logsumexp(z[:, num_old:], dim=-1, keepdim=True)], dim=-1) - lse_all
    log_q = torch.log_softmax(z_old, dim=-1)
    q = log_q.exp()
    # xlogy keeps 0 * log 0 = 0 for teacher probabilities that underflow.
    per_row = (torch.special.xlogy(q, q) - q * log_p).sum(-1)
    if weights is None:
        return per_row.mean()
    w = weights.detach().reshape(-1).float()
    if w.shape[0] != per_row.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match {per_row.shape[0]} rows")
    return (w * per_row).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def kd_query_weights(old_logits: Tensor, gamma: float = 2.0) -> Tensor:
    """CoMFormer's adaptive KD re-weighting ``w_q = (1 - q_no-object)^gamma`` from the old model.

    ``old_logits`` [..., O+1], no-object last; returns [...]. gamma = 2 is hard-coded in CoMFormer
    (continual/method_wrapper/loss.py L90, ``KD_REW True``); :func:`unbiased_kd` normalises them over
    all queries of the batch.
    """
    _check_logits("old_logits", old_logits)
    q_no_object = torch.softmax(old_logits.detach().float(), dim=-1)[..., -1]
    return (1.0 - q_no_object).pow(gamma)


@torch.no_grad()
def mib_init_(head: nn.Linear, num_old: int) -> None:
    """MiB's initialisation of the new class rows of a grown head, in place.

    ``head`` rows are ``[classes ... | no-object]``: rows ``0..num_old-1`` are the old classes, the rows
    ``num_old .. out-2`` the ``n = |C_t|`` new classes, the last row the no-object. Each new row copies the
    no-object weight, and its bias and the no-object bias both become ``b_no-object - log(n + 1)``
    (fcdl94/MiB modules/segmentation_module.py ``init_new_classifier``, L85-97, with the background
    row in the no-object's role). Effect on every input: old-class logits and probabilities are unchanged
    and the no-object probability before the step is split evenly over {no-object} and the new classes,
    ``p_new = p_no-object_after = p_no-object_before / (n + 1)``. Matches the engine's
    ``grow_head(num_columns, init=fn)`` hook ``init(head, num_old)``. A head without bias is refused
    (the split needs the bias).
    """
    if head.bias is None:
        raise ValueError("mib_init_ needs a class head with a bias (the probability split is in the bias)")
    rows = head.out_features
    if not 0 <= num_old <= rows - 1:
        raise ValueError(f"num_old={num_old} must be in 0..{rows - 1} for a head with {rows} rows")
    num_new = rows - 1 - num_old
    if num_new == 0:
        return
    bias = head.bias[-1] - math.log(num_new + 1)
    head.weight[num_old:-1] = head.weight[-1]
    head.bias[num_old:] = bias


# --------------------------------------------------------------------------------------------------
# POD feature distillation (PLOP's local POD; CisDQ's variant)
# --------------------------------------------------------------------------------------------------

def _tile_pools(x: Tensor, rows: slice, cols: slice) -> list[Tensor]:
    tile = x[..., rows, cols]
    b = x.shape[0]
    return [tile.mean(dim=3).reshape(b, -1), tile.mean(dim=2).reshape(b, -1)]


def local_pod_embedding(x: Tensor, scales: Sequence[int] = (1, 2, 4)) -> Tensor:
    """PLOP's local POD embedding of [B, C, H, W] features (no squaring here), [B, D].

    For each scale s, tiles of side ``k = W // s`` (PLOP uses W for both axes: its crops are square);
    for each of the s x s tiles in row-major order, the width-mean (C x k, C-major) then the height-mean,
    flattened and concatenated in PLOP's order (train.py ``_local_pod``). A scale with ``k = 0`` (a map
    narrower than s, e.g. CisDQ's 1 x 1 query "maps" at scales 2 and 4) adds nothing, as in the original.
    Deviation, only for maps with H < W: tiles with no rows are skipped (the original's height-mean of an
    empty tile is NaN) and tiles cut by the bottom edge are pooled over their remaining rows.
    """
    if x.dim() != 4:
        raise ValueError(f"POD features must be [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    parts: list[Tensor] = []
    for s in scales:
        if s < 1:
            raise ValueError(f"POD scales must be positive integers, got {tuple(scales)}")
        k = w // s
        if k == 0:
            continue
        if h >= s * k:
            # All s x s tiles are full: one reshape instead of s*s slices.
            t = x[..., : s * k, : s * k].reshape(b, c, s, k, s, k)
            width_mean = t.mean(dim=5).permute(0, 2, 4, 1, 3)   # [B, i, j, C, k rows]
            height_mean = t.mean(dim=3).permute(0, 2, 3, 1, 4)  # [B, i, j, C, k cols]
            parts.append(torch.cat([width_mean.reshape(b, s, s, -1), height_mean.reshape(b, s, s, -1)], -1)
                         .reshape(b, -1))
            continue
        for i in range(s):
            if i * k >= h:
                break
            for j in range(s):
                parts.extend(_tile_pools(x, slice(i * k, (i + 1) * k), slice(j * k, (j + 1) * k)))
    if not parts:
        return x.new_zeros(b, 0)
    return torch.cat(parts, dim=1)


def pod_distances(old_feats: Sequence[Tensor], new_feats: Sequence[Tensor], scales: Sequence[int] = (1, 2, 4),
                  square: bool = True) -> Tensor:
    """Per-entry POD distance [n]: ``mean_batch ||Phi(old_i) - Phi(new_i)||_2`` for each pair of the lists.

    ``Phi`` = :func:`local_pod_embedding` of the features, squared element-wise first when ``square``
    (PLOP's default ``pod_prepro="pow"``; CoMFormer's adaptation does not square). Computed in float32;
    the old features are constants. The gradient at a zero distance is 0 (the student starts equal to its
    teacher at every step).
    """
    if len(old_feats) != len(new_feats):
        raise ValueError(f"POD lists differ in length: {len(old_feats)} old vs {len(new_feats)} new")
    if len(old_feats) == 0:
        raise ValueError("POD needs at least one pair of feature maps")
    out = []
    for i, (a, b) in enumerate(zip(old_feats, new_feats)):
        if a.shape != b.shape:
            raise ValueError(f"POD entry {i}: old features {tuple(a.shape)} and new {tuple(b.shape)} differ")
        a, b = a.detach().float(), b.float()
        if square:
            a, b = a.pow(2), b.pow(2)
        diff = local_pod_embedding(a, scales) - local_pod_embedding(b, scales)
        out.append(torch.linalg.vector_norm(diff, dim=1).mean())
    return torch.stack(out)


def local_pod(old_feats: Sequence[Tensor], new_feats: Sequence[Tensor], scales: Sequence[int] = (1, 2, 4),
              square: bool = True) -> Tensor:
    """PLOP's local POD loss: the mean over the list of :func:`pod_distances`.

    Lists of [B, C, H, W] tensors (old model, current model; same shapes pairwise). Unweighted: the
    method applies PLOP's factor (0.01 VOC / 0.001 ADE, times sqrt(K_t / |C_t|), train.py L963-972).
    """
    return pod_distances(old_feats, new_feats, scales, square).mean()


def pod_distillation(old_feats: Sequence[Tensor], new_feats: Sequence[Tensor], last_factor: float = 1e-5,
                     scales: Sequence[int] = (1, 2, 4), square: bool = True) -> Tensor:
    """CisDQ's POD: ``(1/n) sum_i f_i d_i`` with ``f_n = last_factor`` and ``f_i = 1`` otherwise.

    Same embedding and distance as PLOP (CisDQ's mask2former/utils/kd.py is PLOP's code: collapse
    'local', prepro 'pow', scales [1, 2, 4], no normalisation). CisDQ's ``pod_options`` "after" switch
    multiplies the last entry of every list by 1e-5, so res5, the single mask-feature entry and the last
    query entry are practically off; ``last_factor=1.0`` turns the quirk off (then this equals
    :func:`local_pod`). For CisDQ's query features pass each [B, Q_g, D] state reshaped to
    [B * Q_g, D, 1, 1]: only scale 1 contributes and each entry is ``sqrt(2) ||q_old^2 - q_new^2||_2``
    averaged over queries and images.
    """
    d = pod_distances(old_feats, new_feats, scales, square)
    factors = torch.ones_like(d)
    factors[-1] = last_factor
    return (factors * d).mean()


# --------------------------------------------------------------------------------------------------
# ECLIPSE
# --------------------------------------------------------------------------------------------------

def sigmoid_focal_class_loss(logits: Tensor, target_classes: Tensor, alpha: float = 5.0, gamma: float = 1.0,
                             scale: float = 50.0) -> Tensor:
    """ECLIPSE's class loss (clovaai/ECLIPSE continual/method_wrapper/loss.py L11-28, selected by ``FOCAL True``,
    ``SOFTCLS False``; reference eclipse-balconpas A5): sigmoid focal loss over the ``K + 1`` columns.

    ``logits`` [B, Q, K+1] (no-object last), ``target_classes`` [B, Q] in 0..K (K = no-object). The target is
    one-hot over the K + 1 columns (an unmatched query has 1 on no-object). Per element
    ``alpha * (1 - p_t)^gamma * BCEWithLogits(z, y)`` with ``p_t = sigmoid(z)`` where y = 1 and ``1 - sigmoid(z)``
    where y = 0; the result is ``scale`` x the mean over all B x Q x (K+1) elements. alpha 5 and gamma 1 are
    ECLIPSE's ``FOCAL_ALPHA`` / ``FOCAL_GAMMA`` defaults (mask2former/config.py L92-93), scale 50 its factor.
    """
    _check_logits("sigmoid_focal_class_loss", logits)
    logits = logits.float()
    target = nn.functional.one_hot(target_classes, logits.shape[-1]).to(logits.dtype)
    probs = logits.sigmoid()
    p_t = probs * target + (1 - probs) * (1 - target)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return scale * (alpha * (1 - p_t) ** gamma * bce).mean()
