"""MiB, PLOP and CoMFormer as Method objects: hyper-parameters, step 0, initialisation, pseudo-labels, KD, POD.

Real tiny engine models where the behaviour depends on the model (initialisation, back-propagation, zero
distillation at the start of a step); hand-built old-model outputs where the expected values are worked out
in the test (pseudo-labels, thresholds, term weights).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.batch import Batch, Target
from benchmark.engine.criterion import SetCriterion
from benchmark.engine.model import build_model
from benchmark.engine.outputs import ModelOutputs
from benchmark.errors import ConfigError
from methods import get_method
from methods.base import StepContext
from methods.comformer import CoMFormer, CoMFormerParams
from methods.finetune import Finetune
from methods.losses import kd_query_weights, local_pod, unbiased_ce, unbiased_kd
from methods.mib import MiB, MiBParams, unbiased_class_loss, unbiased_nll
from methods.plop import PLOP, EntropyStatistics, PLOPParams, nearest_resize
from methods.pseudo_labels import plop_thresholds
from protocols import get_protocol

PROTOCOL = get_protocol("synth-10-5")      # steps of 10, 5, 5 classes
OLD, SEEN = 10, 15                          # step 1
QUERIES, SIZE = 12, 64


# ---- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_model("tiny", [(QUERIES, OLD)])


def criterion(**kwargs) -> SetCriterion:
    return SetCriterion(num_points=128, **kwargs)


def make_ctx(step: int, *, num_old: int = OLD, num_seen: int = SEEN, task: str = "semantic", crit=None,
             old_model=None, iterate_train=None) -> StepContext:
    if step == 0:
        num_old, num_seen = 0, num_old
    return StepContext(protocol=PROTOCOL, step=step, num_old=num_old, num_seen=num_seen, task=task,
                       criterion=crit if crit is not None else criterion(), old_model=old_model,
                       iterate_train=iterate_train)


def make_batch(labels_per_image, seed: int = 0, size: int = SIZE) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for b, labels in enumerate(labels_per_image):
        masks = torch.zeros(len(labels), size, size, dtype=torch.bool)
        for i in range(len(labels)):
            top, left = 8 * i + 4 * b, 6 * i
            masks[i, top:top + 20, left:left + 24] = True
        targets.append(Target(torch.tensor(labels, dtype=torch.long), masks))
    pixel_mask = torch.ones(len(labels_per_image), size, size, dtype=torch.long)
    pixel_mask[0, :, -8:] = 0            # padding on the right of image 0
    return Batch(torch.randn(len(labels_per_image), 3, size, size, generator=gen), pixel_mask, targets,
                 list(range(len(labels_per_image))))


class RecordingCriterion:
    """The real criterion, remembering what each call received."""

    def __init__(self, inner: SetCriterion):
        self.inner = inner
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, class_logits, mask_logits, targets, **kwargs):
        self.calls.append({"targets": list(targets), **kwargs})
        return self.inner(class_logits, mask_logits, targets, **kwargs)


def fake_outputs(class_logits: torch.Tensor, mask_logits: torch.Tensor, features=None,
                 mask_features=None) -> ModelOutputs:
    """A one-layer, one-group ModelOutputs from given tensors (features default to fixed small maps)."""
    b, q, c = class_logits.shape
    gen = torch.Generator().manual_seed(7)
    if features is None:
        features = tuple(torch.randn(b, 4, s, s, generator=gen) for s in (16, 8, 4, 2))
    if mask_features is None:
        mask_features = torch.randn(b, 4, 16, 16, generator=gen)
    return ModelOutputs(layer_class_logits=[(class_logits,)], layer_mask_logits=[mask_logits],
                        layer_query_states=[torch.zeros(b, q, 4)], backbone_features=tuple(features),
                        mask_features=mask_features, group_queries=(slice(0, q),), group_columns=(slice(0, c - 1),))


def step1_models(base, method):
    """(student configured for step 1, frozen old model) from the step-0 model."""
    model = copy.deepcopy(base)
    old = model.frozen_copy()
    ctx = make_ctx(1, old_model=old)
    method.configure_model(model, ctx)
    return model, old, ctx


# ---- hyper-parameters and registry ---------------------------------------------------------------

def test_registry_defaults_and_protocol_overrides():
    assert isinstance(get_method("mib"), MiB) and get_method("mib").hparams == MiBParams()
    assert MiBParams().kd_weight == 200.0 and MiBParams().mib_init
    assert CoMFormerParams().kd_weight == 10.0 and not CoMFormerParams().mib_init
    assert PLOPParams().pod_weight == 0.01 and PLOPParams().mib_init and not PLOPParams().object_pixels_only
    for name in ("ade-100-50", "ade-100-50@b", "ade-100-50~synth"):
        assert get_method("comformer", name).hparams.kd_weight == 0.5, name
    for name in ("ade-100-10", "ade-100-5", "ade-inst-50-50", "synth-10-5", "voc-15-5", "", "ade-pan-100-10",
                 "ade-pan-100-5", "coco-pan-83-5", "synth-pan-10-5"):
        assert get_method("comformer", name).hparams.kd_weight == 10.0, name
    for name in ("ade-pan-100-50", "ade-pan-100-50~synth"):       # CoMFormer scripts/adps.sh
        assert get_method("comformer", name).hparams.kd_weight == 5.0, name
    assert get_method("cisdq", "ade-pan-100-5").hparams.queries_per_class == 1.0
    assert get_method("cisdq", "coco-pan-83-5").hparams.queries_per_class == 2.5
    assert get_method("plop", "ade-pan-100-5").hparams.pod_weight == 0.001
    expected = {"voc-15-5": 0.01, "voc-15-1@b": 0.01, "ade-100-50": 0.001, "ade-inst-50-10": 0.001,
                "coco-40-20": 0.001, "synth-10-5": 0.001, "synth-inst-10-5": 0.001, "": 0.01}
    for name, weight in expected.items():
        assert get_method("plop", name).hparams.pod_weight == weight, name
    # the user's overrides come last
    assert get_method("comformer", "ade-100-50", {"kd_weight": 3.0}).hparams.kd_weight == 3.0


def test_bad_hyper_parameters_are_user_errors():
    with pytest.raises(ConfigError, match="kd_weights"):
        get_method("mib", "", {"kd_weights": 1.0})
    with pytest.raises(ConfigError, match="kd_weight"):
        MiBParams(kd_weight=-1.0)
    with pytest.raises(ConfigError, match="pseudo_labels"):
        PLOPParams(pseudo_labels="median")
    with pytest.raises(ConfigError, match="pod_schedule"):
        PLOPParams(pod_schedule="sqrt")
    with pytest.raises(ConfigError, match="pseudo_mask_threshold"):
        CoMFormerParams(pseudo_mask_threshold=1.5)


# ---- step 0 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [MiB(), PLOP(), CoMFormer()], ids=["mib", "plop", "comformer"])
def test_step0_loss_equals_finetune(base_model, method):
    model = copy.deepcopy(base_model)
    ctx = make_ctx(0)
    method.configure_model(model, ctx)
    method.before_step(ctx)
    assert model.num_columns == OLD
    batch = make_batch([[1, 4], [7]])
    outputs = model(batch.pixel_values, batch.pixel_mask)
    torch.manual_seed(5)
    expected = Finetune().loss(batch, outputs, None, ctx)
    torch.manual_seed(5)
    got = method.loss(batch, outputs, None, ctx)
    assert set(got) == set(expected) == {"ce", "mask", "dice"}
    for name in got:
        assert torch.equal(got[name], expected[name]), name


# ---- MiB -----------------------------------------------------------------------------------------

def test_mib_init_keeps_old_logits_and_splits_no_object(base_model):
    method = MiB()
    model, old, ctx = step1_models(base_model, method)
    model.eval()
    batch = make_batch([[11, 12], [14]])
    with torch.no_grad():
        before = old(batch.pixel_values).class_logits()
        outputs = model(batch.pixel_values)
        after = outputs.class_logits()
    assert after.shape[-1] == SEEN + 1
    torch.testing.assert_close(after[..., :OLD], before[..., :OLD], rtol=0, atol=1e-6)
    p_before, p_after = before.softmax(-1), after.softmax(-1)
    n = SEEN - OLD
    torch.testing.assert_close(p_after[..., :OLD], p_before[..., :OLD], rtol=1e-5, atol=1e-7)
    share = p_before[..., -1:] / (n + 1)
    torch.testing.assert_close(p_after[..., OLD:SEEN], share.expand(-1, -1, n), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p_after[..., -1:], share, rtol=1e-5, atol=1e-7)
    # the student starts as the teacher: the unbiased KD is zero
    with torch.no_grad():
        terms = method.loss(batch, outputs, old(batch.pixel_values), ctx)
    assert abs(terms["kd"].item()) < 1e-4
    # without the initialisation the new rows are the engine's default and the KD is not zero
    plain = step1_models(base_model, MiB(MiBParams(mib_init=False)))[0]
    plain.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(batch.pixel_values).class_logits().softmax(-1)[..., -1], p_after[..., -1])


def test_unbiased_nll_matches_unbiased_ce():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 8, generator=gen)
    targets = torch.randint(0, 8, (2, 6), generator=gen)
    nll = unbiased_nll(logits, targets, num_old=3)
    assert nll.shape == (12,)
    torch.testing.assert_close(nll.mean(), unbiased_ce(logits, targets, 3, no_object_weight=1.0))
    for i in range(12):  # one row at a time the weighted mean is that row's value
        torch.testing.assert_close(nll[i], unbiased_ce(logits.reshape(12, 8)[i:i + 1], targets.reshape(12)[i:i + 1], 3))


def test_mib_class_loss_is_the_unbiased_ce_of_the_engine_mode():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=gen)
    targets = torch.tensor([[6, 4, 6, 5, 6], [6, 6, 4, 6, 6]])
    standard = unbiased_class_loss(criterion(), num_old=4)
    torch.testing.assert_close(standard(logits, targets), unbiased_ce(logits, targets, 4, no_object_weight=0.1))
    focal = unbiased_class_loss(criterion(mask_mode="softmax"), num_old=4)
    nll = torch.stack([unbiased_ce(logits.reshape(10, 7)[i:i + 1], targets.reshape(10)[i:i + 1], 4)
                       for i in range(10)])
    torch.testing.assert_close(focal(logits, targets), (5.0 * (1 - torch.exp(-nll)) * nll).mean())


def test_mib_loss_terms(base_model):
    method = MiB(MiBParams(mib_init=False))
    model, old, ctx = step1_models(base_model, method)
    ctx.criterion = RecordingCriterion(criterion())
    batch = make_batch([[11, 12], [14]])
    outputs = model(batch.pixel_values, batch.pixel_mask)
    with torch.no_grad():
        old_outputs = old(batch.pixel_values, batch.pixel_mask)
    terms = method.loss(batch, outputs, old_outputs, ctx)
    assert set(terms) == {"ce", "mask", "dice", "kd"}
    call = ctx.criterion.calls[-1]
    assert all(a is b for a, b in zip(call["targets"], batch.targets)) and call["class_loss"] is not None
    probe = torch.randn(2, QUERIES, SEEN + 1)
    probe_targets = torch.full((2, QUERIES), SEEN)
    probe_targets[0, :2] = torch.tensor([11, 12])
    torch.testing.assert_close(call["class_loss"](probe, probe_targets), unbiased_ce(probe, probe_targets, OLD, 0.1))
    expected_kd = 200.0 * unbiased_kd(outputs.class_logits(), old_outputs.class_logits())
    torch.testing.assert_close(terms["kd"], expected_kd)
    assert terms["kd"].item() > 0
    MiB(MiBParams(uce=False)).loss(batch, outputs, old_outputs, ctx)
    assert ctx.criterion.calls[-1]["class_loss"] is None


# ---- CoMFormer -----------------------------------------------------------------------------------

def _comformer_old_outputs() -> ModelOutputs:
    """Old model, one 64x64 image (mask logits at full size, so the expected masks are exact): query 0 =
    class 2 on the top-left quadrant, query 1 = class 5 (more confident) on the bottom-right quadrant,
    queries 2 and 3 = no-object."""
    class_logits = torch.full((1, 4, OLD + 1), -5.0)
    class_logits[0, 0, 2] = 5.0
    class_logits[0, 1, 5] = 6.0
    class_logits[0, 2:, OLD] = 5.0
    mask_logits = torch.full((1, 4, SIZE, SIZE), -8.0)
    mask_logits[0, 0, :32, :32] = 8.0
    mask_logits[0, 1, 32:, 32:] = 8.0
    mask_logits[0, 2] = 8.0
    return fake_outputs(class_logits, mask_logits)


def _gt_top_left() -> Batch:
    masks = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    masks[0, :32, :32] = True        # a new-class object exactly where old query 0 is
    return Batch(torch.zeros(1, 3, SIZE, SIZE), torch.ones(1, SIZE, SIZE, dtype=torch.long),
                 [Target(torch.tensor([12]), masks)], [0])


def _student_outputs(num_columns: int = SEEN, seed: int = 3) -> ModelOutputs:
    gen = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, 4, num_columns + 1, generator=gen).requires_grad_()
    mask_logits = torch.randn(1, 4, 16, 16, generator=gen).requires_grad_()
    return fake_outputs(class_logits, mask_logits)


def test_comformer_appends_mask_pseudo_labels_and_drops_a_covered_query():
    ctx = make_ctx(1, crit=RecordingCriterion(criterion()))
    batch, old_outputs = _gt_top_left(), _comformer_old_outputs()
    terms = CoMFormer().loss(batch, _student_outputs(), old_outputs, ctx)
    assert set(terms) == {"ce", "mask", "dice", "kd"}
    (target,) = ctx.criterion.calls[-1]["targets"]
    assert target.labels.tolist() == [12, 5]          # ground truth first; query 0 (covered) dropped
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[32:, 32:] = True
    assert torch.equal(target.masks[0], batch.targets[0].masks[0])
    assert torch.equal(target.masks[1], expected)
    assert len(batch.targets[0]) == 1                   # the batch is not modified
    # without pseudo-labels the criterion sees the batch's targets
    CoMFormer(CoMFormerParams(pseudo_labels=False)).loss(batch, _student_outputs(), old_outputs, ctx)
    assert ctx.criterion.calls[-1]["targets"][0].labels.tolist() == [12]


def test_comformer_kd_is_reweighted_ukd():
    ctx = make_ctx(1)
    batch, student = _gt_top_left(), _student_outputs()
    old_with_extra = fake_outputs(torch.randn(1, 4, OLD + 1, generator=torch.Generator().manual_seed(4)),
                                  torch.zeros(1, 4, 16, 16))
    terms = CoMFormer().loss(batch, student, old_with_extra, ctx)
    old_logits = old_with_extra.class_logits()
    expected = 10.0 * unbiased_kd(student.class_logits(), old_logits, kd_query_weights(old_logits, 2.0))
    torch.testing.assert_close(terms["kd"], expected)
    terms = CoMFormer(CoMFormerParams(kd_reweight=False, kd_weight=0.5)).loss(batch, student, old_with_extra, ctx)
    torch.testing.assert_close(terms["kd"], 0.5 * unbiased_kd(student.class_logits(), old_logits))


def test_comformer_kd_is_zero_for_a_student_equal_to_its_teacher(base_model):
    method = CoMFormer(CoMFormerParams(mib_init=True))
    model, old, ctx = step1_models(base_model, method)
    model.eval()
    batch = make_batch([[11], [13]])
    with torch.no_grad():
        terms = method.loss(batch, model(batch.pixel_values), old(batch.pixel_values), ctx)
    assert abs(terms["kd"].item()) < 1e-5


# ---- PLOP ----------------------------------------------------------------------------------------

class TwoQueryOldModel(nn.Module):
    """A fake old model over 2 old classes: query q predicts class q (almost surely) with mask logits =
    channel q of the image averaged over 4x4 blocks; counts its forwards."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, pixel_values, pixel_mask=None):
        self.calls += 1
        b = pixel_values.shape[0]
        class_logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]]).expand(b, 2, 3)
        mask_logits = F.avg_pool2d(pixel_values[:, :2], 4)
        return fake_outputs(class_logits, mask_logits)


