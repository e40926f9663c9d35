"""CisDQ on the shared engine: layout, freezing, merged inference logits, QGKD pieces and the KL variant.

Constructed ModelOutputs check the loss pieces by hand; the tiny real model (64 px, two images) checks the
hooks and one optimisation step at t > 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.batch import Batch, Target
from benchmark.engine.criterion import SetCriterion
from benchmark.engine.model import build_model
from benchmark.engine.outputs import ModelOutputs
from benchmark.engine.presets import get_preset
from benchmark.errors import ConfigError
from methods import get_method
from methods.base import StepContext
from methods.cisdq import (
    CisDQ,
    CisDQKL,
    CisDQParams,
    class_shares,
    group_set_loss,
    group_size,
    local_targets,
    pod_terms,
    pseudo_targets,
    query_pod_lists,
)
from methods.cisdq_kl import kl_distillation, kl_weights_for
from protocols import get_protocol

SIZE = 64


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def make_outputs(group_logits, mask_logits, *, num_layers=2, states=None, backbone=None, mask_features=None):
    """ModelOutputs with the same class/mask logits at every layer; groups in order, columns contiguous."""
    queries, columns, q0, c0 = [], [], 0, 0
    for logits in group_logits:
        queries.append(slice(q0, q0 + logits.shape[1]))
        columns.append(slice(c0, c0 + logits.shape[2] - 1))
        q0, c0 = q0 + logits.shape[1], c0 + logits.shape[2] - 1
    batch = mask_logits.shape[0]
    if states is None:
        states = [torch.zeros(batch, q0, 4) for _ in range(num_layers)]
    if backbone is None:
        backbone = tuple(torch.zeros(batch, 2, 4, 4) for _ in range(4))
    if mask_features is None:
        mask_features = torch.zeros(batch, 3, *mask_logits.shape[-2:])
    return ModelOutputs(
        layer_class_logits=[tuple(group_logits) for _ in range(num_layers)],
        layer_mask_logits=[mask_logits for _ in range(num_layers)],
        layer_query_states=list(states),
        backbone_features=tuple(backbone),
        mask_features=mask_features,
        group_queries=tuple(queries),
        group_columns=tuple(columns),
    )


def half_masks():
    top = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    top[: SIZE // 2] = True
    return top, ~top


def semantic_targets(columns):
    """One mask per class: image 0 has both classes (top / bottom halves), image 1 the first one."""
    top, bottom = half_masks()
    a, b = columns
    return [Target(torch.tensor([a, b]), torch.stack([top, bottom])), Target(torch.tensor([a]), top[None])]


def instance_targets(columns):
    """Two instances of the same class in image 0 (left and right squares), one of another in image 1."""
    left = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    left[8:24, 4:20] = True
    right = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    right[30:50, 36:60] = True
    a, b = columns
    return [Target(torch.tensor([a, a]), torch.stack([left, right])), Target(torch.tensor([b]), right[None])]


def batch_of(targets):
    g = torch.Generator().manual_seed(3)
    return Batch(torch.randn(2, 3, SIZE, SIZE, generator=g), torch.ones(2, SIZE, SIZE, dtype=torch.long), targets)


def step_context(protocol, step, model_old=None, num_points=64):
    return StepContext(protocol=protocol, step=step, num_old=len(protocol.old(step)),
                       num_seen=len(protocol.seen(step)), task=protocol.task,
                       criterion=SetCriterion(num_points=num_points), old_model=model_old)


@pytest.fixture(scope="module")
def synth():
    return get_protocol("synth-10-5")          # steps of 10, 5, 5 classes


def fresh_step0_model(method, protocol):
    torch.manual_seed(0)
    return build_model(get_preset("tiny"), method.initial_layout(protocol, get_preset("tiny")))


# --------------------------------------------------------------------------------------------------
# hyper-parameters and layout
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, first, later", [
    ("voc-15-1", (16, 16), (1, 1)),            # ref. 1.1: VOC 15-1 Q0 16, Qi 1
    ("ade-100-10", (100, 100), (10, 10)),      # ADE 100-10: Q0 100, Qi 10
    ("ade-inst-50-10", (100, 50), (20, 10)),   # ADE-ins 50-10: Q0 100, Qi 20
    ("coco-40-8", (100, 40), (20, 8)),         # COCO 40-8: Q0 100, Qi 20
    ("coco-60-20", (150, 60), (50, 20)),       # COCO 60-20: Q0 150, Qi 50
    ("synth-10-2", (10, 10), (2, 2)),          # 1 query per class (semantic)
    ("synth-inst-10-2", (20, 10), (4, 2)),     # 2 queries per class (instance)
    ("coco-40-4~synth", (100, 40), (10, 4)),   # a real protocol's shape on synthetic data
])
def test_queries_per_group_follow_the_original_settings(protocol, first, later):
    proto = get_protocol(protocol)
    method = get_method("cisdq", proto.name)
    assert method.initial_layout(proto, get_preset("tiny")) == [first]
    assert (group_size(len(proto.steps[1]), method.hparams), len(proto.steps[1])) == later


def test_queries_round_half_up_and_respect_the_minimum():
    assert group_size(3, CisDQParams(queries_per_class=2.5)) == 8     # 7.5 -> 8
    assert group_size(1, CisDQParams(queries_per_class=2.5)) == 3     # 2.5 -> 3
    assert group_size(1, CisDQParams(queries_per_class=1.0, min_queries_per_group=5)) == 5


def test_invalid_hyper_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="distill"):
        CisDQParams(distill="kd")
    with pytest.raises(ConfigError, match="queries_per_class"):
        CisDQParams().with_overrides({"queries_per_class": 0.0})
    with pytest.raises(ConfigError, match="kl_weights"):
        CisDQParams(kl_weights=(1.0, 2.0))
    with pytest.raises(ConfigError, match="method"):
        get_method("cisdq", "synth-10-5", {"unknown_key": 1})


def test_command_line_overrides_are_typed():
    from benchmark.config import apply_overrides

    got = apply_overrides(CisDQParams(), {"kl_weights": "1,2,3,4,5,6", "distill": "kl",
                                          "group_attention_mask": "on", "min_queries_per_group": "3"}, "method")
    assert got.kl_weights == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0) and got.distill == "kl"
    assert got.group_attention_mask is True and got.min_queries_per_group == 3
    with pytest.raises(ConfigError, match="pseudo_threshold"):
        apply_overrides(CisDQParams(), {"pseudo_threshold": "1.5"}, "method")


def test_method_flags_and_kl_variant_class():
    assert CisDQ.shares_standard_step0 and CisDQ.needs_old_model and CisDQ.query_groups
    assert CisDQKL.for_protocol("voc-19-1").hparams.distill == "kl"
    assert CisDQKL.for_protocol("voc-19-1").hparams.kl_weights == (300, 5, 1, 100, 0.1, 1)
    assert CisDQ.for_protocol("voc-19-1").hparams.distill == "qgkd"


def test_configure_model_adds_the_step_group_and_freezes_old_content_queries(synth):
    method = get_method("cisdq", synth.name)
    model = fresh_step0_model(method, synth)
    assert model.layout == ((10, 10),)
    method.configure_model(model, step_context(synth, 0))            # step 0: nothing to add
    assert model.layout == ((10, 10),)
    method.configure_model(model, step_context(synth, 1))
    assert model.layout == ((10, 10), (5, 5))
    method.configure_model(model, step_context(synth, 1))            # idempotent (e.g. a resumed step)
    assert model.layout == ((10, 10), (5, 5))
    method.configure_model(model, step_context(synth, 2))
    assert model.layout == ((10, 10), (5, 5), (5, 5))
    frozen = [p.requires_grad for g in range(3) for p in model.content_query_parameters(g)]
    assert frozen == [False, False, True]
    assert model.group_query_positions[0].weight.requires_grad and model.class_heads[0].weight.requires_grad
    with pytest.raises(ValueError, match="query groups"):
        method.configure_model(fresh_step0_model(method, synth), step_context(synth, 2))


def test_group_attention_mask_option_reaches_student_and_teacher(synth):
    method = get_method("cisdq", synth.name, {"group_attention_mask": True})
    model = fresh_step0_model(method, synth)
    old = model.frozen_copy()
    method.configure_model(model, step_context(synth, 1, old))
    assert model.group_attention_mask and old.group_attention_mask


# --------------------------------------------------------------------------------------------------
# merged inference logits
# --------------------------------------------------------------------------------------------------

def test_class_probs_have_the_global_layout_and_groups_do_not_interact():
    g = torch.Generator().manual_seed(0)
    group0, group1 = torch.randn(2, 3, 4 + 1, generator=g), torch.randn(2, 2, 2 + 1, generator=g)
    masks = torch.randn(2, 5, 8, 8, generator=g)
    probs = make_outputs([group0, group1], masks).class_probs()
    assert probs.shape == (2, 5, 6)                                   # all queries x global columns 0..5
    torch.testing.assert_close(probs[:, :3, :4], group0.softmax(-1)[..., :-1])
    torch.testing.assert_close(probs[:, 3:, 4:], group1.softmax(-1)[..., :-1])
    assert probs[:, :3, 4:].abs().max() == 0 and probs[:, 3:, :4].abs().max() == 0
    # Another group's logits (its no-object included) do not change a query's probabilities.
    changed = make_outputs([group0, group1 * 10 + 3], masks).class_probs()
    torch.testing.assert_close(changed[:, :3], probs[:, :3], rtol=0, atol=0)


def test_real_model_outputs_merge_into_the_seen_columns(synth):
    method = get_method("cisdq", synth.name)
    model = fresh_step0_model(method, synth)
    method.configure_model(model, step_context(synth, 1))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    probs = out.class_probs()
    assert probs.shape == (1, 15, 15)
    assert out.group_columns == (slice(0, 10), slice(10, 15))
    torch.testing.assert_close(probs[0, 10:, 10:], out.class_logits(1)[0].softmax(-1)[:, :-1])
    assert probs[0, :10, 10:].abs().max() == 0 and probs[0, 10:, :10].abs().max() == 0
    # Each query's probabilities over its own group's classes plus the dropped no-object sum to one.
    no_object = torch.cat([out.class_logits(g)[0].softmax(-1)[:, -1] for g in range(2)])
    torch.testing.assert_close(probs[0].sum(-1) + no_object, torch.ones(15))


# --------------------------------------------------------------------------------------------------
# QGKD pieces
# --------------------------------------------------------------------------------------------------

def confident_teacher():
    """Group 0: 3 queries over 2 classes; group 1: 2 queries over 1 class; masks 8 x 8."""
    big = 8.0
    group0 = torch.tensor([[[big, 0.0, 0.0],       # class 0, p = e^8 / (e^8 + 2) = 0.99933, sharp mask: kept
                            [0.0, big, 0.0],       # class 1, one barely positive pixel: score just < 0.5
                            [0.0, 0.0, big]]])     # no-object
    group1 = torch.tensor([[[big, 0.0],            # class 0 of group 1 (global column 2), sharp mask: kept
                            [0.0, big]]])
    masks = torch.full((1, 5, 8, 8), -6.0)
    masks[0, 0, 2:6, 2:6] = 6.0
    masks[0, 1, 0, 0] = 0.001                      # mean prob 0.50025 x 0.99933 = 0.49992 < 0.5
    masks[0, 3, 4:, 4:] = 6.0
    return make_outputs([group0, group1], masks)


def teacher_of_step1():
    """The previous model's outputs at step 1: group 0 of :func:`confident_teacher` only."""
    full = confident_teacher()
    return full.layer_class_logits[-1][:1], full.layer_mask_logits[-1][:, :3]


