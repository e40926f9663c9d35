"""The engine's set criterion against transformers' stock Mask2FormerLoss and hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss, sample_point

from benchmark.batch import Target
from benchmark.engine.criterion import SetCriterion
from benchmark.errors import ConfigError

B, Q, C, LAYERS, h, w, H, W = 2, 8, 5, 3, 12, 16, 48, 64


def _inputs(seed: int = 0, counts=(3, 2)):
    gen = torch.Generator().manual_seed(seed)
    class_logits = [torch.randn(B, Q, C + 1, generator=gen, requires_grad=True) for _ in range(LAYERS)]
    mask_logits = [torch.randn(B, Q, h, w, generator=gen, requires_grad=True) for _ in range(LAYERS)]
    targets = [Target(torch.randint(0, C, (n,), generator=gen), torch.rand(n, H, W, generator=gen) > 0.6)
               for n in counts]
    return class_logits, mask_logits, targets


def _stock_terms(class_logits, mask_logits, targets, num_points):
    config = Mask2FormerConfig(num_labels=C, train_num_points=num_points)
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    stock = Mask2FormerLoss(config, weights)
    aux = [{"masks_queries_logits": m, "class_queries_logits": c}
           for m, c in zip(mask_logits[:-1], class_logits[:-1])]
    losses = stock(mask_logits[-1], class_logits[-1], [t.masks.float() for t in targets],
                   [t.labels for t in targets], aux)
    names = {"loss_cross_entropy": "ce", "loss_mask": "mask", "loss_dice": "dice"}
    terms = {"ce": 0.0, "mask": 0.0, "dice": 0.0}
    for key, value in losses.items():
        stem = next(stem for stem in names if key.startswith(stem))
        terms[names[stem]] = terms[names[stem]] + weights[stem] * value
    return terms


@pytest.mark.parametrize("counts", [(3, 2), (4, 0)])
def test_equals_stock_mask2former_loss_values_and_gradients(counts):
    class_logits, mask_logits, targets = _inputs(counts=counts)
    torch.manual_seed(123)
    stock = _stock_terms(class_logits, mask_logits, targets, num_points=200)
    torch.manual_seed(123)
    ours = SetCriterion(num_points=200)(class_logits, mask_logits, targets)
    assert set(ours) == {"ce", "mask", "dice"}
    for name in ours:
        torch.testing.assert_close(ours[name], stock[name], rtol=1e-6, atol=1e-6)
    params = class_logits + mask_logits
    stock_grads = torch.autograd.grad(sum(stock.values()), params)
    our_grads = torch.autograd.grad(sum(ours.values()), params)
    for ours_g, stock_g in zip(our_grads, stock_grads):
        torch.testing.assert_close(ours_g, stock_g, rtol=1e-5, atol=1e-7)


def test_match_recovers_a_constructed_assignment():
    # Query q predicts target perm[q] (class and mask) confidently; the other queries predict no-object.
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, :16], masks[1, 16:32], masks[2, 32:] = True, True, True
    labels = torch.tensor([4, 0, 2])
    perm = {5: 0, 1: 1, 6: 2}                                   # query -> target
    class_logits = torch.full((1, Q, C + 1), -10.0)
    class_logits[0, :, C] = 10.0
    mask_logits = torch.full((1, Q, h, w), -10.0)
    small = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0]
    for query, target in perm.items():
        class_logits[0, query] = -10.0
        class_logits[0, query, labels[target]] = 10.0
        mask_logits[0, query] = torch.where(small[target] > 0, 10.0, -10.0)
    criterion = SetCriterion(num_points=300)
    (rows, cols), = criterion.match(class_logits, mask_logits, [Target(labels, masks)])
    assert rows.tolist() == sorted(perm)
    assert cols.tolist() == [perm[q] for q in sorted(perm)]
    # Reusing a matching on every layer: the right one gives tiny terms (only the bilinear mask borders
    # cost something), a wrong one (targets rotated) large ones.
    right = criterion([class_logits] * 2, [mask_logits] * 2, [Target(labels, masks)], indices=[[(rows, cols)]] * 2)
    wrong = criterion([class_logits] * 2, [mask_logits] * 2, [Target(labels, masks)],
                      indices=[[(rows, cols.roll(1))]] * 2)
    assert right["ce"].item() < 1e-3 < wrong["ce"].item()
    assert right["mask"].item() < 0.2 * wrong["mask"].item()
    assert right["dice"].item() < 0.2 * wrong["dice"].item()


def test_query_subset_only_moves_its_queries():
    class_logits, mask_logits, targets = _inputs()
    group = slice(2, 7)                                        # a query group of 5 queries
    terms = SetCriterion(num_points=100)([c[:, group] for c in class_logits],
                                         [m[:, group] for m in mask_logits], targets)
    grads = torch.autograd.grad(sum(terms.values()), class_logits + mask_logits)
    for grad in grads:
        inside = grad[:, group]
        outside = torch.cat([grad[:, :group.start], grad[:, group.stop:]], dim=1)
        assert inside.abs().sum() > 0
        assert torch.count_nonzero(outside) == 0


def test_images_without_targets_give_no_object_ce_and_zero_mask_terms():
    class_logits, mask_logits, _ = _inputs()
    empty = [Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, H, W, dtype=torch.bool))] * B
    terms = SetCriterion(num_points=50)(class_logits, mask_logits, empty)
    weight = torch.ones(C + 1)
    weight[-1] = 0.1
    no_object = torch.full((B, Q), C)
    expected = sum(2.0 * F.cross_entropy(c.transpose(1, 2), no_object, weight) for c in class_logits)
    torch.testing.assert_close(terms["ce"], expected)
    assert terms["mask"].item() == 0.0 and terms["dice"].item() == 0.0
    # The mask branch stays in the graph (DDP needs a gradient, even a zero one).
    grads = torch.autograd.grad(sum(terms.values()), mask_logits)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_class_loss_hook_replaces_the_class_term():
    class_logits, mask_logits, targets = _inputs()
    seen = []

    def hook(logits, target_classes):
        seen.append((logits, target_classes))
        return torch.tensor(1.5)

    terms = SetCriterion(num_points=50)(class_logits, mask_logits, targets, class_loss=hook)
    assert terms["ce"].item() == pytest.approx(2.0 * 1.5 * LAYERS)
    assert len(seen) == LAYERS
    for logits, target_classes in seen:
        assert logits.shape == (B, Q, C + 1) and target_classes.shape == (B, Q)
        for b, target in enumerate(targets):
            matched = target_classes[b][target_classes[b] != C]
            assert sorted(matched.tolist()) == sorted(target.labels.tolist())


def test_mixed_target_resolutions_and_more_targets_than_queries():
    class_logits, mask_logits, _ = _inputs()
    gen = torch.Generator().manual_seed(3)
    targets = [Target(torch.randint(0, C, (Q + 3,), generator=gen), torch.rand(Q + 3, H, W, generator=gen) > 0.5),
               Target(torch.tensor([1, 2]), torch.rand(2, h, w, generator=gen) > 0.5)]   # mask resolution
    criterion = SetCriterion(num_points=64)
    (rows0, cols0), (rows1, cols1) = criterion.match(class_logits[-1], mask_logits[-1], targets)
    assert rows0.tolist() == list(range(Q)) and len(set(cols0.tolist())) == Q
    assert len(rows1) == 2 and sorted(cols1.tolist()) == [0, 1]
    terms = criterion(class_logits, mask_logits, targets)
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())


def test_softmax_mode_matches_comformer_formulas():
    """One layer, uniform points (importance ratio 0): recompute CoMFormer's terms from the same draws."""
    gen = torch.Generator().manual_seed(5)
    class_logits = torch.randn(1, Q, C + 1, generator=gen)
    mask_logits = torch.randn(1, Q, h, w, generator=gen)
    target = Target(torch.tensor([3, 1]), torch.rand(2, H, W, generator=gen) > 0.5)
    points = 80
    criterion = SetCriterion(num_points=points, mask_mode="softmax", importance_sample_ratio=0.0)
    torch.manual_seed(9)
    terms = criterion([class_logits], [mask_logits], [target])

    torch.manual_seed(9)
    match_coords = torch.rand(1, points, 2)
    probs = mask_logits.softmax(dim=1)
    pred = sample_point(probs, match_coords, align_corners=False)[0]                      # [Q, P]
    gt = sample_point(target.masks.float()[:, None], match_coords.repeat(2, 1, 1), align_corners=False)[:, 0]
    class_prob = class_logits[0].softmax(-1)[:, target.labels]                              # [Q, 2]
    dice = (2 * pred @ gt.T + 1) / (pred.sum(-1)[:, None] + gt.sum(-1)[None] + 1)
    cost = -2 * class_prob * dice / (class_prob + dice)
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(cost.numpy())
    torch.rand(len(rows), 3 * points, 2)                       # the oversampled draw (unused at ratio 0)
    coords = torch.rand(len(rows), points, 2)
    labels = sample_point(target.masks.float()[cols][:, None], coords, align_corners=False)[:, 0]
    s = sample_point(probs[0, rows][:, None], coords, align_corners=False)[:, 0]
    log_s = sample_point(mask_logits.log_softmax(dim=1)[0, rows][:, None], coords, align_corners=False)[:, 0]
    num_masks = 2.0
    mask_term = (-log_s * labels).mean(1).sum() / num_masks
    dice_term = (1 - (2 * (s * labels).sum(-1) + 1) / (s.sum(-1) + labels.sum(-1) + 1)).sum() / num_masks
    target_classes = torch.full((1, Q), C)
    target_classes[0, torch.as_tensor(rows)] = target.labels[torch.as_tensor(cols)]
    ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, reduction="none")
    focal = (5.0 * (1 - torch.exp(-ce)) * ce).mean()

    torch.testing.assert_close(terms["ce"], 2.0 * focal)
    torch.testing.assert_close(terms["mask"], 5.0 * mask_term)
    torch.testing.assert_close(terms["dice"], 5.0 * dice_term)


