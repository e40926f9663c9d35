"""BalConpas on the shared engine: formulas with values worked out here, and a real run."""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.batch import Target
from benchmark.engine.criterion import SetCriterion
from benchmark.engine.model import build_model
from methods.balconpas import (bam_no_object_scale, linear_default_init_, pcbd_loss, pcbd_queries,
                               pseudo_targets)
from methods.pseudo_labels import comformer_pseudo_labels
from tests.test_runner import metrics, spec


def test_pcbd_is_zero_for_identical_states_and_only_reads_matched_pseudo_queries():
    torch.manual_seed(0)
    old = [torch.randn(2, 6, 4) for _ in range(3)]
    new = [s.clone() for s in old]
    # image 0: queries 0, 2, 5 matched to targets 1, 0, 2; two pseudo-labels (targets 0, 1) -> queries 0 and 2
    # image 1: query 3 matched to target 0, no pseudo-label -> nothing
    matching = [(torch.tensor([0, 2, 5]), torch.tensor([1, 0, 2])), (torch.tensor([3]), torch.tensor([0]))]
    images, queries = pcbd_queries(matching, [2, 0])
    assert images.tolist() == [0, 0] and queries.tolist() == [0, 2]
    for s in new:
        s[0, 5] += 1.0                   # matched to ground truth, not distilled
        s[1] += 1.0                      # no pseudo-label in image 1
    assert pcbd_loss(new, old, images, queries).item() == 0.0
    new[1][0, 2] += 2.0                  # one distilled query moves by 2 in all 4 channels at level 1
    # level 1: mean over 2 queries x 4 channels of squared differences = (4 * 4) / 8 = 2
    assert pcbd_loss(new, old, images, queries).item() == pytest.approx(2.0)
    empty = pcbd_loss(new, old, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and not math.isnan(empty.item())   # the original's NaN, fixed


def test_balanced_no_object_weights_on_constructed_matchings():
    assert bam_no_object_scale(10, [3, 2, 4], [False, False, False]) is None
    # unmatched: 7, 8, 6; replayed image 1 holds 8 of the 21 -> current images carry 21 / 13 each
    scale = bam_no_object_scale(10, [3, 2, 4], [False, True, False])
    assert scale.tolist() == pytest.approx([21 / 13, 0.0, 21 / 13])


def test_criterion_no_object_scale_moves_the_weight_and_keeps_the_normaliser():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3)                 # 2 images, 3 queries, 2 classes + no-object
    masks = torch.randn(2, 3, 8, 8)
    targets = [Target(torch.tensor([0]), torch.rand(1, 8, 8) > 0.5), Target(torch.tensor([1]), torch.rand(1, 8, 8) > 0.5)]
    crit = SetCriterion(num_points=16, class_weight=1.0)
    matching = [crit.match(logits, masks, targets)]
    plain = crit([logits], [masks], targets, indices=matching)["ce"]
    ones = crit([logits], [masks], targets, indices=matching, no_object_scale=torch.ones(2))["ce"]
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    scaled = crit([logits], [masks], targets, indices=matching, no_object_scale=torch.tensor([0.0, 2.0]))["ce"]
    target_classes = torch.full((2, 3), 2)
    for b, (rows, cols) in enumerate(matching[0]):
        target_classes[b, rows] = targets[b].labels[cols]
    ce = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")
    w = torch.where(target_classes == 2, 0.1, 1.0)
    factor = torch.tensor([[0.0], [2.0]])
    w_scaled = torch.where(target_classes == 2, 0.1 * factor, 1.0)
    assert scaled.item() == pytest.approx(((w_scaled * ce).sum() / w.sum()).item(), rel=1e-5)


def test_pseudo_labels_come_first_and_use_the_segment_area_rule():
    # one old query of class 1 wins every pixel; its own mask (>= 0.5) is the left 4 columns of an 8x8 image
    class_logits = torch.tensor([[0.0, 5.0, -5.0], [0.0, 0.0, 9.0]])   # query 1 predicts no-object
    mask_logits = torch.full((2, 8, 8), -9.0)
    mask_logits[0, :, :4] = 9.0
    mask_logits[0, :, 4:] = -1.0                                      # wins there too, but below 0.5
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, :2, :4] = True                                              # ground truth covers 8 of its 32 pixels
    # segment = 24 of 32 own pixels = 0.75 < 0.8: BalConpas drops it; CoMFormer's assigned area (56) keeps it
    labels, _ = comformer_pseudo_labels(class_logits, mask_logits, gt, min_kept_fraction=0.8, kept_area="segment")
    assert labels.numel() == 0
    labels, _ = comformer_pseudo_labels(class_logits, mask_logits, gt, min_kept_fraction=0.8)
    assert labels.tolist() == [1]
    gt[0] = False
    gt[0, 0, 0] = True                                                # 31 of 32 -> kept
    old = type("Old", (), {"class_logits": lambda self, g: class_logits[None].repeat(2, 1, 1),
                           "mask_logits": lambda self, g: mask_logits[None].repeat(2, 1, 1, 1)})()
    targets = [Target(torch.tensor([7]), gt.clone()), Target(torch.tensor([7]), gt.clone())]
    merged, counts = pseudo_targets(old, targets, replay=[False, True])
    assert counts == [1, 0]
    assert merged[0].labels.tolist() == [1, 7] and merged[0].masks[0, :, :4].sum() == 31
    assert merged[1].labels.tolist() == [7]                           # replayed images: ground truth only


