"""Pretrained backbone weights from local files into a SegModel's transformers backbone.

Accepted sources (nothing is ever downloaded):
* a transformers model folder (``config.json`` + safetensors/bin, e.g. ``microsoft/resnet-50`` or a
  Swin checkpoint saved with ``save_pretrained``), ResNet or Swin, with or without a classification
  head. transformers' own loader reads it, so its legacy key renames (old Swin names) apply;
* a file holding a ResNet state dict (``.pth``/``.pt``/``.bin``/``.safetensors``/``.pkl``) in one
  of three namings, recognised from the keys: torchvision (``conv1``, ``bn1``,
  ``layerX.Y.convZ``, ``downsample``), detectron2 (``stem.conv1``, ``resX.Y.convZ.norm``,
  ``shortcut``; e.g. Mask2Former's ``R-50.pkl`` = ``{"model": {name: ndarray}}`` made by
  detectron2's ``convert-torchvision-to-d2.py``) or transformers' own backbone names.
  Wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` and ``module.`` prefixes are unwrapped; in a
  full detectron2 model checkpoint only the ``backbone.`` keys are used.

Nothing is dropped silently: the returned :class:`BackboneLoadReport` lists missing, unexpected
and shape-mismatched keys, and with ``strict=True`` (default) any of them raises a ConfigError that
names them. Two kinds of keys are expected and do not fail a strict load, but are listed too:
``ignored`` (an ImageNet classifier, or the non-backbone part of a full checkpoint) and
``new_layers`` (the per-stage output norms that transformers' Swin backbone adds, which Mask2Former
also initialises fresh). ``num_batches_tracked`` counters are not required (detectron2 files have
none; frozen or eval-mode BatchNorm never reads them).

Only the torchvision ResNet v1.5 layout (stride in the 3x3 conv) exists in transformers' ResNet, as
in Mask2Former's configs (``STRIDE_IN_1X1: False``); caffe2/MSRA-style ``.pkl`` files are refused.
``.pkl`` files are read with an unpickler that only admits numpy arrays and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from benchmark.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Architecture fields that must agree between a folder's config.json and the preset's backbone.
_ARCH_FIELDS = {
    "resnet": ("embedding_size", "hidden_sizes", "depths", "layer_type", "downsample_in_first_stage",
               "downsample_in_bottleneck"),
    "swin": ("embed_dim", "depths", "num_heads", "window_size", "patch_size", "mlp_ratio"),
}
_HEAD_KEY = re.compile(r"^(classifier|fc|linear|fc1000|stem\.fc|pooler|head)(\.|$)")
_NEW_LAYER_KEY = re.compile(r"^hidden_states_norms\.")


@dataclass
class BackboneLoadReport:
    """What a backbone load did; names are the model's backbone keys unless said otherwise."""

    source: str
    format: str                                  # "hf-folder" | "torchvision" | "detectron2" | "hf-names"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)   # checkpoint names
    mismatched: list[str] = field(default_factory=list)   # "name: checkpoint shape vs model shape"
    ignored: list[str] = field(default_factory=list)      # checkpoint names (classifier, non-backbone)
    new_layers: list[str] = field(default_factory=list)   # model layers no classification checkpoint has
    config_differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.config_differences)

    def summary(self) -> str:
        lines = [f"backbone weights from {self.source} ({self.format}): {len(self.loaded)} tensors loaded"]
        for title, names in (("config differences", self.config_differences), ("missing", self.missing),
                             ("unexpected", self.unexpected), ("shape mismatch", self.mismatched),
                             ("ignored (not backbone)", self.ignored),
                             ("new layers kept at init", self.new_layers)):
            if names:
                shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def load_backbone_weights(model, path: str | Path, *, strict: bool = True) -> BackboneLoadReport:
    """Load backbone weights from ``path`` into ``model.backbone`` (a SegModel or anything with one).

    Tensors that match are copied; everything else stays at its initialisation and is reported.
    With ``strict`` a missing, unexpected or mismatched key (or a differing architecture field in
    a folder's config.json) raises ConfigError before anything is copied.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"backbone weights not found: {path}",
                        hint="pass a transformers model folder or a .pth/.pkl/.safetensors file")
    backbone = model.backbone
    kind = backbone.config.model_type
    if path.is_dir():
        report, tensors = _from_hf_folder(backbone, path)
    else:
        report, tensors = _from_file(backbone, path)
    if strict and not report.ok:
        raise ConfigError(f"backbone weights do not match the model's {kind} backbone\n{report.summary()}",
                          hint="use weights of the preset's architecture, or load with strict=False "
                               "to keep the listed tensors at their initialisation")
    backbone.load_state_dict(tensors, strict=False)
    log.log(logging.INFO if report.ok else logging.WARNING, report.summary())
    return report


# --- transformers folders ---------------------------------------------------------------------
def _from_hf_folder(backbone, path: Path) -> tuple[BackboneLoadReport, dict[str, Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DataError(f"{path} is a folder without config.json",
                        hint="pass a folder written by transformers' save_pretrained, or a weight file")
    saved = json.loads(config_file.read_text())
    expected = backbone.config
    if saved.get("model_type") != expected.model_type:
        raise ConfigError(f"{path} holds a {saved.get('model_type')!r} model but the preset's backbone is "
                          f"{expected.model_type!r}", hint="choose weights matching the model preset")
    report = BackboneLoadReport(str(path), "hf-folder")
    for name in _ARCH_FIELDS[expected.model_type]:
        if name in saved and _normalise(saved[name]) != _normalise(getattr(expected, name)):
            report.config_differences.append(f"{name}: file {saved[name]} vs preset {getattr(expected, name)}")

    with _quiet_transformers():
        loaded, info = type(backbone).from_pretrained(
            path, config=expected, output_loading_info=True, local_files_only=True,
            ignore_mismatched_sizes=True)
    state = loaded.state_dict()
    model_state = backbone.state_dict()
    # transformers lists (key, checkpoint shape, model shape) for tensors it re-initialised.
    mismatched = {key: f"{key}: {tuple(saved_shape)} vs {tuple(model_shape)}"
                  for key, saved_shape, model_shape in info.get("mismatched_keys", ())}
    for entry in sorted(info.get("unexpected_keys", ())):
        (report.ignored if _HEAD_KEY.match(entry) else report.unexpected).append(entry)
    missing = set(info.get("missing_keys", ()))
    tensors = {}
    for key in model_state:
        if key in mismatched:
            report.mismatched.append(mismatched[key])
        elif key in missing:
            _record_missing(report, key)
        else:
            tensors[key] = state[key]
            report.loaded.append(key)
    return report, tensors


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints its own load report and a progress bar; ours replaces both."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _record_missing(report: BackboneLoadReport, key: str) -> None:
    if key.endswith("num_batches_tracked"):
        return
    (report.new_layers if _NEW_LAYER_KEY.match(key) else report.missing).append(key)


# --- single files -----------------------------------------------------------------------------
def _from_file(backbone, path: Path) -> tuple[BackboneLoadReport, dict[str, Tensor]]:
    raw = _read_state(path)
    state, ignored = _unwrap(raw, path)
    naming = _naming(state, backbone)
    expected = "swin" if naming == "swin-original" else "resnet"
    if naming != "hf-names" and backbone.config.model_type != expected:
        raise ConfigError(f"{path} holds {expected} weights ({naming} names) but the preset's backbone is "
                          f"{backbone.config.model_type!r}", hint=f"choose weights of the preset's architecture")
    if naming == "swin-original":
        state, buffers = _split_swin_qkv(state)
        ignored += buffers
    rename = {"torchvision": _torchvision_to_hf, "detectron2": _detectron2_to_hf, "hf-names": _hf_to_hf,
              "swin-original": _swin_to_hf}[naming]
    report = BackboneLoadReport(str(path), naming, ignored=sorted(ignored))
    model_state = backbone.state_dict()
    tensors: dict[str, Tensor] = {}
    for name, value in state.items():
        if _HEAD_KEY.match(name):
            report.ignored.append(name)
            continue
        target = rename(name)
        if target is not None and target not in model_state and f"swin.{target}" in model_state:
            target = f"swin.{target}"        # transformers' SwinBackbone nests the encoder under ``swin.``
        if target is None or target not in model_state:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(model_state[target].shape):
            report.mismatched.append(f"{target} (from {name}): {tuple(value.shape)} vs {tuple(model_state[target].shape)}")
        else:
            tensors[target] = value
            report.loaded.append(target)
    mismatched_targets = {entry.split(" ", 1)[0] for entry in report.mismatched}
    for key in model_state:
        if key not in tensors and key not in mismatched_targets:
            _record_missing(report, key)
    report.ignored.sort()
    report.unexpected.sort()
    return report, tensors


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a detectron2 weight pickle needs: numpy arrays and plain containers."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight pickle")
        return super().find_class(module, name)


def _read_state(path: Path) -> Any:
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as handle:
                return _ArrayUnpickler(handle, encoding="latin1").load()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise DataError(f"cannot read backbone weights {path}: {error}",
                        hint="expected a torch state dict, a safetensors file or a detectron2 .pkl") from error


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """The name -> tensor dict inside a checkpoint, plus the names left out as non-backbone."""
    state = raw
    for wrapper in ("model", "state_dict", "blobs"):  # detectron2 / lightning-style / caffe2 containers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise DataError(f"{path} holds no state dict", hint="expected {name: tensor} (optionally under 'model')")
    tensors = {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, Tensor):
            tensors[name.removeprefix("module.")] = value
    ignored: list[str] = []
    if any(name.startswith("backbone.") for name in tensors):
        ignored = [name for name in tensors if not name.startswith("backbone.")]
        tensors = {name[len("backbone."):]: v for name, v in tensors.items() if name.startswith("backbone.")}
    return tensors, ignored


def _naming(state: dict[str, Tensor], backbone) -> str:
    names = list(state)
    if any("_branch2" in n or n in ("conv1_w", "res_conv1_bn_s") for n in names):
        raise ConfigError("these are caffe2/MSRA-style detectron2 weights (stride in the 1x1 conv)",
                          hint="use torchvision-converted weights (Mask2Former's configs load "
                               "detectron2://ImageNetPretrained/torchvision/R-50.pkl) or a torchvision .pth")
    if any(n.startswith("patch_embed.") for n in names) and any(".attn.qkv." in n for n in names):
        return "swin-original"
    if any(n.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for n in names):
        return "detectron2"
    if any(n.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")) for n in names):
        return "torchvision"
    return "hf-names"


_TV_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$")
_D2_STEM = re.compile(r"^stem\.conv1\.(norm\.)?(\w+)$")
_D2_BLOCK = re.compile(r"^res(\d)\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(\w+)$")
_HF_PREFIXES = ("model.pixel_level_module.encoder.", "pixel_level_module.encoder.", "resnet.")


def _torchvision_to_hf(name: str) -> str | None:
    if match := _TV_STEM.match(name):
        part = "convolution" if match[1] == "conv1" else "normalization"
        return f"embedder.embedder.{part}.{match[2]}"
    if match := _TV_BLOCK.match(name):
        stage, block, layer, tensor = int(match[1]) - 1, match[2], match[3], match[4]
        prefix = f"encoder.stages.{stage}.layers.{block}"
        if layer.startswith("downsample"):
            part = "convolution" if layer.endswith("0") else "normalization"
            return f"{prefix}.shortcut.{part}.{tensor}"
        part = "convolution" if layer.startswith("conv") else "normalization"
        return f"{prefix}.layer.{int(layer[-1]) - 1}.{part}.{tensor}"
    return None


def _detectron2_to_hf(name: str) -> str | None:
    if match := _D2_STEM.match(name):
        part = "normalization" if match[1] else "convolution"
        return f"embedder.embedder.{part}.{match[2]}"
    if match := _D2_BLOCK.match(name):
        stage, block, layer, norm, tensor = int(match[1]) - 2, match[2], match[3], match[4], match[5]
        part = "normalization" if norm else "convolution"
        prefix = f"encoder.stages.{stage}.layers.{block}"
        if layer == "shortcut":
            return f"{prefix}.shortcut.{part}.{tensor}"
        return f"{prefix}.layer.{int(layer[-1]) - 1}.{part}.{tensor}"
    return None


# The original Swin release (microsoft/Swin-Transformer ``swin_transformer.py``; the ``.pth`` files of
# github.com/SwinTransformer/storage that Mask2Former converts with convert-pretrained-swin-model-to-d2.py).
_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SWIN_BLOCK_PARTS = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.q_proj",
                     "attn.k": "attention.k_proj", "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj",
                     "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
                     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_SWIN_BUFFERS = re.compile(r"(relative_position_index|attn_mask)$")


def _split_swin_qkv(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The fused ``attn.qkv`` projection as three (rows q, k, v in that order, as the original's
    ``reshape(B, N, 3, heads, C // heads)``), and the computed buffers (relative position index, shifted
    window masks) left out: transformers computes them itself."""
    out, buffers = {}, []
    for name, value in state.items():
        if _SWIN_BUFFERS.search(name):
            buffers.append(name)
        elif ".attn.qkv." in name:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[name.replace(".attn.qkv.", f".attn.{part}.")] = chunk.contiguous()
        else:
            out[name] = value
    return out, buffers


def _swin_to_hf(name: str) -> str | None:
    if name.startswith("patch_embed.proj."):
        return "embeddings.patch_embeddings.projection." + name.rsplit(".", 1)[1]
    if name.startswith("patch_embed.norm."):
        return "embeddings.norm." + name.rsplit(".", 1)[1]
    if name.startswith("norm."):
        return "layernorm." + name.rsplit(".", 1)[1]
    if match := re.match(r"^layers\.(\d+)\.downsample\.(reduction|norm)\.(\w+)$", name):
        return f"encoder.layers.{match[1]}.downsample.{match[2]}.{match[3]}"
    if match := _SWIN_BLOCK.match(name):
        prefix, rest = f"encoder.layers.{match[1]}.blocks.{match[2]}", match[3]
        if rest in _SWIN_BLOCK_PARTS:                    # a parameter without .weight/.bias (the bias table)
            return f"{prefix}.{_SWIN_BLOCK_PARTS[rest]}"
        part, _, tensor = rest.rpartition(".")
        if part in _SWIN_BLOCK_PARTS:
            return f"{prefix}.{_SWIN_BLOCK_PARTS[part]}.{tensor}"
    return None


def _hf_to_hf(name: str) -> str:
    for prefix in _HF_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
