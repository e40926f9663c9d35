"""ECLIPSE on the shared engine: formulas with values worked out here, the frozen model bit for bit, a real run."""

import math

import pytest
import torch

from benchmark.batch import Batch, Target
from benchmark.engine.criterion import SetCriterion
from benchmark.engine.model import build_model
from methods import get_method
from methods.base import StepContext
from methods.eclipse import (copy_no_object_head, group_deltas, manipulate_logits, prompts_for,
                             trainable_modules)
from methods.losses import sigmoid_focal_class_loss
from protocols import get_protocol
from tests.test_runner import metrics, spec

PROTOCOL = get_protocol("synth-10-5")


def _logit(p):
    return math.log(p / (1 - p))


def test_logit_manipulation_on_constructed_logits():
    # 4 classes + no-object; the group owns columns 2..3.
    z = torch.tensor([[0.0, 0.0, 1.0, -1.0, 0.5]])
    own = slice(2, 4)
    positive = manipulate_logits(z, own, 0.5)
    # other classes: sigmoid(0) + sigmoid(0) = 1 -> min(1, 1) = 1 -> p = 0.5 * 1 -> logit 0
    assert positive[0, 4].item() == pytest.approx(0.0, abs=1e-6)
    assert positive[0, :2].tolist() == [-10.0, -10.0]
    assert positive[0, 2:4].tolist() == [1.0, -1.0]                       # own classes untouched
    negative = manipulate_logits(z, own, -0.5)
    sig = 1 / (1 + math.exp(-0.5))
    assert negative[0, 4].item() == pytest.approx(_logit(0.5 * sig), rel=1e-5)
    assert manipulate_logits(z, own, 0.0)[0, 4].item() == 0.5             # delta 0 keeps the learned no-object
    tiny = manipulate_logits(torch.tensor([[-20.0, -20.0, 1.0, 1.0, 3.0]]), own, 0.4)
    assert tiny[0, 4].item() == pytest.approx(_logit(0.001), rel=1e-4)    # clipped at 0.001
    capped = manipulate_logits(torch.tensor([[5.0, 5.0, 1.0, 1.0, 0.0]]), own, 0.9)
    assert capped[0, 4].item() == pytest.approx(_logit(0.9), rel=1e-5)    # min(1, ~2) = 1


def test_group_deltas_pad_and_truncate():
    assert group_deltas([0.4, 0.5], 4) == [0.4, 0.5, 0.5, 0.5]
    assert group_deltas([0.5, -0.4, -0.4], 2) == [0.5, -0.4]
    assert group_deltas([0.5], 3) == [0.5, 0.5, 0.5]


def test_sigmoid_focal_class_loss_by_hand():
    logits = torch.tensor([[[2.0, -1.0, 0.0]]])       # one query, 2 classes + no-object, target class 0
    target = torch.tensor([[0]])
    total = 0.0
    for z, y in zip([2.0, -1.0, 0.0], [1, 0, 0]):
        p = 1 / (1 + math.exp(-z))
        p_t = p if y else 1 - p
        bce = -math.log(p_t)
        total += 5 * (1 - p_t) * bce
    assert sigmoid_focal_class_loss(logits, target).item() == pytest.approx(50 * total / 3, rel=1e-5)


def test_prompts_per_setting_are_data():
    assert get_method("eclipse", "ade-pan-100-5").hparams.num_prompts == 10          # 10 prompts for 5 classes
    assert get_method("eclipse", "ade-pan-100-50").hparams.deltas == (-0.4, -0.6)
    assert get_method("eclipse", "ade-pan-50-10").hparams.base_queries == 50
    hp = get_method("eclipse", "synth-10-5").hparams
    assert prompts_for(5, hp) == 5 and hp.deltas == (0.4, 0.5)


def _model_and_method():
    torch.manual_seed(0)
    method = get_method("eclipse", PROTOCOL.name)
    model = build_model("tiny", [(10, 10)], options=method.model_options())
    return method, model


def _ctx(step, criterion):
    return StepContext(protocol=PROTOCOL, step=step, num_old=len(PROTOCOL.old(step)),
                       num_seen=len(PROTOCOL.seen(step)), task="semantic", criterion=criterion)


