"""The engine's model: presets, exactness against stock transformers, heads, query groups, freezing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import Mask2FormerForUniversalSegmentation

from benchmark.engine.model import ModelSpec, build_model
from benchmark.engine.position_cache import CachedSinePositions
from benchmark.engine.presets import ModelPreset, available_presets, get_preset
from benchmark.errors import ConfigError

IMAGE = (2, 3, 64, 64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(*IMAGE, generator=torch.Generator().manual_seed(seed))


# --- presets ------------------------------------------------------------------------------------
def test_presets_follow_mask2former_and_build_without_download():
    assert set(available_presets()) == {"tiny", "mid", "r50", "r101", "swin-t", "swin-b"}
    for name in ("r50", "r101", "swin-t", "swin-b"):
        config = get_preset(name).mask2former_config()
        assert (config.hidden_dim, config.num_queries, config.encoder_layers, config.decoder_layers) == (256, 100, 6, 10)
        assert config.train_num_points == 12544 and config.dim_feedforward == 2048
    assert get_preset("r101").backbone.depths == (3, 4, 23, 3)
    assert get_preset("swin-b").mask2former_config().backbone_config.window_size == 12
    assert get_preset("r50").freeze_backbone_norm and not get_preset("swin-t").freeze_backbone_norm
    tiny = get_preset("tiny")
    assert tiny.train_num_points < 12544 and tiny.hidden_dim == 64 and tiny.num_queries == 10
    # transformers counts prediction sets: decoder_layers=4 means 3 masked-attention layers + 1.
    model = build_model("tiny", [(5, 2)])
    assert len(model.model.transformer_module.decoder.layers) == tiny.decoder_layers - 1
    for name in available_presets():
        preset = get_preset(name)
        assert ModelPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_unknown_preset_suggests_nearest_names():
    with pytest.raises(ConfigError) as error:
        get_preset("swin_t")
    assert "swin-t" in str(error.value)


def test_invalid_layouts_are_config_errors():
    for layout in ([], [(0, 3)], [(4, 2, 1)]):
        with pytest.raises(ConfigError):
            build_model("tiny", layout)


# --- exactness against stock transformers -------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_single_group_forward_reproduces_stock_mask2former(training):
    model = build_model("tiny", [(50, 7)])
    stock = Mask2FormerForUniversalSegmentation(model.preset.mask2former_config(num_queries=50, num_labels=7))
    model.load_stock_state_dict(stock.state_dict())
    model.train(training)
    stock.train(training)
    pixels = _pixels()
    out = model(pixels)
    ref = stock(pixels, output_auxiliary_logits=True, output_hidden_states=True)

    assert out.num_layers == model.preset.decoder_layers == len(ref.auxiliary_logits) + 1
    assert torch.equal(out.class_logits(), ref.class_queries_logits)
    assert torch.equal(out.mask_logits(), ref.masks_queries_logits)
    for layer, aux in enumerate(ref.auxiliary_logits):
        assert torch.equal(out.class_logits(layer=layer), aux["class_queries_logits"])
        assert torch.equal(out.mask_logits(layer=layer), aux["masks_queries_logits"])
    for ours, theirs in zip(out.layer_query_states, ref.transformer_decoder_hidden_states, strict=True):
        assert torch.equal(ours, theirs.transpose(0, 1))
    assert torch.equal(out.mask_features, ref.pixel_decoder_last_hidden_state)
    for ours, theirs in zip(out.backbone_features, ref.encoder_hidden_states, strict=True):
        assert torch.equal(ours, theirs)


def test_position_tables_are_cached_per_shape_and_mode_with_stock_values():
    model = build_model("tiny", [(10, 5)])
    tables = model.model.pixel_level_module.decoder.position_embedding
    assert isinstance(tables, CachedSinePositions)
    assert isinstance(model.model.transformer_module.position_embedder, CachedSinePositions)
    shape = torch.Size((2, 64, 8, 8))
    first = tables(shape, "cpu", torch.float32)
    assert torch.equal(first, tables.stock(shape, "cpu", torch.float32))
    assert tables(shape, torch.device("cpu"), torch.float32) is first
    assert tables(torch.Size((1, 64, 8, 8)), "cpu", torch.float32) is not first
    # An evaluation's tables are inference tensors: a training step must not be handed them.
    with torch.inference_mode():
        assert tables(shape, "cpu", torch.float32).is_inference()
    assert not tables(shape, "cpu", torch.float32).is_inference()
    model.eval()
    with torch.inference_mode():
        model(_pixels())
    model.train()
    model(_pixels()).mask_logits().sum().backward()
    # No parameters or buffers: checkpoints keep the stock keys.
    stock = Mask2FormerForUniversalSegmentation(model.preset.mask2former_config(num_queries=10, num_labels=5))
    assert set(model.model.state_dict()) == set(stock.model.state_dict())


def test_forward_shapes_and_no_hooks_left():
    model = build_model("tiny", [(6, 3), (4, 2)])
    out = model(_pixels())
    assert [tuple(t.shape) for t in out.layer_class_logits[-1]] == [(2, 6, 4), (2, 4, 3)]
    assert all(len(layer) == 2 for layer in out.layer_class_logits)
    assert tuple(out.mask_logits().shape) == (2, 10, 16, 16)
    assert tuple(out.mask_logits(group=1).shape) == (2, 4, 16, 16)
    assert tuple(out.query_states().shape) == (2, 10, 64)
    assert len(out.layer_query_states) == model.preset.decoder_layers
    assert [f.shape[-1] for f in out.backbone_features] == [16, 8, 4, 2]
    assert tuple(out.mask_features.shape) == (2, 64, 16, 16)
    assert out.group_queries == (slice(0, 6), slice(6, 10))
    assert out.group_columns == (slice(0, 3), slice(3, 5)) and out.num_columns == 5
    assert tuple(out.class_probs().shape) == (2, 10, 5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- heads --------------------------------------------------------------------------------------
def test_grow_head_keeps_old_logits_bit_identical_and_calls_init_hook():
    model = build_model("tiny", [(8, 3)]).eval()
    pixels = _pixels()
    before = model(pixels)
    calls = []

    def init(head, num_old):
        calls.append((head.out_features, num_old, torch.is_grad_enabled()))
        head.weight[num_old:-1] = head.weight[-1]
        head.bias[num_old:-1] = 7.0

    model.grow_head(5, init=init)
    after = model(pixels)
    assert calls == [(6, 3, False)]
    assert model.layout == ((8, 5),) and after.group_columns == (slice(0, 5),)
    for layer in range(before.num_layers):
        old, new = before.class_logits(layer=layer), after.class_logits(layer=layer)
        assert torch.equal(new[..., :3], old[..., :3])
        # The no-object row moves to the last column, where the BLAS kernel may round differently.
        torch.testing.assert_close(new[..., -1], old[..., -1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(new[..., 3], old[..., -1] + 7.0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(new[..., 4], old[..., -1] + 7.0, rtol=1e-6, atol=1e-6)
        assert torch.equal(after.mask_logits(layer=layer), before.mask_logits(layer=layer))
    model.grow_head(5, init=init)  # already that size: nothing happens
    assert len(calls) == 1
    with pytest.raises(ConfigError):
        model.grow_head(4)


def test_grow_head_only_grows_the_last_group():
    model = build_model("tiny", [(4, 2), (3, 1)])
    first = model.class_heads[0]
    model.grow_head(3)
    assert model.class_heads[0] is first
    assert model.layout == ((4, 2), (3, 3))


# --- query groups -------------------------------------------------------------------------------
def _perturb_group(model, group):
    with torch.no_grad():
        model.group_query_features[group - 1].weight.add_(1.0)
        model.group_query_positions[group - 1].weight.mul_(-1.0)


def test_group_attention_mask_makes_groups_independent():
    masked = build_model("tiny", [(6, 3), (4, 2)], group_attention_mask=True).eval()
    full = build_model("tiny", [(6, 3), (4, 2)]).eval()
    full.load_state_dict(masked.state_dict())
    pixels = _pixels()
    masked_before, full_before = masked(pixels), full(pixels)
    # The mask changes outputs only when enabled.
    assert not torch.allclose(masked_before.class_logits(0), full_before.class_logits(0))

    _perturb_group(masked, 1)
    _perturb_group(full, 1)
    masked_after, full_after = masked(pixels), full(pixels)
    for layer in range(masked_before.num_layers):
        assert torch.equal(masked_after.class_logits(0, layer), masked_before.class_logits(0, layer))
        assert torch.equal(masked_after.mask_logits(0, layer), masked_before.mask_logits(0, layer))
    assert not torch.allclose(masked_after.class_logits(1), masked_before.class_logits(1))
    assert not torch.allclose(full_after.class_logits(0), full_before.class_logits(0))


def test_masked_group_equals_a_stock_single_group_model():
    """With the mask, group 0 computes what a stock model holding only group 0 computes."""
    grouped = build_model("tiny", [(6, 3), (4, 2)], group_attention_mask=True)
    alone = build_model("tiny", [(6, 3)])
    alone.load_state_dict({k: v for k, v in grouped.state_dict().items()
                           if not k.startswith(("group_query_", "class_heads.1."))})
    for training in (False, True):
        grouped.train(training)
        alone.train(training)
        pixels = _pixels(training + 2)
        g, a = grouped(pixels), alone(pixels)
        for layer in range(g.num_layers):
            torch.testing.assert_close(g.class_logits(0, layer), a.class_logits(0, layer), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g.mask_logits(0, layer), a.mask_logits(0, layer), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g.query_states(0, layer), a.query_states(0, layer), rtol=1e-5, atol=1e-5)


def test_add_group_keeps_earlier_groups_outputs_shapes_and_returns_index():
    model = build_model("tiny", [(6, 3)])
    assert model.add_group(4, 2) == 1 and model.add_group(2, 1) == 2
    assert model.layout == ((6, 3), (4, 2), (2, 1))
    assert model.num_queries == 12 and model.num_columns == 6
    out = model(_pixels())
    assert [t.shape[1:] for t in out.layer_class_logits[0]] == [(6, 4), (4, 3), (2, 2)]


def test_add_group_draws_its_queries_in_the_historical_order():
    """A new group's queries are the 3rd (content) and 4th (position) N(0, 1) draws after the call: both
    embeddings are built (two default draws) before either is re-drawn. Every CisDQ result before ECLIPSE's
    engine features was made with this order; another order changes CisDQ's new groups and its numbers."""
    model = build_model("tiny", [(6, 3)])
    hidden = model.config.hidden_dim
    torch.manual_seed(7)
    draws = [torch.randn(4, hidden) for _ in range(4)]
    torch.manual_seed(7)
    model.add_group(4, 2)
    assert torch.equal(model.group_query_features[0].weight, draws[2])
    assert torch.equal(model.group_query_positions[0].weight, draws[3])


