"""Backbone weights from local files: torchvision .pth, detectron2 .pkl, transformers folders.

The checkpoints are built here: a torchvision-layout ResNet written out independently of the loader
(conv1/bn1/layerX.Y.convZ/downsample), its detectron2 conversion following detectron2's
``convert-torchvision-to-d2.py`` rules, and transformers models saved with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, SwinConfig, SwinForImageClassification

from benchmark.engine.backbone_weights import load_backbone_weights
from benchmark.engine.model import build_model
from benchmark.engine.presets import ResNetSpec, SwinSpec, get_preset
from benchmark.errors import ConfigError, DataError

BASIC = ResNetSpec(8, (8, 16, 32, 64), (1, 2, 1, 1), "basic")
BOTTLENECK = ResNetSpec(8, (16, 32, 64, 128), (1, 2, 1, 1), "bottleneck")
SWIN = SwinSpec(16, (1, 1, 2, 1), (1, 2, 2, 4), 4, 0.0, 64)


def _model(backbone):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_preset("tiny"), backbone=backbone), [(4, 2)]).eval()


# --- an independent torchvision-layout ResNet ------------------------------------------------------
def _bn(channels):
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():  # non-trivial statistics so a wrong BN mapping shows in the features
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 1.5)
    return norm


class _Block(nn.Module):
    def __init__(self, cin, cout, stride, bottleneck):
        super().__init__()
        if bottleneck:  # torchvision v1.5: the stride sits in the 3x3 conv2
            mid = cout // 4
            self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
            self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), _bn(mid)
            self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
            self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        else:
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout)
            self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        out = x
        for index, (conv, norm) in enumerate(self.convs):
            out = norm(conv(out))
            if index < len(self.convs) - 1:
                out = out.relu()
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


class TorchvisionStyleResNet(nn.Module):
    def __init__(self, spec: ResNetSpec):
        super().__init__()
        bottleneck = spec.layer_type == "bottleneck"
        self.conv1 = nn.Conv2d(3, spec.embedding_size, 7, 2, 3, bias=False)
        self.bn1 = _bn(spec.embedding_size)
        cin = spec.embedding_size
        for stage, (cout, depth) in enumerate(zip(spec.hidden_sizes, spec.depths)):
            blocks = [_Block(cin if b == 0 else cout, cout, 2 if stage and b == 0 else 1, bottleneck)
                      for b in range(depth)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, 10)

    def stages(self, x):
        x = nn.functional.max_pool2d(self.bn1(self.conv1(x)).relu(), 3, 2, 1)
        outs = []
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
            outs.append(x)
        return outs


def _detectron2_names(state):
    """detectron2's convert-torchvision-to-d2.py renaming."""
    converted = {}
    for key, value in state.items():
        if "layer" not in key:
            key = "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        converted[key] = value.numpy()
    return converted


def _assert_same_features(model, reference):
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.backbone(pixels).feature_maps
        theirs = reference.eval().stages(pixels)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- torchvision and detectron2 files ----------------------------------------------------------------
@pytest.mark.parametrize("spec", [BASIC, BOTTLENECK], ids=["basic", "bottleneck"])
def test_torchvision_pth_maps_onto_the_transformers_resnet(tmp_path, spec):
    torch.manual_seed(1)
    reference = TorchvisionStyleResNet(spec)
    path = tmp_path / "resnet.pth"
    torch.save(reference.state_dict(), path)
    model = _model(spec)
    report = load_backbone_weights(model, path)
    assert report.format == "torchvision" and report.ok
    assert report.ignored == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len([k for k in model.backbone.state_dict()])
    _assert_same_features(model, reference)


@pytest.mark.parametrize("spec", [BASIC, BOTTLENECK], ids=["basic", "bottleneck"])
def test_detectron2_pkl_maps_onto_the_transformers_resnet(tmp_path, spec):
    torch.manual_seed(2)
    reference = TorchvisionStyleResNet(spec)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "R-tiny.pkl"
    with path.open("wb") as handle:
        pickle.dump({"model": _detectron2_names(state), "__author__": "torchvision",
                     "matching_heuristics": True}, handle)
    model = _model(spec)
    report = load_backbone_weights(model, path)
    assert report.format == "detectron2" and report.ok and not report.missing
    assert report.ignored == ["stem.fc.bias", "stem.fc.weight"]
    _assert_same_features(model, reference)


