"""Model presets: named Mask2Former sizes built from transformers configs, never downloaded.

Paper presets (``r50``, ``r101``, ``swin-t``, ``swin-b``) follow Mask2Former's detectron2 configs
(Cheng et al., CVPR 2022; ``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml`` and
the Swin variants): hidden 256, 100 queries, 6 deformable pixel-decoder encoder layers (feed-forward
1024), ``DEC_LAYERS`` 10 (transformers counts the same way: 9 masked-attention layers plus the
prediction from the learnable queries, 10 prediction sets), 8 heads, decoder feed-forward 2048 and
12544 loss points. ResNets use FrozenBN as Mask2Former's ``RESNETS.NORM: "FrozenBN"``; Swin uses
drop-path 0.3 (``SWIN.DROP_PATH_RATE``), Swin-B the 384-pretraining window 12.

CPU presets (``tiny``, ``mid``) are ours, sized by the measurements in engine.md so the embedded
benchmark runs in minutes on 2 cores. The loss dominates small models, so they sample fewer points
(engine.md measured 1024 points cutting the forward+loss from 0.144 s to 0.038 s; tiny now takes 256,
the 16x16 mask-logit pixels of its 64-px crops; mid: 3136, a quarter of the paper's 12544). They train from scratch, so their BatchNorm is trainable.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from transformers import Mask2FormerConfig, ResNetConfig, SwinConfig

from benchmark.errors import ConfigError

STAGES = ("stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class ResNetSpec:
    """A transformers ResNet backbone (torchvision v1.5 layout: the stride sits in the 3x3 conv)."""

    embedding_size: int
    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    layer_type: str  # "basic" | "bottleneck"

    kind = "resnet"

    def to_config(self) -> ResNetConfig:
        return ResNetConfig(
            embedding_size=self.embedding_size,
            hidden_sizes=list(self.hidden_sizes),
            depths=list(self.depths),
            layer_type=self.layer_type,
            out_features=list(STAGES),
        )


@dataclass(frozen=True)
class SwinSpec:
    """A transformers Swin backbone; ``image_size`` is the pretraining size (for weight files)."""

    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_size: int
    drop_path_rate: float
    image_size: int

    kind = "swin"

    def to_config(self) -> SwinConfig:
        return SwinConfig(
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            drop_path_rate=self.drop_path_rate,
            image_size=self.image_size,
            out_features=list(STAGES),
        )


BackboneSpec = ResNetSpec | SwinSpec


@dataclass(frozen=True)
class ModelPreset:
    """One model size. ``decoder_layers`` counts prediction sets as transformers does (layers + 1)."""

    name: str
    backbone: BackboneSpec
    hidden_dim: int
    num_queries: int
    encoder_layers: int
    decoder_layers: int
    num_attention_heads: int
    dim_feedforward: int
    encoder_feedforward_dim: int
    train_num_points: int
    freeze_backbone_norm: bool
    description: str = ""
    # Paper presets are only meaningful from ImageNet weights (FrozenBN keeps random statistics otherwise:
    # CisDQ's backbone POD term reached 16,459 against a set loss of ~25 in such a run). The runner refuses
    # them without --backbone-weights unless ``from_scratch`` (--set model.from_scratch=true) says it is meant.
    pretrained: bool = False
    from_scratch: bool = False
    # A preset that trains its backbone BatchNorm from scratch in step 0 (``freeze_backbone_norm`` False) may
    # freeze it from step 1 on (statistics and affine, as FrozenBN): the increments then run in the regime of
    # the paper presets, whose FrozenBN never moves, instead of re-estimating the base model's statistics from
    # each step's few new-class images. Measured for the tiny preset on synth-10-5, seeds 0-2, 2026-12-06: PLOP base
    # 64.3 +- 11.3 and CisDQ's new classes 7.7 (37 without), so every preset keeps it off (README, "Calibration").
    freeze_backbone_norm_after_step0: bool = False

    def mask2former_config(self, num_queries: int | None = None, num_labels: int = 1) -> Mask2FormerConfig:
        """The transformers config; ``num_queries`` sizes the stock (group-0) query embeddings."""
        with quiet_backbone_warning():
            return Mask2FormerConfig(
                backbone_config=self.backbone.to_config(),
                feature_size=self.hidden_dim,
                mask_feature_size=self.hidden_dim,
                hidden_dim=self.hidden_dim,
                num_queries=self.num_queries if num_queries is None else num_queries,
                encoder_layers=self.encoder_layers,
                decoder_layers=self.decoder_layers,
                num_attention_heads=self.num_attention_heads,
                dim_feedforward=self.dim_feedforward,
                encoder_feedforward_dim=self.encoder_feedforward_dim,
                train_num_points=self.train_num_points,
                num_labels=num_labels,
                use_pretrained_backbone=False,
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backbone"] = {"kind": self.backbone.kind, **asdict(self.backbone)}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelPreset":
        """Inverse of :meth:`to_dict` (JSON lists become tuples again)."""
        fields = dict(data)
        backbone = dict(fields.pop("backbone"))
        kind = backbone.pop("kind")
        spec_cls = {"resnet": ResNetSpec, "swin": SwinSpec}.get(kind)
        if spec_cls is None:
            raise ConfigError(f"unknown backbone kind {kind!r} in a saved model preset",
                              hint="expected 'resnet' or 'swin'; the file may come from a newer version")
        backbone = {k: tuple(v) if isinstance(v, list) else v for k, v in backbone.items()}
        return cls(backbone=spec_cls(**backbone), **fields)


@contextlib.contextmanager
def quiet_backbone_warning() -> Iterator[None]:
    """transformers warns that only Swin is a 'supported' Mask2Former backbone; its ResNet works.

    The level is restored afterwards so nothing else in the process changes.
    """
    logger = logging.getLogger("transformers.models.mask2former.configuration_mask2former")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _paper(name: str, backbone: BackboneSpec, description: str) -> ModelPreset:
    return ModelPreset(
        name=name, backbone=backbone, hidden_dim=256, num_queries=100, encoder_layers=6,
        decoder_layers=10, num_attention_heads=8, dim_feedforward=2048, encoder_feedforward_dim=1024,
        train_num_points=12544, freeze_backbone_norm=backbone.kind == "resnet", description=description,
        pretrained=True,
    )


_PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="tiny",
            backbone=ResNetSpec(32, (32, 64, 128, 256), (1, 1, 1, 1), "basic"),
            # Calibrated on the 2-core CPU (issue 9), joint training on synth-10-5, 900 iterations:
            # 10 queries and 3 prediction sets reached 68.0 mIoU at 0.19 s/it vs 65.7 at 0.21 s/it with
            # 20 queries and 4 sets (50 queries learned slower still: 7 vs 15 mIoU after 450 iterations);
            # 10 queries also make CisDQ's group 0 (one query per base class) the same model.
            # 256 points = the 16x16 mask-logit pixels of a 64-px crop.
            hidden_dim=64, num_queries=10, encoder_layers=2, decoder_layers=3, num_attention_heads=4,
            dim_feedforward=256, encoder_feedforward_dim=256, train_num_points=256,
            freeze_backbone_norm=False,
            description="CPU default: ResNet basic 32-256, hidden 64, 10 queries, 2 enc / 3 dec",
        ),
        ModelPreset(
            name="mid",
            backbone=ResNetSpec(64, (64, 128, 256, 512), (2, 2, 2, 2), "basic"),
            hidden_dim=128, num_queries=100, encoder_layers=3, decoder_layers=6, num_attention_heads=8,
            dim_feedforward=1024, encoder_feedforward_dim=512, train_num_points=3136,
            freeze_backbone_norm=False,
            description="ResNet-18-like, hidden 128, 100 queries, 3 enc / 6 dec",
        ),
        _paper("r50", ResNetSpec(64, (256, 512, 1024, 2048), (3, 4, 6, 3), "bottleneck"),
               "Mask2Former R50 (FrozenBN)"),
        _paper("r101", ResNetSpec(64, (256, 512, 1024, 2048), (3, 4, 23, 3), "bottleneck"),
               "Mask2Former R101 (FrozenBN)"),
        _paper("swin-t", SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 0.3, 224),
               "Mask2Former Swin-T (224 pretraining, window 7)"),
        _paper("swin-b", SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 0.3, 384),
               "Mask2Former Swin-B (384 pretraining, window 12)"),
    )
}

DEFAULT_PRESET = "tiny"


def available_presets() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; an unknown name raises ConfigError suggesting the nearest ones."""
    preset = _PRESETS.get(name)
    if preset is None:
        close = difflib.get_close_matches(name, _PRESETS, n=3, cutoff=0.3)
        suggestion = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown model preset {name!r}",
                          hint=f"{suggestion}available presets: {', '.join(_PRESETS)}")
    return preset