def test_pseudo_targets_from_constructed_teacher_outputs():
    teacher = confident_teacher()
    targets0 = pseudo_targets(teacher, 0)
    assert len(targets0) == 1 and targets0[0].labels.tolist() == [0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(targets0[0].masks[0], expected)               # at mask resolution, logit > 0
    targets1 = pseudo_targets(teacher, 1)
    assert targets1[0].labels.tolist() == [0]                        # group-local label of global column 2
    assert targets1[0].masks[0].sum() == 16 and targets1[0].masks[0][4:, 4:].all()
    # A lower cut keeps the barely-confident one-pixel query of class 1 too.
    assert sorted(pseudo_targets(teacher, 0, threshold=0.45)[0].labels.tolist()) == [0, 1]


def test_local_targets_shift_columns_and_refuse_foreign_labels():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    out = local_targets([Target(torch.tensor([10, 14]), masks)], slice(10, 15))
    assert out[0].labels.tolist() == [0, 4] and out[0].masks is masks
    with pytest.raises(ValueError, match="outside the new group's columns 10..14"):
        local_targets([Target(torch.tensor([3]), masks[:1])], slice(10, 15))


def random_feature_outputs(seed, group_logits, mask_logits, num_layers=3):
    g = torch.Generator().manual_seed(seed)
    batch, queries = mask_logits.shape[:2]
    return make_outputs(
        group_logits, mask_logits, num_layers=num_layers,
        states=[torch.randn(batch, queries, 4, generator=g) for _ in range(num_layers)],
        backbone=tuple(torch.randn(batch, c, s, s, generator=g) for c, s in ((2, 8), (3, 4), (4, 4), (5, 2))),
        mask_features=torch.randn(batch, 3, 8, 8, generator=g))


def test_pod_terms_are_zero_for_identical_student_and_teacher_but_qgkd_is_not():
    teacher = confident_teacher()
    logits = [t.clone().requires_grad_() for t in teacher.layer_class_logits[-1]]
    masks = teacher.layer_mask_logits[-1].clone().requires_grad_()
    same = random_feature_outputs(1, logits, masks)
    teacher_same = random_feature_outputs(1, teacher.layer_class_logits[-1], teacher.layer_mask_logits[-1])
    for t in (*same.backbone_features, same.mask_features, *same.layer_query_states):
        t.requires_grad_()
    terms = pod_terms(teacher_same, same, 2, (10.0, 100.0, 0.1), 1e-5)
    assert set(terms) == {"pod_backbone", "pod_mask_features", "pod_queries"}
    assert all(v.item() == 0.0 for v in terms.values())
    sum(terms.values()).backward()
    assert all(t.grad is None or t.grad.abs().max() == 0 for t in (*same.backbone_features, same.mask_features))
    # The set loss on the teacher's own pseudo-instances is not zero: the CE of the matched query is
    # -log(0.9993) > 0, unmatched queries pay the no-object CE, the point-sampled BCE of a sharp but finite
    # mask is > 0. It is what QGKD minimises, not a distance between student and teacher.
    torch.manual_seed(0)
    qgkd = group_set_loss(SetCriterion(num_points=64), same, 0, pseudo_targets(teacher_same, 0))
    assert all(v.item() > 0 for v in qgkd.values())


def test_pod_terms_reproduce_the_original_effective_weights():
    logits = [torch.zeros(2, 3, 3), torch.zeros(2, 2, 2), torch.zeros(2, 4, 4)]
    masks = torch.zeros(2, 9, 8, 8)
    old = random_feature_outputs(1, logits, masks)
    new = random_feature_outputs(2, logits, masks)

    def pod(a, b):   # PLOP's local POD distance on squared features, written out for a few scales
        def phi(x):
            x = x.pow(2)
            parts = []
            for s in (1, 2, 4):
                k = x.shape[-1] // s
                if k == 0:
                    continue
                for i in range(s):
                    for j in range(s):
                        tile = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                        parts += [tile.mean(3).flatten(1), tile.mean(2).flatten(1)]
            return torch.cat(parts, 1)
        return (phi(a) - phi(b)).norm(dim=1).mean()

    d = [pod(a, b) for a, b in zip(old.backbone_features, new.backbone_features)]
    terms = pod_terms(old, new, 2, (10.0, 100.0, 0.1), 1e-5)
    torch.testing.assert_close(terms["pod_backbone"], 10 * (d[0] + d[1] + d[2] + 1e-5 * d[3]) / 4)
    torch.testing.assert_close(terms["pod_mask_features"], 1e-3 * pod(old.mask_features, new.mask_features))
    # Query entries: old groups 0 and 1 (not the new group 2), group-major then layer; on 1 x 1 maps each
    # entry is the mean over queries and images of sqrt(2) ||q_old^2 - q_new^2||; the last entry x 1e-5.
    entries = []
    for g in (slice(0, 3), slice(3, 5)):
        for layer in range(3):
            a, b = old.layer_query_states[layer][:, g], new.layer_query_states[layer][:, g]
            entries.append((math.sqrt(2) * (a.pow(2) - b.pow(2)).norm(dim=-1)).mean())
    entries[-1] = entries[-1] * 1e-5
    torch.testing.assert_close(terms["pod_queries"], 0.1 * torch.stack(entries).mean())
    old_q, new_q = query_pod_lists(old, new, 2)
    assert [tuple(x.shape) for x in old_q] == [(6, 4, 1, 1)] * 3 + [(4, 4, 1, 1)] * 3
    assert "pod_queries" not in pod_terms(old, new, 2, (10.0, 100.0, 0.0), 1e-5)


def test_class_shares():
    assert class_shares((10, 5, 5), 1) == [10 / 15, 5 / 15]
    assert class_shares((11, 5, 5), 2) == [11 / 21, 5 / 21, 5 / 21]
    assert class_shares((10, 5, 5), 0) == [1.0]


def test_loss_weights_group_losses_by_class_share(synth):
    """At t = 1 the GT loss is 5/15 of the new group's set loss and QGKD 10/15 of group 0's on its
    pseudo-instances (same random points: the criterion draws them in the same order)."""
    method = get_method("cisdq", synth.name)
    teacher = confident_teacher()          # group 0 (2 classes) + group 1 (1 class) as a 3-class protocol
    protocol = get_protocol("synth-2-1")
    ctx = step_context(protocol, 1)
    targets = [Target(torch.tensor([2]), torch.ones(1, 8, 8, dtype=torch.bool))]
    batch = Batch(torch.zeros(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.long), targets)
    student = random_feature_outputs(5, teacher.layer_class_logits[-1], teacher.layer_mask_logits[-1] * 0.5)
    old = random_feature_outputs(6, *teacher_of_step1())
    torch.manual_seed(0)
    terms = method.loss(batch, student, old, ctx)
    torch.manual_seed(0)
    gt = group_set_loss(ctx.criterion, student, 1, local_targets(targets, slice(2, 3)))
    kd = group_set_loss(ctx.criterion, student, 0, pseudo_targets(old, 0))
    shares = class_shares(protocol.step_sizes, 1)
    assert shares == [2 / 3, 1 / 3]
    for name in ("ce", "mask", "dice"):
        torch.testing.assert_close(terms[name], shares[1] * gt[name])
        torch.testing.assert_close(terms[f"qgkd_{name}"], shares[0] * kd[name])
    assert set(terms) == {"ce", "mask", "dice", "qgkd_ce", "qgkd_mask", "qgkd_dice",
                          "pod_backbone", "pod_mask_features", "pod_queries"}
    # Switching the weighting off gives the plain sum.
    plain = CisDQ(method.hparams.with_overrides({"class_share_weighting": False}))
    torch.manual_seed(0)
    torch.testing.assert_close(plain.loss(batch, student, old, ctx)["ce"], gt["ce"])


def test_step0_loss_is_group0_set_loss_only(synth):
    method = get_method("cisdq", synth.name)
    model = fresh_step0_model(method, synth)
    batch = batch_of(semantic_targets((0, 7)))
    out = model(batch.pixel_values)
    ctx = step_context(synth, 0)
    torch.manual_seed(0)
    terms = method.loss(batch, out, None, ctx)
    torch.manual_seed(0)
    expected = ctx.criterion(out.layer_class_logits_of(0), out.layer_mask_logits, batch.targets)
    assert set(terms) == {"ce", "mask", "dice"}
    for name in terms:
        torch.testing.assert_close(terms[name], expected[name])


# --------------------------------------------------------------------------------------------------
# one optimisation step at t > 0 on the real model (semantic and instance targets)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_targets", [semantic_targets, instance_targets])
@pytest.mark.parametrize("distill", ["qgkd", "kl"])
def test_training_step_keeps_old_content_queries_and_moves_the_rest(synth, make_targets, distill):
    method = get_method("cisdq", synth.name, {"distill": distill})
    model = fresh_step0_model(method, synth)
    old = model.frozen_copy()
    ctx = step_context(synth, 1, old)
    method.configure_model(model, ctx)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-3))
    batch = batch_of(make_targets((10, 13)))
    out = model(batch.pixel_values, batch.pixel_mask)
    with torch.no_grad():
        old_out = old(batch.pixel_values, batch.pixel_mask)
    terms = method.loss(batch, out, old_out, ctx)
    assert all(torch.isfinite(v) for v in terms.values())
    if distill == "kl":
        assert {"kd_kl", "kd_mask_l1"} <= set(terms) and "qgkd_ce" not in terms
    else:
        assert {"qgkd_ce", "pod_backbone", "pod_queries"} <= set(terms) and "kd_kl" not in terms
    sum(terms.values()).backward()
    optimizer.step()
    after = dict(model.named_parameters())

    def moved(name):
        return not torch.equal(before[name], after[name].detach())

    assert not moved("model.transformer_module.queries_features.weight")          # group 0 content: frozen
    assert moved("model.transformer_module.queries_embedder.weight")              # group 0 positions train
    assert moved("class_heads.0.weight")                                          # old head trains (KD)
    assert moved("group_query_features.0.weight") and moved("class_heads.1.weight")  # the new group
    assert any(moved(n) for n in before if n.startswith("model.pixel_level_module.encoder."))