def test_full_detectron2_checkpoint_uses_only_backbone_keys(tmp_path):
    reference = TorchvisionStyleResNet(BASIC)
    state = {f"backbone.{k}": torch.from_numpy(v) for k, v in _detectron2_names(reference.state_dict()).items()
             if "fc" not in k}
    state["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(3, 4)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 10}, path)
    model = _model(BASIC)
    report = load_backbone_weights(model, path)
    assert report.ok and report.ignored == ["sem_seg_head.predictor.query_feat.weight"]
    _assert_same_features(model, reference)


def test_missing_and_unexpected_keys_are_reported_never_dropped(tmp_path):
    reference = TorchvisionStyleResNet(BASIC)
    state = reference.state_dict()
    del state["layer2.1.conv2.weight"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = _model(BASIC)
    target = model.backbone.encoder.stages[1].layers[1].layer[1].convolution.weight
    kept = target.detach().clone()

    with pytest.raises(ConfigError) as error:
        load_backbone_weights(model, path)
    message = str(error.value)
    assert "encoder.stages.1.layers.1.layer.1.convolution.weight" in message and "layer9.0.conv1.weight" in message
    assert torch.equal(model.backbone.embedder.embedder.convolution.weight,
                       _model(BASIC).backbone.embedder.embedder.convolution.weight)  # nothing copied

    report = load_backbone_weights(model, path, strict=False)
    assert report.missing == ["encoder.stages.1.layers.1.layer.1.convolution.weight"]
    assert report.unexpected == ["layer9.0.conv1.weight"]
    assert torch.equal(target, kept)
    assert torch.equal(model.backbone.embedder.embedder.convolution.weight, state["conv1.weight"])


def test_shape_mismatch_is_reported(tmp_path):
    torch.save(TorchvisionStyleResNet(BASIC).state_dict(), tmp_path / "basic.pth")
    wider = dataclasses.replace(BASIC, hidden_sizes=(8, 16, 32, 128))
    with pytest.raises(ConfigError) as error:
        load_backbone_weights(_model(wider), tmp_path / "basic.pth")
    assert "encoder.stages.3.layers.0.layer.0.convolution.weight" in str(error.value)
    report = load_backbone_weights(_model(wider), tmp_path / "basic.pth", strict=False)
    assert any("(64, 32, 3, 3) vs (128, 32, 3, 3)" in entry for entry in report.mismatched)


def test_unsafe_pickles_and_bad_paths_are_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Exploit()}}))
    with pytest.raises(DataError, match="refusing"):
        load_backbone_weights(_model(BASIC), path)
    with pytest.raises(DataError):
        load_backbone_weights(_model(BASIC), tmp_path / "absent.pth")
    caffe2 = tmp_path / "R-50-msra.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": {"res2_0_branch2a_w": torch.zeros(1).numpy()}}))
    with pytest.raises(ConfigError, match="caffe2"):
        load_backbone_weights(_model(BASIC), caffe2)


# --- transformers folders -----------------------------------------------------------------------
def test_hf_resnet_classification_folder(tmp_path):
    torch.manual_seed(4)
    source = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64],
                                                       depths=[1, 2, 1, 1], layer_type="basic", num_labels=3))
    source.save_pretrained(tmp_path)
    model = _model(BASIC)
    report = load_backbone_weights(model, tmp_path)
    assert report.ok and report.format == "hf-folder"
    assert report.ignored == ["classifier.1.bias", "classifier.1.weight"]
    expected = source.resnet.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_hf_swin_folder_reports_new_output_norms(tmp_path):
    torch.manual_seed(5)
    config = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, image_size=64,
                        num_labels=3)
    source = SwinForImageClassification(config)
    source.save_pretrained(tmp_path)
    model = _model(SWIN)
    norms_before = model.backbone.hidden_states_norms.stage1.weight.detach().clone()
    report = load_backbone_weights(model, tmp_path)
    assert report.ok and report.ignored == ["classifier.bias", "classifier.weight"]
    assert sorted(report.new_layers) == sorted(f"hidden_states_norms.stage{i}.{p}"
                                               for i in range(1, 5) for p in ("weight", "bias"))
    expected = source.state_dict()
    for key, value in model.backbone.state_dict().items():
        if key.startswith("swin."):
            assert torch.equal(value, expected[key]), key
    assert torch.equal(model.backbone.hidden_states_norms.stage1.weight, norms_before)


def test_hf_folder_of_another_architecture_is_refused(tmp_path):
    SwinForImageClassification(SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                                          window_size=4, image_size=64)).save_pretrained(tmp_path / "swin")
    with pytest.raises(ConfigError, match="'swin' model"):
        load_backbone_weights(_model(BASIC), tmp_path / "swin")
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64],
                                              depths=[1, 1, 1, 1], layer_type="basic")).save_pretrained(tmp_path / "r")
    with pytest.raises(ConfigError, match="depths"):
        load_backbone_weights(_model(BASIC), tmp_path / "r")
    report = load_backbone_weights(_model(BASIC), tmp_path / "r", strict=False)
    assert report.config_differences and report.missing  # stage 2's second block is not in the file
