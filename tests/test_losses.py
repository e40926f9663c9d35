"""Golden tests of methods/losses.py: values worked out by hand (math.log / math.exp), not by torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.losses import (
    kd_query_weights,
    local_pod,
    local_pod_embedding,
    mib_init_,
    pod_distances,
    pod_distillation,
    unbiased_ce,
    unbiased_kd,
)


def lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


# --------------------------------------------------------------------------------------------------
# unbiased cross-entropy
# --------------------------------------------------------------------------------------------------

def test_unbiased_ce_by_hand():
    # K = 3 classes (column 0 old, columns 1-2 new) + no-object at column 3; num_old = 1.
    logits = torch.tensor([[1.0, 2.0, 0.5, 0.0],
                           [0.0, 1.0, 3.0, -1.0]])
    targets = torch.tensor([3, 2])
    # row 0 targets no-object: log p = lse(z_no-object, z_0) - lse(all) = lse(0, 1) - lse(1, 2, .5, 0)
    l0 = -(lse(0.0, 1.0) - lse(1.0, 2.0, 0.5, 0.0))
    # row 1 targets new class 2: log p = z_2 - lse(all)
    l1 = -(3.0 - lse(0.0, 1.0, 3.0, -1.0))
    expected = (0.1 * l0 + 1.0 * l1) / (0.1 + 1.0)
    assert unbiased_ce(logits, targets, num_old=1).item() == pytest.approx(expected, rel=1e-6)
    # no-object weight 1: plain mean of the two NLLs
    assert unbiased_ce(logits, targets, num_old=1, no_object_weight=1.0).item() == pytest.approx((l0 + l1) / 2,
                                                                                                  rel=1e-6)


def test_unbiased_ce_absorbs_every_old_class():
    # num_old = 2: no-object absorbs columns 0 and 1 -> log p = lse(z_3, z_0, z_1) - lse(all)
    logits = torch.tensor([[0.3, -0.2, 1.5, 0.1]])
    expected = -(lse(0.1, 0.3, -0.2) - lse(0.3, -0.2, 1.5, 0.1))
    got = unbiased_ce(logits, torch.tensor([3]), num_old=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_unbiased_ce_without_old_classes_is_weighted_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, generator=g)
    targets = torch.randint(0, 6, (2, 5), generator=g)
    weight = torch.ones(6)
    weight[-1] = 0.1
    expected = F.cross_entropy(logits.reshape(-1, 6), targets.reshape(-1), weight=weight)
    assert unbiased_ce(logits, targets, num_old=0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_unbiased_ce_gradient_and_errors():
    logits = torch.randn(4, 5, requires_grad=True)
    unbiased_ce(logits, torch.tensor([4, 3, 2, 4]), num_old=2).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert unbiased_ce(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), num_old=2).item() == 0.0
    with pytest.raises(ValueError, match="num_old"):
        unbiased_ce(logits, torch.tensor([0, 0, 0, 0]), num_old=5)
    with pytest.raises(ValueError, match="do not match"):
        unbiased_ce(logits, torch.tensor([0, 0]), num_old=1)


# --------------------------------------------------------------------------------------------------
# unbiased knowledge distillation
# --------------------------------------------------------------------------------------------------

def _kl_by_hand(student: list[float], teacher: list[float]) -> float:
    """KL(q || p): q = softmax(teacher) over [old..., no-object]; p merges student's no-object + new."""
    num_old = len(teacher) - 1
    z_all = lse(*student)
    log_p = [s - z_all for s in student[:num_old]] + [lse(*student[num_old:]) - z_all]
    t_all = lse(*teacher)
    log_q = [t - t_all for t in teacher]
    return sum(math.exp(lq) * (lq - lp) for lq, lp in zip(log_q, log_p))


def test_unbiased_kd_by_hand():
    # one old class (O = 1), two new classes, no-object last: student K + 1 = 4 columns.
    student = [[0.5, 1.0, -1.0, 0.0], [2.0, -0.5, 0.3, 1.2]]
    teacher = [[2.0, 0.0], [-1.0, 0.5]]
    # row 0 in full: q = (e^2, 1) / (e^2 + 1); log p_0 = 0.5 - lse(.5, 1, -1, 0);
    # log p_no-object = lse(1, -1, 0) - lse(.5, 1, -1, 0)  (no-object merged with both new classes)
    q0 = math.exp(2) / (math.exp(2) + 1)
    qn = 1 / (math.exp(2) + 1)
    lp0 = 0.5 - lse(0.5, 1.0, -1.0, 0.0)
    lpn = lse(1.0, -1.0, 0.0) - lse(0.5, 1.0, -1.0, 0.0)
    row0 = q0 * (math.log(q0) - lp0) + qn * (math.log(qn) - lpn)
    assert _kl_by_hand(student[0], teacher[0]) == pytest.approx(row0, rel=1e-12)
    row1 = _kl_by_hand(student[1], teacher[1])
    got = unbiased_kd(torch.tensor(student), torch.tensor(teacher))
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # weighted mean
    got_w = unbiased_kd(torch.tensor(student), torch.tensor(teacher), weights=torch.tensor([0.2, 0.6]))
    assert got_w.item() == pytest.approx((0.2 * row0 + 0.6 * row1) / 0.8, rel=1e-6)