def _plop_image(gen) -> torch.Tensor:
    """A 32x32 image constant on 4x4 blocks, channels 0/1 = mask logits of the two old queries."""
    low = torch.randn(3, 8, 8, generator=gen) * 3
    return low.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)


def _plop_batches():
    gen = torch.Generator().manual_seed(11)
    batches = []
    for k in range(2):
        images = torch.stack([_plop_image(gen) for _ in range(2)])
        masks = torch.zeros(1, 32, 32, dtype=torch.bool)
        masks[0, 3:17, 5:21] = True                      # covered pixels (not on the 4x4 grid)
        pixel_mask = torch.ones(2, 32, 32, dtype=torch.long)
        pixel_mask[1, -6:, :] = 0                       # padding rows
        targets = [Target(torch.tensor([2 + k]), masks), Target(torch.zeros(0, dtype=torch.long),
                                                                torch.zeros(0, 32, 32, dtype=torch.bool))]
        batches.append(Batch(images, pixel_mask, targets, [2 * k, 2 * k + 1]))
    return batches


def _expected_thresholds(batches, objects_only: bool, floor=0.001) -> np.ndarray:
    """Per-pixel normalised binary entropy of sigmoid(m0) : sigmoid(m1), median per argmax class (numpy).

    Object pixels: both queries have the same class score, so the best query is the one with the larger
    mask, and the pixel is an object iff max(m0, m1) >= 0 (sigmoid >= 0.5)."""
    entropies, classes = [], []
    p_class = np.exp(30.0) / (np.exp(30.0) + 2.0)    # p(class q | query q); p(other class) = 1 / (e^30 + 2)
    p_other = 1.0 / (np.exp(30.0) + 2.0)
    for batch in batches:
        x = batch.pixel_values.double().numpy()
        s0, s1 = 1 / (1 + np.exp(-x[:, 0])), 1 / (1 + np.exp(-x[:, 1]))
        score0, score1 = p_class * s0 + p_other * s1, p_other * s0 + p_class * s1
        p0 = score0 / (score0 + score1)
        p1 = 1 - p0
        entropy = -(p0 * np.log(p0) + p1 * np.log(p1)) / np.log(2)
        argmax = (score1 > score0).astype(int)
        for b, target in enumerate(batch.targets):
            keep = batch.pixel_mask[b].numpy().astype(bool)
            if objects_only:
                keep &= np.maximum(x[b, 0], x[b, 1]) >= 0
            if len(target):
                keep &= ~target.masks.any(0).numpy()
            entropies.append(entropy[b][keep])
            classes.append(argmax[b][keep])
    e, c = np.concatenate(entropies), np.concatenate(classes)
    return np.array([max(np.median(e[c == k]), floor) if (c == k).any() else floor for k in range(2)])