def test_new_class_rows_get_pytorch_default_linear_init():
    torch.manual_seed(0)
    model = build_model("tiny", [(10, 10)])
    no_object = model.class_heads[0].weight[-1].clone()
    model.grow_head(15, init=linear_default_init_)
    head = model.class_heads[0]
    bound = 1 / math.sqrt(head.in_features)
    rows = head.weight[10:15]
    assert rows.abs().max() <= bound and rows.std() > bound / 3           # uniform, not N(0, 0.02)
    assert torch.equal(head.weight[-1], no_object)


def test_balconpas_run_distils_and_writes_metrics(tmp_path):
    from benchmark.runner import run_one

    run = run_one(spec("balconpas", tmp_path), show_progress=False)
    # the distillation is a logged term of every increment (0 here: a 4-iteration base model predicts no object)
    lines = [line for line in (run / "log.txt").read_text().splitlines() if "trained:" in line]
    assert len(lines) == 2 and all("pcbd" in line for line in lines)
    table = metrics(run)
    assert set(table.step) == {0, 1, 2}


def test_greedy_class_proportional_picks_by_hand():
    from benchmark.data.replay import greedy_class_proportional

    stats = [[1, 0], [1, 0], [0, 1], [1, 1]]
    # target 50/50: [1,1] first (L1 0); then [1,0] and [0,1] tie at 1/3 -> the first; then [0,1] brings 2:2
    assert greedy_class_proportional(stats, [5, 5], 3) == [3, 0, 2]
    assert greedy_class_proportional(stats, [5, 5], 9) == [3, 0, 2, 1]      # never more than the candidates


class _FakeDataset:
    """A dataset reduced to what the memory selection reads: class presence per image."""

    name, split, fingerprint = "fake", "train", "fake-v1"

    def __init__(self, presence, cache_dir):
        self._presence = presence
        self.cache_dir = cache_dir

    def presence(self):
        return self._presence


def test_replay_memory_matches_the_class_distribution(tmp_path):
    import numpy as np

    from benchmark.data.replay import class_proportional_memory
    from protocols import get_protocol

    protocol = get_protocol("synth-10-5")            # classes 1..10, then 11..15, then 16..20
    rng = np.random.default_rng(0)
    weights = np.linspace(1, 4, 20)                  # later classes are more frequent
    presence = []
    for _ in range(400):
        k = rng.integers(1, 4)
        presence.append(tuple(sorted(rng.choice(np.arange(1, 21), size=k, replace=False, p=weights / weights.sum()))))
    ds = _FakeDataset(presence, tmp_path)
    memory = class_proportional_memory(ds, protocol, 1, 30)
    assert len(memory) == 30 and all(s == 0 for _, s in memory) and len({i for i, _ in memory}) == 30

    def ratios(entries):
        counts = np.zeros(20)
        for i, s in entries:
            for c in presence[i]:
                if c in protocol.steps[s]:
                    counts[c - 1] += 1
        return counts / counts.sum()

    step0 = [(i, 0) for i, p in enumerate(presence) if set(p) & set(protocol.steps[0])]
    target = ratios(step0)
    chosen = np.abs(ratios(memory) - target).sum()
    random_l1 = [np.abs(ratios([step0[k] for k in rng.choice(len(step0), 30, replace=False)]) - target).sum()
                 for _ in range(50)]
    assert chosen < min(random_l1)                   # closer to the data's class ratios than any random draw
    memory2 = class_proportional_memory(ds, protocol, 2, 30)
    # after step 1: floor(30 * 10 / 15) = 20 kept from the previous memory, 10 drawn from step 1's images
    assert sum(s == 0 for _, s in memory2) == 20 and sum(s == 1 for _, s in memory2) == 10
    assert {e for e in memory2 if e[1] == 0} <= set(memory)


def test_balconpas_r_replays_flagged_images_from_its_recorded_memory(tmp_path):
    from benchmark.data import TrainLoader, TrainView
    from benchmark.data.views import ConcatView, ReplayView
    from benchmark.runner import run_one

    run = run_one(spec("balconpas-r", tmp_path, extra=("--set", "method.memory_size=4")), show_progress=False)
    record = (run / "replay_step_01.json")
    import json

    entries = json.loads(record.read_text())["entries"]
    assert len(entries) == 4 and all(s == 0 for _, s in entries)
    entries2 = json.loads((run / "replay_step_02.json").read_text())["entries"]
    assert sum(s == 0 for _, s in entries2) == 2 and sum(s == 1 for _, s in entries2) == 2   # floor(4*10/15)
    assert set(metrics(run).step) == {0, 1, 2}
    # the data layer: replayed images come flagged, with only their own step's classes
    from benchmark.runner import open_split, resolve

    r = resolve(spec("balconpas-r", tmp_path, extra=("--set", "method.memory_size=4")))
    ds = open_split(r, "train")
    view = ConcatView(TrainView(ds, r.protocol, 1), ReplayView(ds, r.protocol, entries))
    flags, labels = [], []
    for batch, _ in zip(TrainLoader(view, batch_size=len(view), seed=0), range(1)):
        flags, labels = batch.replay, batch.targets
    assert sum(flags) == 4 and len(flags) == len(view)
    for flag, target in zip(flags, labels):
        allowed = range(0, 10) if flag else range(10, 15)
        assert all(int(c) in allowed for c in target.labels)