def test_invalid_configuration_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="mask_mode"):
        SetCriterion(mask_mode="focal")
    with pytest.raises(ConfigError, match="num_points"):
        SetCriterion(num_points=0)
    class_logits, mask_logits, targets = _inputs()
    bad = [Target(torch.tensor([C]), torch.ones(1, H, W, dtype=torch.bool)), targets[1]]
    with pytest.raises(ValueError, match="local classes"):
        SetCriterion(num_points=20)(class_logits, mask_logits, bad)
    with pytest.raises(ValueError, match="one class and one mask"):
        SetCriterion(num_points=20)(class_logits, mask_logits[:-1], targets)


def test_half_precision_logits_give_float32_terms_close_to_float32():
    # Under AMP the model's logits are half precision; the criterion computes in float32.
    class_logits, mask_logits, targets = _inputs()
    torch.manual_seed(1)
    full = SetCriterion(num_points=200)(class_logits, mask_logits, targets)
    torch.manual_seed(1)
    half = SetCriterion(num_points=200)([c.bfloat16() for c in class_logits], [m.bfloat16() for m in mask_logits],
                                        targets)
    for name in full:
        assert half[name].dtype == torch.float32
        torch.testing.assert_close(half[name], full[name], rtol=2e-3, atol=0)


def _dense_terms(class_logits, mask_logits, targets, side):
    """The set loss written out densely: every pixel of a side x side mask-logit map, the targets read at the
    same pixel centres (bilinear on an integer-factor finer target = the mean of each block's central 2 x 2)."""
    from scipy.optimize import linear_sum_assignment
    factor = targets[0].masks.shape[-1] // side
    lo = factor // 2 - 1
    terms = {"ce": 0.0, "mask": 0.0, "dice": 0.0}
    num_masks = sum(len(t) for t in targets)
    for logits, masks in zip(class_logits, mask_logits):
        target_classes = torch.full(logits.shape[:2], logits.shape[-1] - 1)
        bce_sum, dice_sum = 0.0, 0.0
        for b, target in enumerate(targets):
            if len(target) == 0:
                continue
            tgt = target.masks.float().view(len(target), side, factor, side, factor)[:, :, lo:lo + 2, :, lo:lo + 2]
            tgt = tgt.mean(dim=(2, 4)).flatten(1)                                   # [n, P]
            pred = masks[b].flatten(1)                                               # [Q, P]
            bce = torch.stack([F.binary_cross_entropy_with_logits(pred, t.expand_as(pred), reduction="none").mean(1)
                               for t in tgt], dim=1)                                  # [Q, n]
            prob = pred.sigmoid()
            dice = 1 - (2 * prob @ tgt.T + 1) / (prob.sum(1)[:, None] + tgt.sum(1)[None] + 1)
            cost = 5 * bce + 5 * dice - 2 * logits[b].softmax(-1)[:, target.labels]
            rows, cols = linear_sum_assignment(cost.detach().numpy())
            target_classes[b, rows] = target.labels[cols]
            bce_sum = bce_sum + bce[rows, cols].sum()
            dice_sum = dice_sum + dice[rows, cols].sum()
        weight = torch.ones(logits.shape[-1])
        weight[-1] = 0.1
        terms["ce"] = terms["ce"] + 2 * F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
        terms["mask"] = terms["mask"] + 5 * bce_sum / num_masks
        terms["dice"] = terms["dice"] + 5 * dice_sum / num_masks
    return terms