def test_plop_before_step_computes_median_thresholds_and_state_restores_them():
    old, batches = TwoQueryOldModel(), _plop_batches()
    ctx = make_ctx(1, num_old=2, num_seen=4, old_model=old, iterate_train=lambda: iter(batches))
    every_pixel = PLOP()
    every_pixel.before_step(ctx)
    expected = _expected_thresholds(batches, objects_only=False)
    np.testing.assert_allclose(every_pixel.thresholds.numpy(), expected, rtol=1e-5, atol=1e-6)
    method = PLOP(PLOPParams(object_pixels_only=True))
    method.before_step(ctx)
    assert old.calls == 4
    expected = _expected_thresholds(batches, objects_only=True)
    assert expected.min() > 0.01                          # real medians, not the floor
    assert not np.allclose(expected, every_pixel.thresholds.numpy(), atol=1e-3)
    np.testing.assert_allclose(method.thresholds.numpy(), expected, rtol=1e-5, atol=1e-6)

    state = method.state_dict()
    resumed = PLOP()
    with pytest.raises(ValueError, match="before_step"):
        resumed.pseudo_targets(batches[0], old(batches[0].pixel_values), ctx)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.thresholds, method.thresholds) and resumed.thresholds_step == 1
    resumed.pseudo_targets(batches[0], old(batches[0].pixel_values), ctx)
    # a step without entropy pseudo-labels computes nothing
    instance = PLOP()
    instance.before_step(make_ctx(1, num_old=2, num_seen=4, task="instance", old_model=old,
                                  iterate_train=lambda: pytest.fail("no pass needed for instance protocols")))
    assert instance.thresholds is None and old.calls == 6


