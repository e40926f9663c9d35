"""Pretrained backbones by name: `prepare weights NAME` downloads (file:// here), checks, converts once;
`--backbone-weights NAME` finds the result; paper presets refuse to start without weights.

The checkpoints are written by the test in the sources' own formats (torchvision's ResNet names, the
original Swin release's names with fused qkv), renamed from transformers' names by hand here, so the
conversion is checked against an independent inverse.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoBackbone

from benchmark.data.weights import prepare_weights, resolve_backbone_weights
from benchmark.engine.presets import get_preset
from benchmark.errors import ConfigError, DataError
from benchmark.runner import RunSpec, resolve

ROOT = Path(__file__).resolve().parents[1]


def backbone(preset):
    torch.manual_seed(0)
    return AutoBackbone.from_config(get_preset(preset).backbone.to_config())


def torchvision_names(state):
    out = {}
    for key, value in state.items():
        key = key.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        if m := re.match(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(.*)", key):
            rest = m[3].replace("shortcut.convolution", "downsample.0").replace("shortcut.normalization", "downsample.1")
            rest = re.sub(r"layer\.(\d)\.convolution", lambda x: f"conv{int(x[1]) + 1}", rest)
            rest = re.sub(r"layer\.(\d)\.normalization", lambda x: f"bn{int(x[1]) + 1}", rest)
            key = f"layer{int(m[1]) + 1}.{m[2]}.{rest}"
        out[key] = value.clone()
    out["fc.weight"], out["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return out


def swin_original_names(state):
    out = {}
    for key, value in state.items():
        if key.startswith("hidden_states_norms"):
            continue                         # Mask2Former's per-stage norms: not in a classification checkpoint
        key = key.removeprefix("swin.").replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        key = key.replace("embeddings.norm", "patch_embed.norm").replace("encoder.layers", "layers")
        key = key.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
        key = key.replace("attention.o_proj", "attn.proj").replace(
            "attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table")
        key = "norm." + key.split(".")[-1] if key.startswith("layernorm.") else key
        out[key] = value.clone()
    for key in [k for k in out if ".attention.q_proj." in k]:
        fused = [out.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[key.replace(".attention.q_proj.", ".attn.qkv.")] = torch.cat(fused)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    out["head.weight"], out["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    return {"model": out}


def write_source(tmp_path, name, preset, payload, sha256):
    archive = tmp_path / "server" / f"{name}.pth"
    archive.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    sources = tmp_path / "weights.json"
    entries = json.loads(sources.read_text()) if sources.exists() else {}
    entries[name] = {"preset": preset, "file": archive.name, "url": archive.as_uri(),
                     "sha256": {"prefix": digest[:8], "none": None, "wrong": "deadbeef"}[sha256]}
    sources.write_text(json.dumps(entries))
    return sources, digest


def test_resnet50_from_torchvision_names_with_checksum_prefix(tmp_path, monkeypatch):
    model = backbone("r50")
    sources, digest = write_source(tmp_path, "r50", "r50", torchvision_names(model.state_dict()), "prefix")
    lines = []
    path = prepare_weights("r50", tmp_path / "weights", sources_path=sources, progress=False, out=lines.append)
    converted = load_file(str(path))
    expected = model.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], v) for k, v in expected.items())
    record = json.loads((tmp_path / "weights" / "r50.json").read_text())
    assert record["sha256"] == digest and record["format"] == "torchvision" and "fc.weight" in record["ignored"]
    assert not (tmp_path / "weights" / "downloads" / "r50.pth").exists()          # the download is dropped
    # a second call finds it converted
    assert prepare_weights("r50", tmp_path / "weights", sources_path=sources, progress=False, out=lines.append) == path
    assert lines[-1].startswith("r50: ok at")
    # the run finds it by name, records the path, and the refusal of a weightless paper preset is lifted
    monkeypatch.setenv("CISDQ_BENCH_WEIGHTS", str(tmp_path / "weights"))
    assert resolve_backbone_weights("r50", "r50") == str(path)
    r = resolve(RunSpec(method="finetune", protocol="ade-100-50", engine="r50", schedule="paper",
                        data_root=str(tmp_path), out=str(tmp_path), backbone_weights="r50"))
    assert r.config["backbone_weights"] == str(path)


def test_swin_from_the_original_release_without_published_checksum(tmp_path):
    model = backbone("swin-t")
    sources, digest = write_source(tmp_path, "swin-t", "swin-t", swin_original_names(model.state_dict()), "none")
    lines = []
    path = prepare_weights("swin-t", tmp_path / "w", sources_path=sources, progress=False, out=lines.append)
    assert any(digest in line for line in lines)          # no published checksum: the sha256 is printed
    converted = load_file(str(path))
    state = model.state_dict()
    assert converted and all(torch.equal(converted[k], state[k]) for k in converted)
    assert set(state) - set(converted) == {k for k in state if k.startswith("hidden_states_norms")}


def test_checksum_mismatch_is_refused_and_nothing_converted(tmp_path):
    sources, _ = write_source(tmp_path, "r50", "r50", torchvision_names(backbone("r50").state_dict()), "wrong")
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare_weights("r50", tmp_path / "w", sources_path=sources, progress=False, out=lambda _: None)
    assert not (tmp_path / "w" / "r50.safetensors").exists()


def test_paper_presets_without_weights_are_refused_unless_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("CISDQ_BENCH_WEIGHTS", str(tmp_path / "empty"))
    spec = dict(method="finetune", protocol="ade-100-50", schedule="paper", data_root=str(tmp_path), out=str(tmp_path))
    for preset in ("r50", "r101", "swin-t", "swin-b"):
        with pytest.raises(ConfigError, match="ImageNet weights") as err:
            resolve(RunSpec(engine=preset, **spec))
        assert f"prepare weights {preset}" in err.value.hint and "model.from_scratch=true" in err.value.hint
    resolve(RunSpec(engine="r50", overrides=(("model", (("from_scratch", "true"),)),), **spec))
    resolve(RunSpec(engine="tiny", **spec))                     # CPU presets train from scratch by design
    with pytest.raises(ConfigError, match="prepare weights r101"):
        resolve(RunSpec(engine="r101", backbone_weights="r101", **spec))       # named but not prepared
    with pytest.raises(ConfigError, match="preset is r101"):
        resolve(RunSpec(engine="r101", backbone_weights="r50", **spec))


def test_cli_refusal_and_prepare_help(tmp_path):
    res = subprocess.run([sys.executable, "run_benchmark.py", "--protocol", "ade-100-50", "--engine", "swin-b",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "CISDQ_BENCH_WEIGHTS": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "prepare weights swin-b" in res.stderr and "--set model.from_scratch=true" in res.stderr
    res = subprocess.run([sys.executable, "-m", "benchmark.data.prepare", "weights", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "r50 | r101 | swin-t | swin-b" in res.stdout