# --- freezing and optimisation -------------------------------------------------------------------
def _toy_loss(out):
    return sum(t.square().mean() for layer in out.layer_class_logits for t in layer) + \
        sum(m.sigmoid().mean() for m in out.layer_mask_logits)


def test_frozen_content_queries_stay_while_the_rest_moves():
    model = build_model("tiny", [(6, 3), (4, 2)])
    model.freeze_content_queries([0])
    frozen = model.content_query_parameters(0)[0]
    tracked = {
        "frozen": frozen,
        "new content": model.content_query_parameters(1)[0],
        "old positions": model.model.transformer_module.queries_embedder.weight,
        "old head": model.class_heads[0].weight,
        "backbone": model.backbone.embedder.embedder.convolution.weight,
    }
    start = {name: p.detach().clone() for name, p in tracked.items()}
    groups = model.param_groups(lr=1e-3)
    assert all(p is not frozen for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups)
    pixels = _pixels()
    for _ in range(3):
        optimizer.zero_grad()
        _toy_loss(model(pixels)).backward()
        optimizer.step()
    assert torch.equal(frozen, start["frozen"]) and frozen.grad is None
    for name in ("new content", "old positions", "old head", "backbone"):
        assert not torch.equal(tracked[name], start[name]), name


def test_param_groups_follow_mask2former_optimizer():
    model = build_model("tiny", [(6, 3)])
    groups = {g["name"]: g for g in model.param_groups(lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1)}
    assert set(groups) == {"backbone", "backbone_no_decay", "model", "model_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["model"]["lr"] == 1e-4 and groups["model_no_decay"]["weight_decay"] == 0.0

    def group_of(parameter):
        return next(name for name, g in groups.items() if any(p is parameter for p in g["params"]))

    tm = model.model.transformer_module
    assert group_of(model.backbone.embedder.embedder.convolution.weight) == "backbone"
    assert group_of(model.backbone.embedder.embedder.normalization.weight) == "backbone_no_decay"
    assert group_of(tm.queries_features.weight) == "model_no_decay"
    assert group_of(tm.decoder.layernorm.weight) == "model_no_decay"
    assert group_of(model.class_heads[0].weight) == "model"
    assert group_of(model.class_heads[0].bias) == "model"  # Mask2Former keeps decay on biases
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_backbone_norm_preset_keeps_batchnorm_statistics():
    preset = dataclasses.replace(get_preset("tiny"), freeze_backbone_norm=True)
    model = build_model(preset, [(6, 3)]).train()
    norm = model.backbone.embedder.embedder.normalization
    assert not norm.training and not norm.weight.requires_grad
    assert model.model.transformer_module.decoder.layernorm.training
    stats = norm.running_mean.clone()
    model(_pixels())
    assert torch.equal(norm.running_mean, stats)
    names = {g["name"] for g in model.param_groups(lr=1e-4)}
    assert all(p is not norm.weight for g in model.param_groups(lr=1e-4) for p in g["params"])
    assert "backbone" in names


def test_frozen_copy_is_an_independent_eval_model_without_gradients():
    model = build_model("tiny", [(6, 3)]).train()
    old = model.frozen_copy()
    assert not old.training and not any(p.requires_grad for p in old.parameters())
    assert model.training
    pixels = _pixels()
    reference = model.eval()(pixels).class_logits()
    with torch.no_grad():
        model.class_heads[0].bias.add_(1.0)
    # Without gradients torch may take MultiheadAttention's fused path: equal up to rounding.
    torch.testing.assert_close(old(pixels).class_logits(), reference, rtol=1e-5, atol=1e-5)


# --- rebuilding ---------------------------------------------------------------------------------
def test_build_and_load_round_trip_restores_the_model_exactly():
    model = build_model("tiny", [(6, 3)], group_attention_mask=True)
    model.grow_head(5)
    model.add_group(4, 2)
    model.eval()
    spec = ModelSpec.from_dict(json.loads(json.dumps(model.spec.to_dict())))
    assert spec == model.spec
    rebuilt = spec.build().eval()
    pixels = _pixels()
    assert not torch.equal(rebuilt(pixels).class_logits(0), model(pixels).class_logits(0))
    rebuilt.load_state_dict(model.state_dict())
    a, b = model(pixels), rebuilt(pixels)
    assert rebuilt.layout == ((6, 5), (4, 2)) and rebuilt.group_attention_mask
    for layer in range(a.num_layers):
        for group in range(2):
            assert torch.equal(a.class_logits(group, layer), b.class_logits(group, layer))
        assert torch.equal(a.mask_logits(layer=layer), b.mask_logits(layer=layer))