def test_plop_histogram_fallback_is_close_to_the_exact_median():
    # dense enough that neighbouring order statistics are far closer than a bin (1 / 4096)
    n, parts = 150_000, 5
    gen = torch.Generator().manual_seed(3)
    entropy, argmax = torch.rand(n, generator=gen) ** 2, torch.randint(0, 3, (n,), generator=gen)
    exact, streamed = EntropyStatistics(3), EntropyStatistics(3, exact_max_pixels=n // 2, bins=4096)
    for chunk_e, chunk_c in zip(entropy.chunk(parts), argmax.chunk(parts)):
        exact.update(chunk_e, chunk_c)
        streamed.update(chunk_e, chunk_c)
    assert exact.exact and not streamed.exact
    torch.testing.assert_close(exact.thresholds(0.001), plop_thresholds(entropy, argmax, 3))
    torch.testing.assert_close(streamed.thresholds(0.001), exact.thresholds(0.001), rtol=0, atol=1 / 4096)


def test_plop_entropy_pseudo_labels_confident_object_pixels_only():
    # one 32x32 image, by rows: 0-15 confident class 0 on an object (m0 = 8, m1 = -8); 16-23 undecided
    # (m0 = m1 = 0, entropy 1); 24-31 confident class 0 (entropy 0.03) but no mask reaches 0.5 (m0 = -2)
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, :16], x[0, 1, :16] = 8.0, -8.0
    x[0, 0, 24:], x[0, 1, 24:] = -2.0, -8.0
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :8, :8] = True
    pixel_mask = torch.ones(1, 32, 32, dtype=torch.long)
    pixel_mask[0, :, -4:] = 0
    batch = Batch(x, pixel_mask, [Target(torch.tensor([3]), masks)], [0])
    old = TwoQueryOldModel()
    student = fake_outputs(torch.randn(1, 4, 5, requires_grad=True), torch.randn(1, 4, 8, 8, requires_grad=True))
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[:16, :28] = True                  # confident object rows, minus padding
    expected[:8, :8] = False                   # minus the ground truth
    for hp, extra_rows in ((PLOPParams(object_pixels_only=True), False), (PLOPParams(), True)):
        ctx = make_ctx(1, num_old=2, num_seen=4, crit=RecordingCriterion(criterion()), old_model=old)
        method = PLOP(hp)
        method.load_state_dict({"thresholds": [0.5, 0.5], "thresholds_step": 1})
        terms = method.loss(batch, student, old(x), ctx)
        assert set(terms) == {"ce", "mask", "dice", "pod"}
        (target,) = ctx.criterion.calls[-1]["targets"]
        assert target.labels.tolist() == [3, 0]
        wanted = expected.clone()
        wanted[24:, :28] = extra_rows
        assert torch.equal(target.masks[1], wanted)
    assert len(batch.targets[0]) == 1


