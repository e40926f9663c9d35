"""SegModel: transformers' Mask2Former with query groups and growable class heads.

The model owns the stock ``Mask2FormerModel`` (backbone, deformable pixel decoder, masked-attention
transformer decoder, with their stock initialisation) and re-composes only the short
``Mask2FormerTransformerModule.forward`` so that any concatenation of query groups can be fed to the
stock decoder. A single-group model therefore computes exactly what
``Mask2FormerForUniversalSegmentation`` computes (tests/test_engine_model.py guards this against
transformers upgrades).

Query groups (CisDQ, Wu et al., TCSVT 2023; reference/cisdq-original-code.md section 1): group g has
its own content queries, positional queries and class head ``[C_g classes | own no-object]``; group
0's queries are the stock ``queries_features`` / ``queries_embedder`` and its head is the stock
``class_predictor``. All groups run together through the decoder (queries concatenated in group
order) with full self-attention, as the original ``cisdq`` decoder does; ``group_attention_mask=True``
makes the self-attention block-diagonal over groups (the original's built-but-unused ``incre_mask``).
Masked cross-attention works per query over all groups exactly as stock.

Decisions where the spec is silent:
* ``pixel_mask`` is accepted and ignored, like transformers' Mask2FormerModel (its pixel decoder
  uses all-false padding masks).
* Presets with ``freeze_backbone_norm`` (the ResNet paper presets) keep the backbone BatchNorms in
  eval mode with frozen affine parameters, as Mask2Former's ``RESNETS.NORM: "FrozenBN"``.
* ``param_groups`` follows Mask2Former's ``train_net.py::build_optimizer``: backbone lr x
  multiplier; no weight decay on norm layers, embeddings (``WEIGHT_DECAY_NORM`` /
  ``WEIGHT_DECAY_EMBED`` = 0) and Swin's relative/absolute position tables; biases keep weight decay
  as in that code. Parameters are merged into at most four groups so AdamW's foreach path stays fast.
* New class rows and new groups' heads are initialised like the stock ``class_predictor``
  (normal, std ``init_std`` = 0.02, zero bias); new query embeddings like the stock ones (N(0, 1)).
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers import Mask2FormerModel

from benchmark.engine.outputs import ModelOutputs
from benchmark.engine.presets import ModelPreset, quiet_backbone_warning, get_preset
from benchmark.errors import ConfigError

Layout = tuple[tuple[int, int], ...]
HeadInit = Callable[[nn.Linear, int], None]

BACKBONE_PREFIX = "model.pixel_level_module.encoder."
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
# Swin's position tables (Mask2Former's build_optimizer exempts them from weight decay by name).
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "position_embeddings")


def _validate_layout(layout: Iterable[Sequence[int]]) -> Layout:
    groups = tuple(tuple(group) for group in layout)
    if not groups:
        raise ConfigError("a model needs at least one query group",
                          hint="pass layout=[(num_queries, num_columns)]")
    for index, group in enumerate(groups):
        if len(group) != 2 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in group):
            raise ConfigError(f"query group {index} is {group!r}",
                              hint="each group is (num_queries, num_columns) with positive integers")
    return tuple((int(q), int(c)) for q, c in groups)


class SegModel(nn.Module):
    """Mask2Former with query groups; ``forward`` returns :class:`ModelOutputs`. Build with :func:`build_model`."""

    def __init__(self, preset: ModelPreset, layout: Iterable[Sequence[int]], *,
                 group_attention_mask: bool = False):
        super().__init__()
        groups = _validate_layout(layout)
        self.preset = preset
        self.group_attention_mask = group_attention_mask
        self.config = preset.mask2former_config(num_queries=groups[0][0])
        with quiet_backbone_warning():
            self.model = Mask2FormerModel(self.config)
        self.class_heads = nn.ModuleList([self._new_head(groups[0][1])])
        self.group_query_features = nn.ModuleList()   # content queries of groups 1..G-1
        self.group_query_positions = nn.ModuleList()  # positional queries of groups 1..G-1
        self._refresh_slices()
        for num_queries, num_columns in groups[1:]:
            self.add_group(num_queries, num_columns)
        if preset.freeze_backbone_norm:
            for module in self._backbone_norms():
                module.requires_grad_(False)
            self.train(self.training)

    # --- structure ------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.pixel_level_module.encoder

    @property
    def layout(self) -> Layout:
        """(num_queries, num_columns) per query group, in query order."""
        queries = [self.model.transformer_module.queries_features.num_embeddings]
        queries += [embedding.num_embeddings for embedding in self.group_query_features]
        return tuple((q, head.out_features - 1) for q, head in zip(queries, self.class_heads))

    @property
    def num_groups(self) -> int:
        return len(self.class_heads)

    @property
    def num_columns(self) -> int:
        return self._group_columns[-1].stop

    @property
    def num_queries(self) -> int:
        return self._group_queries[-1].stop

    @property
    def spec(self) -> "ModelSpec":
        """What :func:`build_model` needs to rebuild this model before ``load_state_dict``."""
        return ModelSpec(self.preset, self.layout, self.group_attention_mask)

    def _refresh_slices(self) -> None:
        queries, columns, q0, c0 = [], [], 0, 0
        for num_queries, num_columns in self.layout:
            queries.append(slice(q0, q0 + num_queries))
            columns.append(slice(c0, c0 + num_columns))
            q0, c0 = q0 + num_queries, c0 + num_columns
        self._group_queries = tuple(queries)
        self._group_columns = tuple(columns)

    def _new_head(self, num_columns: int) -> nn.Linear:
        head = nn.Linear(self.config.hidden_dim, num_columns + 1)
        nn.init.normal_(head.weight, std=self.config.init_std)
        nn.init.zeros_(head.bias)
        return head

    def _like_heads(self, module: nn.Module) -> nn.Module:
        reference = self.class_heads[0].weight
        return module.to(device=reference.device, dtype=reference.dtype)

    def _content_embedding(self, group: int) -> nn.Embedding:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"query group {group} does not exist (the model has {self.num_groups})")
        if group == 0:
            return self.model.transformer_module.queries_features
        return self.group_query_features[group - 1]

    def grow_head(self, num_columns: int, init: HeadInit | None = None) -> None:
        """Grow the last group's head to ``num_columns`` classes (+ no-object, kept last).

        Old rows are copied, so old class logits are bit-identical; the no-object row moves to the
        new last column, where the matrix-multiply kernel may round its logit differently (equal to
        about 1e-7 relative; a BLAS property, not a copy error). ``init(head, num_old)`` is the
        method hook that initialises rows ``num_old .. num_columns - 1`` (and may touch the
        no-object row, as MiB does); it runs under ``torch.no_grad()``. No-op if already that size.
        """
        old = self.class_heads[-1]
        num_old = old.out_features - 1
        if num_columns == num_old:
            return
        if num_columns < num_old:
            raise ConfigError(f"cannot shrink the class head of query group {self.num_groups - 1} "
                              f"from {num_old} to {num_columns} columns",
                              hint="a step's seen classes include every earlier class; check the protocol")
        new = self._like_heads(self._new_head(num_columns))
        with torch.no_grad():
            new.weight[:num_old] = old.weight[:num_old]
            new.bias[:num_old] = old.bias[:num_old]
            new.weight[-1] = old.weight[-1]
            new.bias[-1] = old.bias[-1]
            if init is not None:
                init(new, num_old)
        new.requires_grad_(old.weight.requires_grad)
        self.class_heads[-1] = new
        self._refresh_slices()

    def add_group(self, num_queries: int, num_columns: int) -> int:
        """Append a query group with its own content/positional queries and head; returns its index."""
        _validate_layout([(num_queries, num_columns)])
        hidden = self.config.hidden_dim
        content, position = nn.Embedding(num_queries, hidden), nn.Embedding(num_queries, hidden)
        nn.init.normal_(content.weight)
        nn.init.normal_(position.weight)
        self.group_query_features.append(self._like_heads(content))
        self.group_query_positions.append(self._like_heads(position))
        self.class_heads.append(self._like_heads(self._new_head(num_columns)))
        self._refresh_slices()
        return self.num_groups - 1

    # --- training helpers -----------------------------------------------------------------------
    def content_query_parameters(self, group: int) -> list[nn.Parameter]:
        """The learnable content queries of one group (CisDQ freezes those of old groups)."""
        return [self._content_embedding(group).weight]

    def freeze_content_queries(self, groups: Iterable[int]) -> None:
        for group in groups:
            for parameter in self.content_query_parameters(group):
                parameter.requires_grad_(False)

    def param_groups(self, lr: float, weight_decay: float = 0.05,
                     backbone_multiplier: float = 0.1) -> list[dict[str, Any]]:
        """AdamW parameter groups as Mask2Former's ``build_optimizer`` (see the module docstring).

        Only parameters with ``requires_grad``; each group carries a ``name`` for logs.
        """
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            backbone = f"{module_name}.".startswith(BACKBONE_PREFIX)
            for name, parameter in module.named_parameters(recurse=False):
                if not parameter.requires_grad or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                no_decay = (isinstance(module, (*_NORM_TYPES, nn.Embedding))
                            or any(key in name for key in _NO_DECAY_NAMES))
                buckets.setdefault((backbone, no_decay), []).append(parameter)
        groups = []
        for backbone in (True, False):
            for no_decay in (False, True):
                params = buckets.get((backbone, no_decay))
                if params:
                    groups.append({
                        "name": ("backbone" if backbone else "model") + ("_no_decay" if no_decay else ""),
                        "params": params,
                        "lr": lr * (backbone_multiplier if backbone else 1.0),
                        "weight_decay": 0.0 if no_decay else weight_decay,
                    })
        return groups

    def frozen_copy(self) -> "SegModel":
        """A deep copy in eval mode without gradients: the old model for distillation."""
        old = copy.deepcopy(self)
        old.eval()
        for parameter in old.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        return old

    def _backbone_norms(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "SegModel":
        super().train(mode)
        if self.preset.freeze_backbone_norm:
            for module in self._backbone_norms():
                module.eval()
        return self

    def load_stock_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load weights of transformers' ``Mask2FormerForUniversalSegmentation`` (single-group model).

        ``class_predictor`` becomes group 0's head; the loss's ``criterion.empty_weight`` buffer is
        not a weight and is skipped.
        """
        mapped = {}
        for key, value in state_dict.items():
            if key.startswith("criterion."):
                continue
            if key.startswith("class_predictor."):
                key = "class_heads.0." + key[len("class_predictor."):]
            mapped[key] = value
        return self.load_state_dict(mapped, strict=strict)

    # --- forward --------------------------------------------------------------------------------
    def _queries(self) -> tuple[Tensor, Tensor]:
        module = self.model.transformer_module
        if not self.group_query_features:
            return module.queries_features.weight, module.queries_embedder.weight
        content = torch.cat([module.queries_features.weight,
                             *(e.weight for e in self.group_query_features)])
        position = torch.cat([module.queries_embedder.weight,
                              *(e.weight for e in self.group_query_positions)])
        return content, position

    def _self_attention_mask(self, batch_size: int, like: Tensor) -> Tensor:
        """Additive block-diagonal mask [B * heads, Q, Q]: queries attend only within their group."""
        num_queries = self.num_queries
        mask = torch.full((num_queries, num_queries), float("-inf"), device=like.device, dtype=like.dtype)
        for group in self._group_queries:
            mask[group, group] = 0.0
        heads = self.config.num_attention_heads
        return mask.expand(batch_size * heads, num_queries, num_queries)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> ModelOutputs:
        pixel_level = self.model.pixel_level_module
        backbone_features = pixel_level.encoder(pixel_values).feature_maps
        pixel_decoder = pixel_level.decoder(backbone_features, output_hidden_states=False)
        mask_features = pixel_decoder.mask_features

        # Mask2FormerTransformerModule.forward, re-composed to feed the concatenated query groups.
        module = self.model.transformer_module
        features, positions, sizes = [], [], []
        for level in range(module.num_feature_levels):
            feature = pixel_decoder.multi_scale_features[level]
            sizes.append(feature.shape[-2:])
            position = module.position_embedder(feature.shape, feature.device, feature.dtype, None).flatten(2)
            positions.append(position.permute(2, 0, 1))
            projected = (module.input_projections[level](feature).flatten(2)
                         + module.level_embed.weight[level][None, :, None])
            features.append(projected.permute(2, 0, 1))
        batch_size = features[0].shape[1]
        content, position = self._queries()
        query_features = content.unsqueeze(1).repeat(1, batch_size, 1)
        query_positions = position.unsqueeze(1).repeat(1, batch_size, 1)

        if self.group_attention_mask and self.num_groups > 1:
            self_mask = self._self_attention_mask(batch_size, query_features)
            normed, masks, states = _decode_with_self_mask(
                module.decoder, query_features, query_positions, features, positions, mask_features, sizes,
                self_mask)
        else:
            decoded = module.decoder(
                inputs_embeds=query_features,
                multi_stage_positional_embeddings=positions,
                pixel_embeddings=mask_features,
                encoder_hidden_states=features,
                query_position_embeddings=query_positions,
                feature_size_list=sizes,
                output_hidden_states=True,
                output_attentions=False,
                return_dict=True,
            )
            normed, masks, states = (decoded.intermediate_hidden_states, decoded.masks_queries_logits,
                                     decoded.hidden_states)

        layer_class_logits = []
        for layer_states in normed:
            layer_states = layer_states.transpose(0, 1)
            layer_class_logits.append(tuple(head(layer_states[:, group])
                                            for head, group in zip(self.class_heads, self._group_queries)))
        return ModelOutputs(
            layer_class_logits=layer_class_logits,
            layer_mask_logits=list(masks),
            layer_query_states=[s.transpose(0, 1) for s in states],
            backbone_features=tuple(backbone_features),
            mask_features=mask_features,
            group_queries=self._group_queries,
            group_columns=self._group_columns,
        )