# --------------------------------------------------------------------------------------------------
# the KL variant (cisdq_ade / cisdq_voc)
# --------------------------------------------------------------------------------------------------

def test_kl_distillation_by_hand():
    teacher_logits = [torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]), torch.tensor([[[1.0, -1.0]]])]
    student_logits = [torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]])]
    teacher_masks = torch.zeros(1, 4, 2, 2)
    student_masks = torch.zeros(1, 4, 2, 2)
    student_masks[0, 0, 0, 0] = 0.5          # SmoothL1: 0.5 * 0.5^2 = 0.125
    student_masks[0, 2, 1, 1] = -3.0         # SmoothL1: 3 - 0.5 = 2.5
    student_masks[0, 3] = 100.0              # the new group's query: not distilled
    teacher = make_outputs(teacher_logits + [torch.zeros(1, 1, 2)], teacher_masks)
    student = make_outputs(student_logits + [torch.zeros(1, 1, 2)], student_masks)

    def kl(t, s):
        p, q = t.softmax(-1), s.softmax(-1)
        return float((p * (p.log() - q.log())).sum())

    expected_kl = (kl(teacher_logits[0][0, 0], student_logits[0][0, 0])
                   + kl(teacher_logits[0][0, 1], student_logits[0][0, 1])
                   + kl(teacher_logits[1][0, 0], student_logits[1][0, 0])) / 3     # B * N = 3 old queries
    got_kl, got_l1 = kl_distillation(student, teacher, 2)
    assert float(got_kl) == pytest.approx(expected_kl, rel=1e-6)
    assert float(got_l1) == pytest.approx((0.125 + 2.5) / (3 * 4), rel=1e-6)     # 3 old queries x 4 pixels
    zero_kl, zero_l1 = kl_distillation(teacher, teacher, 2)
    assert abs(float(zero_kl)) < 1e-7 and float(zero_l1) == 0.0