def test_plop_pod_term_weight_and_features():
    ctx = make_ctx(1, num_old=2, num_seen=4)     # K_t = 4, |C_t| = 2
    old = fake_outputs(torch.randn(1, 3, 3), torch.randn(1, 3, 8, 8))
    gen = torch.Generator().manual_seed(9)
    feats = [f + 0.3 * torch.randn(f.shape, generator=gen) for f in old.backbone_features]
    mask_feats = old.mask_features + 0.3 * torch.randn(old.mask_features.shape, generator=gen)
    student = fake_outputs(torch.randn(1, 3, 5, requires_grad=True), torch.randn(1, 3, 8, 8), feats, mask_feats)
    batch = Batch(torch.zeros(1, 3, 32, 32), torch.ones(1, 32, 32, dtype=torch.long),
                  [Target(torch.tensor([2]), torch.ones(1, 32, 32, dtype=torch.bool))], [0])
    old_list = [*old.backbone_features, old.mask_features]
    new_list = [*feats, mask_feats]
    base = local_pod(old_list, new_list)
    common = dict(pseudo_labels="none", pod_weight=0.001)
    cases = {"plop": math.sqrt(4 / 2), "comformer": math.sqrt(2 / 4), "none": 1.0}
    for schedule, factor in cases.items():
        terms = PLOP(PLOPParams(pod_schedule=schedule, **common)).loss(batch, student, old, ctx)
        torch.testing.assert_close(terms["pod"], 0.001 * factor * base)
    terms = PLOP(PLOPParams(pod_mask_features=False, pod_square=False, **common)).loss(batch, student, old, ctx)
    torch.testing.assert_close(terms["pod"], 0.001 * math.sqrt(2) * local_pod(old_list[:4], new_list[:4],
                                                                              square=False))
    assert "pod" not in PLOP(PLOPParams(pseudo_labels="none", pod_weight=0.0)).loss(batch, student, old, ctx)