def test_unbiased_kd_two_old_classes_and_zero_when_student_agrees():
    student = [0.1, 0.7, -0.4, 0.9, 0.2]      # O = 2 old, 2 new, no-object
    teacher = [1.0, -2.0, 0.3]
    got = unbiased_kd(torch.tensor([student]), torch.tensor([teacher]))
    assert got.item() == pytest.approx(_kl_by_hand(student, teacher), rel=1e-6)
    # a student equal to its teacher with one new class whose logit is folded into no-object:
    # p_no-object = e^a + e^b with e^a + e^b = e^0.3 -> KL = 0
    a = math.log(math.exp(0.3) / 2)
    agree = torch.tensor([[1.0, -2.0, a, a]])
    assert unbiased_kd(agree, torch.tensor([teacher])).item() == pytest.approx(0.0, abs=1e-6)


def test_unbiased_kd_gradients_only_reach_the_student():
    student = torch.randn(2, 3, 6, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    loss = unbiased_kd(student, teacher)
    assert loss.item() >= 0
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert teacher.grad is None
    with pytest.raises(ValueError, match="more than"):
        unbiased_kd(torch.randn(2, 3), torch.randn(2, 4))


def test_kd_query_weights_by_hand():
    # q_no-object = 1 / (1 + e^2) -> w = (e^2 / (1 + e^2))^2 ; second row q_no-object = 1/2 -> w = 1/4
    w = kd_query_weights(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert w[0].item() == pytest.approx((math.exp(2) / (1 + math.exp(2))) ** 2, rel=1e-6)
    assert w[1].item() == pytest.approx(0.25, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# MiB initialisation
# --------------------------------------------------------------------------------------------------

def test_mib_init_keeps_old_logits_and_splits_no_object():
    torch.manual_seed(0)
    old = nn.Linear(4, 3)                      # 2 old classes + no-object
    with torch.no_grad():
        old.bias[-1] = 0.7
    grown = nn.Linear(4, 5)                    # 2 old + 2 new + no-object
    with torch.no_grad():
        grown.weight[:2] = old.weight[:2]
        grown.bias[:2] = old.bias[:2]
        grown.weight[-1] = old.weight[-1]
        grown.bias[-1] = old.bias[-1]
    mib_init_(grown, num_old=2)
    # bias of the new rows and of no-object = 0.7 - log(2 + 1)
    expected_bias = 0.7 - math.log(3)
    assert grown.bias[2:].tolist() == pytest.approx([expected_bias] * 3, rel=1e-6)
    assert torch.equal(grown.weight[2], old.weight[-1]) and torch.equal(grown.weight[3], old.weight[-1])
    # old rows untouched, hence old logits unchanged (up to the matmul's summation order)
    assert torch.equal(grown.weight[:2], old.weight[:2]) and torch.equal(grown.bias[:2], old.bias[:2])
    x = torch.randn(7, 4)
    before, after = old(x), grown(x)
    torch.testing.assert_close(after[:, :2], before[:, :2], rtol=0, atol=1e-6)
    p_before, p_after = before.softmax(-1), after.softmax(-1)
    torch.testing.assert_close(p_after[:, :2], p_before[:, :2])
    for col in (2, 3, 4):
        torch.testing.assert_close(p_after[:, col], p_before[:, 2] / 3)


def test_mib_init_edge_cases():
    head = nn.Linear(3, 3)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    mib_init_(head, num_old=2)                 # nothing new: unchanged
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())
    with pytest.raises(ValueError, match="bias"):
        mib_init_(nn.Linear(3, 4, bias=False), num_old=1)
    with pytest.raises(ValueError, match="num_old"):
        mib_init_(nn.Linear(3, 4), num_old=4)


# --------------------------------------------------------------------------------------------------
# POD
# --------------------------------------------------------------------------------------------------

FEAT = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])          # [1, 1, 2, 2]