def _batch(step, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = list(range(len(PROTOCOL.old(step)), len(PROTOCOL.seen(step))))
    targets = [Target(torch.tensor(cols[:2]), torch.rand(2, 32, 32, generator=g) > 0.5),
               Target(torch.tensor(cols[-1:]), torch.rand(1, 32, 32, generator=g) > 0.5)]
    return Batch(torch.randn(2, 3, 32, 32, generator=g), torch.ones(2, 32, 32, dtype=torch.long), targets)


def test_new_prompt_group_is_initialised_as_the_original():
    method, model = _model_and_method()
    method.configure_model(model, _ctx(1, SetCriterion(num_points=64)))
    base_content = model.content_embedding(0).weight.mean(0)
    base_position = model.position_embeddings(0)[0].weight.mean(0)
    assert torch.equal(model.content_embedding(1).weight, base_content.expand(5, -1))
    assert len(model.position_embeddings(1)) == model.num_decoder_layers
    for embedding in model.position_embeddings(1):
        assert torch.equal(embedding.weight, base_position.expand(5, -1))
    for a, b in zip(model.mask_embedder(1).parameters(), model.mask_embedder(0).parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    x = torch.randn(3, 64)
    assert torch.allclose(model.class_heads[1](x), model.no_object_head(x).expand(3, 5), atol=1e-6)


def test_training_moves_only_the_current_prompt_group_and_inference_keeps_the_base():
    method, model = _model_and_method()
    criterion = SetCriterion(num_points=64)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        base = model(x)
    model.train()
    method.configure_model(model, _ctx(1, criterion))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {id(p) for m in trainable_modules(model, 1) for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    for i in range(3):
        batch = _batch(1, seed=i)
        outputs = model(batch.pixel_values)
        assert outputs.group_queries[0] == slice(0, 0) and outputs.group_queries[1] == slice(0, 5)
        terms = method.loss(batch, outputs, None, _ctx(1, criterion))
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    names = {name for name, p in model.named_parameters() if id(p) in trainable}
    after = model.state_dict()
    for key, value in before.items():
        if key in names:
            assert not torch.equal(value, after[key]), f"{key} did not train"
        else:
            assert torch.equal(value, after[key]), f"{key} changed but is frozen"    # BN statistics included
    model.eval()
    with torch.no_grad():
        both = model(x)
    # group-wise self-attention, frozen base: the base group predicts exactly what the step-0 model did
    assert torch.allclose(both.mask_logits(0), base.mask_logits(0), atol=1e-5)
    assert torch.allclose(both.class_logits(0)[..., :10], base.class_logits(0)[..., :10], atol=1e-5)
    probs, no_object = method.class_scores(both)
    assert probs.shape == (2, 15, 15) and no_object.shape == (2, 15)
    # each group only scores its own step's classes (-10 elsewhere)
    assert probs[:, :10, 10:].max() < 1e-4 and probs[:, 10:, :10].max() < 1e-4


def test_incremental_loss_supervises_first_and_last_prediction_sets():
    method, model = _model_and_method()
    criterion = SetCriterion(num_points=64)
    method.configure_model(model, _ctx(1, criterion))
    batch = _batch(1)
    outputs = model(batch.pixel_values)
    torch.manual_seed(1)
    got = method.loss(batch, outputs, None, _ctx(1, criterion))
    torch.manual_seed(1)
    focal = lambda logits, target: sigmoid_focal_class_loss(logits, target)
    heavy = SetCriterion(num_points=64, class_weight=10.0)
    logits = outputs.layer_class_logits_of(1)
    expected = heavy([logits[0], logits[-1]], [outputs.layer_mask_logits[0], outputs.layer_mask_logits[-1]],
                     batch.targets, class_loss=focal)
    for name in expected:
        assert torch.allclose(got[name], expected[name])
    paper = type(method)(method.hparams.with_overrides({"supervise_all_layers": True}))
    torch.manual_seed(1)
    all_layers = paper.loss(batch, outputs, None, _ctx(1, criterion))
    assert all_layers["ce"] > got["ce"]


def test_eclipse_run_trains_its_own_step0_and_keeps_frozen_weights_bit_identical(tmp_path):
    from benchmark.engine.checkpoint import load_weights
    from benchmark.runner import run_one

    run = run_one(spec("eclipse", tmp_path), show_progress=False)
    _, step0 = load_weights(run / "step_00" / "weights.pt")
    _, final = load_weights(run / "step_02" / "weights.pt")
    # everything of the step-0 model but the shared no-object head is frozen for good (BN statistics included)
    frozen = [k for k in step0 if not k.startswith("no_object_head")]
    changed = [k for k in frozen if not torch.equal(step0[k], final[k])]
    assert frozen and not changed, changed
    assert any(not torch.equal(step0[k], final[k]) for k in step0 if k.startswith("no_object_head"))
    cache = [p for p in (tmp_path / "_step0").iterdir() if p.is_dir()]
    assert len(cache) == 1 and "eclipse" in (cache[0] / "run.json").read_text()
    table = metrics(run)
    assert set(table.step) == {0, 1, 2} and table.value.notna().any()


def test_method_paper_schedules_are_the_scripts_rows():
    from benchmark.errors import ConfigError
    from benchmark.schedules import get_schedule

    eclipse = get_schedule("eclipse-paper", get_protocol("ade-pan-50-10"))
    assert (eclipse.step0.iterations, eclipse.increment.iterations, eclipse.increment.lr) == (80_000, 24_000, 5e-4)
    semantic = get_schedule("eclipse-paper", get_protocol("ade-100-5"))
    assert (semantic.increment.iterations, semantic.increment.lr, semantic.increment.batch_size) == (12_000, 1e-3, 16)
    balconpas = get_schedule("balconpas-paper", get_protocol("ade-inst-50-5"))
    assert (balconpas.step0.iterations, balconpas.increment.iterations, balconpas.increment.lr) == (160_000, 5_000, 5e-5)
    with pytest.raises(ConfigError, match="no row for voc-15-1"):
        get_schedule("eclipse-paper", get_protocol("voc-15-1"))