def test_plop_instance_protocols_use_mask_pseudo_labels():
    ctx = make_ctx(1, task="instance", crit=RecordingCriterion(criterion()))
    method = PLOP()
    method.before_step(ctx)
    method.loss(_gt_top_left(), _student_outputs(), _comformer_old_outputs(), ctx)
    assert ctx.criterion.calls[-1]["targets"][0].labels.tolist() == [12, 5]


def test_nearest_resize_matches_interpolate():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    for size in [(10, 14), (13, 9), (5, 7), (3, 3)]:
        torch.testing.assert_close(nearest_resize(x, size), F.interpolate(x, size=size, mode="nearest"))
    assert nearest_resize(torch.ones(5, 7, dtype=torch.bool), (11, 3)).dtype == torch.bool


# ---- every method on the real tiny model at step 1 -----------------------------------------------

@pytest.mark.parametrize("name,extra", [("mib", "kd"), ("plop", "pod"), ("comformer", "kd")])
def test_step1_loss_is_finite_and_backpropagates(base_model, name, extra):
    method = get_method(name, PROTOCOL.name)
    model = copy.deepcopy(base_model)
    old = model.frozen_copy()
    batches = [make_batch([[11, 12], [14]], seed=s) for s in range(2)]
    ctx = make_ctx(1, old_model=old, iterate_train=lambda: iter(batches))
    method.configure_model(model, ctx)
    method.before_step(ctx)
    batch = batches[0]
    with torch.no_grad():
        old_outputs = old(batch.pixel_values, batch.pixel_mask)
    if name == "plop":
        # POD is exactly zero while the student's features equal the teacher's (eval mode: same BN statistics)
        model.eval()
        with torch.no_grad():
            assert method.loss(batch, model(batch.pixel_values), old_outputs, ctx)["pod"].item() == 0.0
    model.train()
    outputs = model(batch.pixel_values, batch.pixel_mask)
    terms = method.loss(batch, outputs, old_outputs, ctx)
    assert set(terms) == {"ce", "mask", "dice", extra}
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    head = model.class_heads[0].weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0
    stem = next(p for n, p in model.named_parameters() if "encoder" in n and p.grad is not None)
    assert torch.isfinite(stem.grad).all() and stem.grad.abs().sum() > 0