def test_grid_point_sampling_is_the_dense_loss_and_draws_no_random_number():
    gen = torch.Generator().manual_seed(3)
    side = 16
    class_logits = [torch.randn(B, Q, C + 1, generator=gen, requires_grad=True) for _ in range(LAYERS)]
    mask_logits = [torch.randn(B, Q, side, side, generator=gen, requires_grad=True) for _ in range(LAYERS)]
    targets = [Target(torch.randint(0, C, (n,), generator=gen), torch.rand(n, 64, 64, generator=gen) > 0.6)
               for n in (3, 2)]
    criterion = SetCriterion(num_points=side * side, point_sampling="grid")
    torch.manual_seed(0)
    ours = criterion(class_logits, mask_logits, targets)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)                   # the criterion consumed no random number
    torch.manual_seed(99)
    again = criterion(class_logits, mask_logits, targets)
    dense = _dense_terms(class_logits, mask_logits, targets, side)
    for name in ours:
        assert torch.equal(ours[name], again[name])
        torch.testing.assert_close(ours[name], dense[name], rtol=1e-5, atol=1e-6)
    # A map that is not the grid's size is read bilinearly at the same centres.
    coarse = SetCriterion(num_points=8 * 8, point_sampling="grid")
    torch.testing.assert_close(coarse._sample(mask_logits[0], coarse._grid(torch.device("cpu")).expand(B, -1, -1)),
                               F.avg_pool2d(mask_logits[0], 2).flatten(2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="square"):
        SetCriterion(num_points=200, point_sampling="grid")
    with pytest.raises(ConfigError, match="point_sampling"):
        SetCriterion(point_sampling="uniform")
