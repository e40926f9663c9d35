"""Pseudo-label builders on constructed old-model outputs (values worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.pseudo_labels import (
    EntropyHistogram,
    cisdq_pseudo_instances,
    comformer_pseudo_labels,
    plop_pixel_stats,
    plop_pseudo_labels,
    plop_thresholds,
)


def region(h: int, w: int, rows: slice, cols: slice, inside: float = 4.0, outside: float = -4.0) -> torch.Tensor:
    m = torch.full((h, w), outside)
    m[rows, cols] = inside
    return m


def one_hot_logits(cls: int, num_cols: int, value: float = 5.0) -> torch.Tensor:
    z = torch.zeros(num_cols)
    z[cls] = value
    return z


# --------------------------------------------------------------------------------------------------
# CoMFormer
# --------------------------------------------------------------------------------------------------

def test_comformer_keeps_visible_segments_and_drops_hidden_ones():
    h, w = 4, 8
    all_rows = slice(0, 4)
    # two old classes + no-object (3 columns); every query confident in its class
    class_logits = torch.stack([
        one_hot_logits(0, 3),   # q0: class 0 on columns 0-1, no ground truth there      -> kept
        one_hot_logits(1, 3),   # q1: class 1 on columns 2-3, 6 of its 8 pixels under GT  -> dropped
        one_hot_logits(1, 3),   # q2: class 1 on columns 4-5, 2 of its 8 pixels under GT  -> kept (6 px)
        one_hot_logits(2, 3),   # q3: argmax no-object (on columns 0-1)                  -> never kept
        one_hot_logits(0, 3),   # q4: class 0 on columns 6-7, entirely under GT          -> dropped
    ])
    mask_logits = torch.stack([
        region(h, w, all_rows, slice(0, 2)),
        region(h, w, all_rows, slice(2, 4)),
        region(h, w, all_rows, slice(4, 6)),
        region(h, w, all_rows, slice(0, 2)),
        region(h, w, all_rows, slice(6, 8)),
    ])
    gt = torch.zeros(2, h, w, dtype=torch.bool)
    gt[0, 0:3, 2:4] = True          # hides 6/8 of q1
    gt[0, 0, 4:6] = True            # hides 2/8 of q2
    gt[1, :, 6:8] = True            # hides all of q4
    labels, masks = comformer_pseudo_labels(class_logits, mask_logits, gt)
    assert labels.tolist() == [0, 1]
    assert masks.dtype == torch.bool and masks.shape == (2, h, w)
    expected0 = torch.zeros(h, w, dtype=torch.bool)
    expected0[:, 0:2] = True
    expected1 = torch.zeros(h, w, dtype=torch.bool)
    expected1[1:4, 4:6] = True
    assert torch.equal(masks[0], expected0) and torch.equal(masks[1], expected1)


def test_comformer_exactly_half_hidden_is_dropped_and_no_gt_keeps_all():
    h, w = 2, 4
    class_logits = torch.stack([one_hot_logits(0, 2), one_hot_logits(0, 2)])  # one old class + no-object
    mask_logits = torch.stack([region(h, w, slice(0, 2), slice(0, 2)), region(h, w, slice(0, 2), slice(2, 4))])
    gt = torch.zeros(1, h, w, dtype=torch.bool)
    gt[0, 0, 0:2] = True            # exactly half of q0: remaining 2/4 is not more than half
    labels, masks = comformer_pseudo_labels(class_logits, mask_logits, gt)
    assert labels.tolist() == [0] and masks[0, :, 2:4].all() and not masks[0, :, 0:2].any()
    labels, masks = comformer_pseudo_labels(class_logits, mask_logits, torch.zeros(0, h, w))
    assert labels.tolist() == [0, 0] and masks.sum().item() == 8


def test_comformer_score_threshold_and_empty_result():
    h, w = 2, 2
    class_logits = torch.tensor([[1.0, 0.0], [0.0, 3.0]])   # q0: class 0 with p = e/(e+1); q1: no-object
    mask_logits = torch.full((2, h, w), 4.0)
    labels, _ = comformer_pseudo_labels(class_logits, mask_logits, torch.zeros(0, h, w))
    assert labels.tolist() == [0]
    p0 = math.e / (math.e + 1)
    labels, masks = comformer_pseudo_labels(class_logits, mask_logits, torch.zeros(0, h, w),
                                            score_threshold=p0 + 1e-3)
    assert labels.shape == (0,) and masks.shape == (0, h, w) and masks.dtype == torch.bool


def test_comformer_softmax_masks_normalise_over_queries():
    # q0 (class 0) logit +1 everywhere; q1 (class 1) +3 on the right half, -3 on the left.
    h, w = 2, 4
    class_logits = torch.stack([one_hot_logits(0, 3), one_hot_logits(1, 3)])
    mask_logits = torch.stack([torch.ones(h, w), region(h, w, slice(0, 2), slice(2, 4), 3.0, -3.0)])
    gt = torch.zeros(0, h, w)
    # sigmoid: s0 = sigmoid(1) = 0.73 everywhere, so q0's own area is 8 but it only wins the left 4 -> dropped
    labels, _ = comformer_pseudo_labels(class_logits, mask_logits, gt, mask_activation="sigmoid")
    assert labels.tolist() == [1]
    # softmax over queries: s0 = e/(e + e^-3) = 0.98 on the left, e/(e + e^3) = 0.12 on the right -> kept
    labels, masks = comformer_pseudo_labels(class_logits, mask_logits, gt, mask_activation="softmax")
    assert labels.tolist() == [0, 1]
    assert masks[0, :, :2].all() and not masks[0, :, 2:].any()


def test_comformer_resizes_low_resolution_masks_to_the_targets():
    # 1/2-resolution logits +4 on columns 0-1 of 4; bilinear to 8 columns: output column 3 samples
    # input x = 1.25 -> 0.75 * 4 + 0.25 * (-4) = 2 > 0; column 4 samples x = 1.75 -> -2 < 0.
    class_logits = one_hot_logits(0, 2)[None]
    mask_logits = region(2, 4, slice(0, 2), slice(0, 2))[None]
    labels, masks = comformer_pseudo_labels(class_logits, mask_logits, torch.zeros(0, 4, 8))
    assert labels.tolist() == [0] and masks.shape == (1, 4, 8)
    assert masks[0, :, :4].all() and not masks[0, :, 4:].any()


# --------------------------------------------------------------------------------------------------
# PLOP
# --------------------------------------------------------------------------------------------------

def test_plop_pixel_stats_by_hand():
    # four pixels (1 x 4) over two classes: certain, uniform, 3:1 (unnormalised scores), all-zero
    scores = torch.tensor([[[2.0, 1.0, 0.3, 0.0]],
                           [[0.0, 1.0, 0.1, 0.0]]])
    entropy, argmax = plop_pixel_stats(scores)
    h31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert entropy[0].tolist() == pytest.approx([0.0, 1.0, h31, 1.0], abs=1e-6)
    assert argmax[0, 0].item() == 0 and argmax[0, 2].item() == 0
    # three classes: normalised by log 3; batch dimension kept
    scores = torch.tensor([0.2, 0.3, 0.5]).reshape(1, 3, 1, 1)
    entropy, argmax = plop_pixel_stats(scores)
    expected = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)) / math.log(3)
    assert entropy.shape == (1, 1, 1) and entropy.item() == pytest.approx(expected, rel=1e-6)
    assert argmax.item() == 2
    # a single old class is always certain
    entropy, argmax = plop_pixel_stats(torch.rand(1, 3, 3))
    assert entropy.eq(0).all() and argmax.eq(0).all()


def test_plop_thresholds_are_true_medians():
    entropies = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.3, 0.4, 0.8, 0.0002])
    argmax = torch.tensor([0, 1, 0, 1, 0, 1, 1, 2])
    tau = plop_thresholds(entropies, argmax, num_classes=4)
    # class 0: {0.1, 0.3, 0.5} -> 0.3; class 1: {0.2, 0.4, 0.6, 0.8} -> (0.4 + 0.6) / 2 = 0.5;
    # class 2: {0.0002} -> floor 0.001; class 3: no pixel -> floor 0.001
    assert tau.tolist() == pytest.approx([0.3, 0.5, 0.001, 0.001], abs=1e-7)
    assert plop_thresholds(entropies, argmax, 4, floor=0.45).tolist() == pytest.approx([0.45, 0.5, 0.45, 0.45])
    assert plop_thresholds(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2).tolist() == pytest.approx(
        [0.001, 0.001])
    with pytest.raises(ValueError, match="0..3"):
        plop_thresholds(entropies, argmax + 2, num_classes=4)


def test_plop_thresholds_match_numpy_median_on_random_pixels():
    g = torch.Generator().manual_seed(3)
    entropies = torch.rand(2, 31, 17, generator=g)
    argmax = torch.randint(0, 5, (2, 31, 17), generator=g)
    tau = plop_thresholds(entropies, argmax, num_classes=6)
    e, c = entropies.numpy().ravel(), argmax.numpy().ravel()
    expected = [max(float(np.median(e[c == k])), 0.001) for k in range(5)] + [0.001]
    assert tau.tolist() == pytest.approx(expected, abs=1e-6)


def test_entropy_histogram_is_within_one_bin_of_the_true_median():
    g = torch.Generator().manual_seed(4)
    hist = EntropyHistogram(num_classes=4, bins=1000)
    all_e, all_c = [], []
    for _ in range(3):
        e = torch.rand(40, 40, generator=g) ** 2
        c = torch.randint(0, 3, (40, 40), generator=g)
        valid = torch.rand(40, 40, generator=g) > 0.3
        hist.update(e, c, valid)
        all_e.append(e[valid])
        all_c.append(c[valid])
    exact = plop_thresholds(torch.cat(all_e), torch.cat(all_c), num_classes=4)
    approx = hist.thresholds()
    assert (approx[:3] - exact[:3]).abs().max().item() <= 1 / 1000
    assert approx[3].item() == pytest.approx(0.001)


def test_plop_pseudo_labels_confident_pixels_only():
    # 2 x 3 image, two old classes with tau = [0.3, 0.5]
    entropy = torch.tensor([[0.05, 0.90, 0.30],
                            [0.40, 0.10, 0.49]])
    argmax = torch.tensor([[0, 0, 0],
                           [1, 1, 1]])
    uncovered = torch.tensor([[True, True, True],
                              [True, False, True]])
    tau = torch.tensor([0.3, 0.5])
    labels, masks = plop_pseudo_labels(entropy, argmax, tau, uncovered)
    # (0,0) confident class 0 -> pseudo-label; (0,1) high entropy -> none; (0,2) entropy == tau -> none;
    # (1,0) and (1,2) below tau of class 1 -> pseudo-label; (1,1) confident but covered by GT -> none
    assert labels.tolist() == [0, 1]
    assert masks[0].tolist() == [[True, False, False], [False, False, False]]
    assert masks[1].tolist() == [[False, False, False], [True, False, True]]
    # nothing confident -> empty
    labels, masks = plop_pseudo_labels(entropy, argmax, torch.tensor([0.01, 0.01]), uncovered)
    assert labels.shape == (0,) and masks.shape == (0, 2, 3)
    with pytest.raises(ValueError, match="same"):
        plop_pseudo_labels(entropy, argmax, tau, uncovered[0])


# --------------------------------------------------------------------------------------------------
# CisDQ
# --------------------------------------------------------------------------------------------------

def test_cisdq_pseudo_instances_by_hand():
    h, w = 4, 4
    # two group classes + no-object (3 columns)
    class_logits = torch.tensor([
        [4.0, 0.0, 0.0],   # q0: p = e^4/(e^4+2) = 0.965; mask +3 on a 2x2 block -> 0.965 * sigmoid(3) = 0.919 kept
        [0.0, 3.0, 0.0],   # q1: p = e^3/(e^3+2) = 0.909; mask +0.15 on a block -> 0.909 * sigmoid(0.15) = 0.489 dropped
        [0.0, 0.0, 4.0],   # q2: no-object -> class probabilities 0.018 dropped
        [0.0, 5.0, 0.0],   # q3: confident class but an empty mask (all logits < 0) -> score 0 dropped
    ])
    mask_logits = torch.stack([
        region(h, w, slice(0, 2), slice(0, 2), 3.0, -3.0),
        region(h, w, slice(2, 4), slice(2, 4), 0.15, -3.0),
        region(h, w, slice(0, 4), slice(0, 4), 3.0, -3.0),
        torch.full((h, w), -1.0),
    ])
    p0 = math.exp(4) / (math.exp(4) + 2)
    s3 = 1 / (1 + math.exp(-3))
    # mean of the mask probability over the mask's own pixels, not over the image (that would be
    # (4 * 0.953 + 12 * 0.047) / 16 = 0.27 and drop q0)
    assert p0 * s3 > 0.5
    p1 = math.exp(3) / (math.exp(3) + 2)
    assert 0.45 < p1 / (1 + math.exp(-0.15)) < 0.5
    labels, masks = cisdq_pseudo_instances(class_logits, mask_logits)
    assert labels.tolist() == [0]
    assert masks.shape == (1, h, w) and torch.equal(masks[0], mask_logits[0] > 0)
    # lower threshold keeps q1 (class 1) too; best class probability first
    labels, masks = cisdq_pseudo_instances(class_logits, mask_logits, threshold=0.45)
    assert labels.tolist() == [0, 1]
    assert torch.equal(masks[1], mask_logits[1] > 0)
    # only the top max_detections (query, class) pairs by class probability are considered:
    # q3/class 1 (e^5/(e^5+2) = 0.987) then q0/class 0 (0.965); q3's empty mask drops it, q1 is not reached
    labels, _ = cisdq_pseudo_instances(class_logits, mask_logits, threshold=0.45, max_detections=2)
    assert labels.tolist() == [0]
    labels, _ = cisdq_pseudo_instances(class_logits, mask_logits, threshold=0.45, max_detections=1)
    assert labels.tolist() == []


def test_cisdq_pseudo_instances_shapes_and_errors():
    labels, masks = cisdq_pseudo_instances(torch.zeros(0, 3), torch.zeros(0, 2, 2))
    assert labels.shape == (0,) and masks.shape == (0, 2, 2)
    with pytest.raises(ValueError, match="mask logits"):
        cisdq_pseudo_instances(torch.zeros(2, 3), torch.zeros(3, 2, 2))


def test_plop_code_thresholds_follow_the_released_find_median_walk():
    from methods.pseudo_labels import plop_code_thresholds

    num_seen = 5
    scale = 2 * math.log(num_seen)                   # the code's entropy = ours / (C_old log K_t)
    code_values = torch.tensor([0.05, 0.05, 0.15, 0.15] + [0.55] * 7)
    classes = torch.tensor([0] * 4 + [1] * 7)
    tau = plop_code_thresholds(code_values * scale, classes, 2, num_seen, floor=0.001, bins=10)
    # class 0: bins [2, 2], half 2 is reached in bin 0: 0 + (2 - 0) / 2 / 10 = 0.1
    # class 1: 7 values in bin 5; the walk adds bin indices 0 + 1 + 2 + ... and passes half = 3.5 without
    # meeting it, ends on the empty last bin: (3.5 - 45) / 0 = -inf -> the floor 0.001
    assert tau.tolist() == pytest.approx([0.1 * scale, 0.001 * scale], rel=1e-6)
    # the paper's median of class 1 is 0.55 (code scale): the released code pseudo-labels almost nothing there
    assert plop_thresholds(code_values * scale, classes, 2)[1] == pytest.approx(0.55 * scale, rel=1e-6)