def _decode_with_self_mask(decoder, query_features, query_positions, features, positions, mask_features,
                           sizes, self_mask):
    """``Mask2FormerMaskedAttentionDecoder.forward`` with a self-attention mask.

    The stock decoder layer passes ``attention_mask=None`` to its self-attention, so the layer is
    re-composed here (post-norm, as every preset; dropout 0 means no layer-drop). Returns the
    layer-normed states, mask logits and raw states per prediction, as the stock decoder does.
    """
    levels = decoder.num_feature_levels
    hidden = query_features
    normed = decoder.layernorm(hidden)
    mask, attention_mask = decoder.mask_predictor(normed, mask_features, sizes[0])
    all_normed, all_masks, all_states = [normed], [mask], [hidden]
    for index, layer in enumerate(decoder.layers):
        where = (attention_mask.sum(-1) != attention_mask.shape[-1]).to(attention_mask.dtype)
        attention_mask = attention_mask * where.unsqueeze(-1)
        hidden = _decoder_layer(layer, hidden, index % levels, positions, query_positions, features,
                                attention_mask, self_mask)
        normed = decoder.layernorm(hidden)
        mask, attention_mask = decoder.mask_predictor(normed, mask_features, sizes[(index + 1) % levels])
        all_normed.append(normed)
        all_masks.append(mask)
        all_states.append(hidden)
    return all_normed, all_masks, all_states