def test_kl_variant_weights_per_setting():
    assert get_method("cisdq", "ade-100-50", {"distill": "kl"}).hparams.kl_weights == (300, 5, 10, 1000, 0.2, 1)
    assert kl_weights_for("ade-100-10") == (300, 5, 100, 10000, 1, 0.1)
    assert kl_weights_for("voc-19-1") == (300, 5, 1, 100, 0.1, 1)                # cisdq_voc column
    assert kl_weights_for("voc-15-5-disjoint") == (300, 5, 100, 10000, 1, 0.1)
    assert kl_weights_for("coco-40-40") == (120, 2, 10, 1000, 1, 0.4)
    assert kl_weights_for("coco-40-8@rand3~synth") == (300, 5, 10, 1000, 0.2, 0.1)
    assert kl_weights_for("ade-inst-50-10") == (300, 5, 100, 10000, 1, 0.1)


def test_kl_loss_weights(synth):
    teacher = confident_teacher()
    protocol = get_protocol("synth-2-1")
    ctx = step_context(protocol, 1)
    targets = [Target(torch.tensor([2]), torch.ones(1, 8, 8, dtype=torch.bool))]
    batch = Batch(torch.zeros(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.long), targets)
    student = random_feature_outputs(5, [t * 0.3 for t in teacher.layer_class_logits[-1]],
                                     teacher.layer_mask_logits[-1] * 0.5)
    old = random_feature_outputs(6, *teacher_of_step1())
    weights = (7.0, 3.0, 2.0, 5.0, 0.5, 0.25)
    method = CisDQ(CisDQParams(distill="kl", kl_weights=weights))
    torch.manual_seed(0)
    terms = method.loss(batch, student, old, ctx)
    torch.manual_seed(0)
    gt = group_set_loss(ctx.criterion, student, 1, local_targets(targets, slice(2, 3)))
    kl, l1 = kl_distillation(student, old, 1)
    pods = pod_terms(old, student, 1, (2.0, 5.0, 0.5), 1e-5)
    torch.testing.assert_close(terms["ce"], 0.25 * gt["ce"])
    torch.testing.assert_close(terms["kd_kl"], 7.0 * kl)
    torch.testing.assert_close(terms["kd_mask_l1"], 3.0 * l1)
    for name, value in pods.items():
        torch.testing.assert_close(terms[name], value)