def test_local_pod_embedding_by_hand():
    # scale 1 (tile 2x2): width-means of rows [1.5, 3.5], height-means of columns [2, 3];
    # scale 2 (tiles 1x1 in row-major order): each tile's value twice.
    emb = local_pod_embedding(FEAT, scales=(1, 2))
    assert emb[0].tolist() == [1.5, 3.5, 2.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    # scale 4 on a 2-wide map has tiles of side 0 and adds nothing
    assert torch.equal(local_pod_embedding(FEAT, scales=(1, 2, 4)), emb)


def _reference_embedding(x: torch.Tensor, scales) -> torch.Tensor:
    """PLOP's algorithm spelled out tile by tile (square maps)."""
    b, w = x.shape[0], x.shape[-1]
    parts = []
    for s in scales:
        k = w // s
        for i in range(s):
            for j in range(s):
                tile = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                if tile.numel() == 0:
                    continue
                parts += [tile.mean(dim=3).reshape(b, -1), tile.mean(dim=2).reshape(b, -1)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("size", [(8, 8), (9, 9), (10, 7)])
def test_local_pod_embedding_matches_tilewise_order(size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(local_pod_embedding(x), _reference_embedding(x, (1, 2, 4)))


def test_local_pod_embedding_short_maps_skip_empty_tiles():
    # H = 1 < W = 4: scale 2 has tile side 2, only the top row of tiles exists and it has one row.
    x = torch.arange(4.0).reshape(1, 1, 1, 4)
    emb = local_pod_embedding(x, scales=(2,))
    # tile (0,0) = [0, 1]: width-mean [0.5], height-means [0, 1]; tile (0,1) = [2, 3]: [2.5], [2, 3]
    assert emb[0].tolist() == [0.5, 0.0, 1.0, 2.5, 2.0, 3.0]


def test_local_pod_by_hand():
    zeros = torch.zeros_like(FEAT)
    # not squared: ||emb|| = sqrt(1.5^2 + 3.5^2 + 2^2 + 3^2 + 2 * (1 + 4 + 9 + 16)) = sqrt(87.5)
    got = local_pod([FEAT], [zeros], scales=(1, 2), square=False)
    assert got.item() == pytest.approx(math.sqrt(87.5), rel=1e-6)
    # squared: features [[1, 4], [9, 16]] -> 2.5, 12.5, 5, 10 and 2 * (1 + 16 + 81 + 256)
    got = local_pod([FEAT], [zeros], scales=(1, 2), square=True)
    assert got.item() == pytest.approx(math.sqrt(2.5 ** 2 + 12.5 ** 2 + 25 + 100 + 2 * 354), rel=1e-6)
    # batch mean: a second image with identical features contributes 0
    old = torch.cat([FEAT, FEAT])
    new = torch.cat([zeros, FEAT])
    got = local_pod([old], [new], scales=(1, 2), square=False)
    assert got.item() == pytest.approx(math.sqrt(87.5) / 2, rel=1e-6)
    # list mean: the two entries' distances averaged
    got = local_pod([FEAT, old], [zeros, new], scales=(1, 2), square=False)
    assert got.item() == pytest.approx((math.sqrt(87.5) + math.sqrt(87.5) / 2) / 2, rel=1e-6)
    assert pod_distances([FEAT, old], [zeros, new], scales=(1, 2), square=False).tolist() == pytest.approx(
        [math.sqrt(87.5), math.sqrt(87.5) / 2], rel=1e-6)


def test_local_pod_gradient_is_finite_at_zero_distance():
    feats = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    new = [f.clone().requires_grad_(True) for f in feats]
    loss = local_pod(feats, new)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.equal(n.grad, torch.zeros_like(n)) for n in new)
    moved = [f + 0.1 for f in feats]
    for m in moved:
        m.requires_grad_(True)
    local_pod(feats, moved).backward()
    assert all(torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0 for m in moved)


def test_pod_distillation_scales_the_last_entry():
    zeros = torch.zeros_like(FEAT)
    d = math.sqrt(87.5)
    got = pod_distillation([FEAT, FEAT], [zeros, zeros], last_factor=1e-5, scales=(1, 2), square=False)
    assert got.item() == pytest.approx((d + 1e-5 * d) / 2, rel=1e-6)
    same = pod_distillation([FEAT, FEAT], [zeros, zeros], last_factor=1.0, scales=(1, 2), square=False)
    assert same.item() == pytest.approx(local_pod([FEAT, FEAT], [zeros, zeros], (1, 2), False).item())


def test_pod_on_query_features_as_one_pixel_maps():
    # one query row a = [1, 2], b = [0, 1]: squared difference [1, 3]; scale 1 gives it twice
    # (width- and height-mean of a 1x1 map), scales 2 and 4 nothing: sqrt(2) * sqrt(1 + 9) = sqrt(20)
    a = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    b = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert local_pod([a], [b]).item() == pytest.approx(math.sqrt(20), rel=1e-6)


def test_pod_errors():
    with pytest.raises(ValueError, match="length"):
        local_pod([FEAT], [])
    with pytest.raises(ValueError, match="differ"):
        local_pod([FEAT], [torch.zeros(1, 1, 3, 3)])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        local_pod([FEAT[0]], [FEAT[0]])
    with pytest.raises(ValueError, match="positive"):
        local_pod([FEAT], [FEAT], scales=(0,))