def _decoder_layer(layer, hidden, level, positions, query_positions, features, cross_mask, self_mask):
    """``Mask2FormerMaskedAttentionDecoderLayer.forward_post`` with ``self_mask`` in self-attention."""
    dropout = nn.functional.dropout
    residual = hidden
    hidden, _ = layer.cross_attn(
        query=layer.with_pos_embed(hidden, query_positions),
        key=layer.with_pos_embed(features[level], positions[level]),
        value=features[level],
        attn_mask=cross_mask,
        key_padding_mask=None,
    )
    hidden = dropout(hidden, p=layer.dropout, training=layer.training)
    hidden = layer.cross_attn_layer_norm(residual + hidden)

    residual = hidden
    hidden, _ = layer.self_attn(hidden_states=hidden, position_embeddings=query_positions,
                                attention_mask=self_mask)
    hidden = dropout(hidden, p=layer.dropout, training=layer.training)
    hidden = layer.self_attn_layer_norm(residual + hidden)

    residual = hidden
    hidden = layer.activation_fn(layer.fc1(hidden))
    hidden = dropout(hidden, p=layer.activation_dropout, training=layer.training)
    hidden = layer.fc2(hidden)
    hidden = dropout(hidden, p=layer.dropout, training=layer.training)
    return layer.final_layer_norm(residual + hidden)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a SegModel's structure (then ``load_state_dict`` restores it)."""

    preset: ModelPreset
    layout: Layout
    group_attention_mask: bool = False

    def build(self) -> SegModel:
        return SegModel(self.preset, self.layout, group_attention_mask=self.group_attention_mask)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset.to_dict(), "layout": [list(g) for g in self.layout],
                "group_attention_mask": self.group_attention_mask}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(ModelPreset.from_dict(data["preset"]), _validate_layout(data["layout"]),
                   bool(data.get("group_attention_mask", False)))


def build_model(preset: str | ModelPreset, layout: Iterable[Sequence[int]], *,
                group_attention_mask: bool = False) -> SegModel:
    """A randomly initialised SegModel; ``layout`` is (num_queries, num_columns) per query group.

    Group 0's query count comes from ``layout`` (``preset.num_queries`` is the default a method
    uses when it builds the layout).
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    return SegModel(preset, layout, group_attention_mask=group_attention_mask)
