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

Structural options a method chooses (:class:`ModelOptions`; the runner builds every model of a run with
the method's options, so a saved layout plus the options rebuild it):
* ``layer_positions``: groups 1.. carry one positional embedding per decoder layer (ECLIPSE's deep prompts,
  ``PROMPT_DEEP``; reference/eclipse-balconpas-original-code.md A1); group 0 keeps the stock single one.
* ``group_mask_embedders``: groups 1.. carry their own copy of the mask MLP (``PROMPT_MASK_MLP``, A1), used for
  their masks at every level, the attention masks included.
* ``classifier="step_mlp"``: ECLIPSE's ``IncrementalClassifier`` with ``DEEP_CLS`` (A1): one 3-layer MLP block
  per step (``class_heads[g]``, no no-object row) plus one shared no-object MLP (``no_object_head``), all
  evaluated on every query: every group's logits are ``[all seen columns | no-object]``.
``train_groups`` (not structural) restricts a training forward to some groups (ECLIPSE decodes only the current
prompt group at t > 0, A4); in eval mode every group is decoded. ``freeze_norm_statistics`` keeps every
BatchNorm in eval mode while training (a frozen base model must not drift through its running statistics).
Any of these (or more than one active group with ``group_attention_mask``) runs the re-composed decoder
loop; without them the stock decoder runs, so the other methods' numbers are unchanged.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers import Mask2FormerModel
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMLPPredictionHead

from benchmark.engine.outputs import ModelOutputs
from benchmark.engine.position_cache import cache_position_embeddings
from benchmark.engine.presets import ModelPreset, quiet_backbone_warning, get_preset
from benchmark.errors import ConfigError

Layout = tuple[tuple[int, int], ...]
HeadInit = Callable[[nn.Linear, int], None]

BACKBONE_PREFIX = "model.pixel_level_module.encoder."
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
# Swin's position tables (Mask2Former's build_optimizer exempts them from weight decay by name).
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "position_embeddings")


CLASSIFIERS = ("group", "step_mlp")


@dataclass(frozen=True)
class ModelOptions:
    """Structural options of a SegModel (see the module docstring); ``Method.model_options`` chooses them."""

    group_attention_mask: bool = False
    layer_positions: bool = False
    group_mask_embedders: bool = False
    classifier: str = "group"

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"unknown classifier {self.classifier!r}", hint=f"use one of {', '.join(CLASSIFIERS)}")


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


def _head_columns(head: nn.Module) -> int:
    """Class columns of a head: a Linear group head ends with its own no-object row, an MLP step block does not."""
    if isinstance(head, nn.Linear):
        return head.out_features - 1
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features


class SegModel(nn.Module):
    """Mask2Former with query groups; ``forward`` returns :class:`ModelOutputs`. Build with :func:`build_model`."""

    def __init__(self, preset: ModelPreset, layout: Iterable[Sequence[int]], *,
                 group_attention_mask: bool = False, options: ModelOptions | None = None):
        super().__init__()
        groups = _validate_layout(layout)
        options = options or ModelOptions(group_attention_mask=group_attention_mask)
        self.preset = preset
        self.options = options
        self.group_attention_mask = group_attention_mask or options.group_attention_mask
        self.train_groups: tuple[int, ...] | None = None
        self._freeze_norm_statistics = False
        self._frozen_backbone_norm = False
        self.config = preset.mask2former_config(num_queries=groups[0][0])
        with quiet_backbone_warning():
            self.model = Mask2FormerModel(self.config)
        cache_position_embeddings(self.model)
        if options.classifier == "step_mlp":
            self.no_object_head = self._mlp(1)
        self.class_heads = nn.ModuleList([self._new_head(groups[0][1])])
        self.group_query_features = nn.ModuleList()   # content queries of groups 1..G-1
        self.group_query_positions = nn.ModuleList()  # positional queries of groups 1..G-1 (per layer: a list)
        self.group_mask_embedders = nn.ModuleList()   # mask MLPs of groups 1..G-1 (group_mask_embedders)
        self._refresh_slices()
        for num_queries, num_columns in groups[1:]:
            self.add_group(num_queries, num_columns)
        if preset.freeze_backbone_norm:
            self.freeze_backbone_norm()

    # --- structure ------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.pixel_level_module.encoder

    @property
    def layout(self) -> Layout:
        """(num_queries, num_columns) per query group, in query order."""
        queries = [self.model.transformer_module.queries_features.num_embeddings]
        queries += [embedding.num_embeddings for embedding in self.group_query_features]
        return tuple((q, _head_columns(head)) for q, head in zip(queries, self.class_heads))

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
        return ModelSpec(self.preset, self.layout, self.group_attention_mask, self.options)

    def _refresh_slices(self) -> None:
        queries, columns, q0, c0 = [], [], 0, 0
        for num_queries, num_columns in self.layout:
            queries.append(slice(q0, q0 + num_queries))
            columns.append(slice(c0, c0 + num_columns))
            q0, c0 = q0 + num_queries, c0 + num_columns
        self._group_queries = tuple(queries)
        self._group_columns = tuple(columns)

    def _mlp(self, out_dim: int) -> nn.Module:
        """A 3-layer MLP 256 -> 256 -> 256 -> out (ReLU between), PyTorch's default init (ECLIPSE's MLP)."""
        hidden = self.config.hidden_dim
        return Mask2FormerMLPPredictionHead(hidden, hidden, out_dim)

    def _new_head(self, num_columns: int) -> nn.Module:
        if self.options.classifier == "step_mlp":
            return self._mlp(num_columns)
        head = nn.Linear(self.config.hidden_dim, num_columns + 1)
        nn.init.normal_(head.weight, std=self.config.init_std)
        nn.init.zeros_(head.bias)
        return head

    def _like_heads(self, module: nn.Module) -> nn.Module:
        reference = next(self.class_heads[0].parameters())
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
        if self.options.classifier != "group":
            raise ConfigError("grow_head needs the per-group Linear classifier",
                              hint="a step_mlp classifier grows by add_group (one block per step)")
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
        # Both embeddings are built before either is re-drawn: the order of the random draws that fixed every
        # earlier run's initial queries (CisDQ's new groups), kept so their results stay bit-identical.
        content = nn.Embedding(num_queries, hidden)
        positions = [nn.Embedding(num_queries, hidden)
                     for _ in range(self.num_decoder_layers if self.options.layer_positions else 1)]
        nn.init.normal_(content.weight)
        for position in positions:
            nn.init.normal_(position.weight)
        self.group_query_features.append(self._like_heads(content))
        self.group_query_positions.append(self._like_heads(
            nn.ModuleList(positions) if self.options.layer_positions else positions[0]))
        if self.options.group_mask_embedders:
            stock = self.model.transformer_module.decoder.mask_predictor.mask_embedder
            self.group_mask_embedders.append(self._like_heads(copy.deepcopy(stock)))
        self.class_heads.append(self._like_heads(self._new_head(num_columns)))
        self._refresh_slices()
        return self.num_groups - 1

    @property
    def freeze_norm_statistics(self) -> bool:
        """Every BatchNorm stays in eval mode (running statistics used and kept) while the model trains."""
        return self._freeze_norm_statistics

    @freeze_norm_statistics.setter
    def freeze_norm_statistics(self, value: bool) -> None:
        self._freeze_norm_statistics = bool(value)
        self.train(self.training)

    @property
    def num_decoder_layers(self) -> int:
        """Decoder layers (prediction sets minus one: level 0 predicts before any layer)."""
        return len(self.model.transformer_module.decoder.layers)

    def content_embedding(self, group: int) -> nn.Embedding:
        """The content (``query_feat``) embedding of one group."""
        return self._content_embedding(group)

    def position_embeddings(self, group: int) -> list[nn.Embedding]:
        """The positional embedding(s) of one group: one per decoder layer with ``layer_positions`` (groups 1..)."""
        if group == 0:
            return [self.model.transformer_module.queries_embedder]
        entry = self.group_query_positions[group - 1]
        return list(entry) if isinstance(entry, nn.ModuleList) else [entry]

    def mask_embedder(self, group: int) -> nn.Module:
        """The mask MLP a group's masks come from (the stock one unless ``group_mask_embedders``)."""
        if group > 0 and self.options.group_mask_embedders:
            return self.group_mask_embedders[group - 1]
        return self.model.transformer_module.decoder.mask_predictor.mask_embedder

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

    def freeze_backbone_norm(self) -> None:
        """From now on the backbone BatchNorms act as FrozenBN: running statistics used and kept, affine frozen."""
        self._frozen_backbone_norm = True
        for module in self._backbone_norms():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegModel":
        super().train(mode)
        if self._frozen_backbone_norm:
            for module in self._backbone_norms():
                module.eval()
        if self._freeze_norm_statistics:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
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
    def _active_groups(self) -> tuple[int, ...]:
        """The groups a forward decodes: ``train_groups`` while training, every group in eval mode."""
        if self.training and self.train_groups is not None:
            groups = tuple(sorted(set(int(g) for g in self.train_groups)))
            if not groups or groups[0] < 0 or groups[-1] >= self.num_groups:
                raise ValueError(f"train_groups {self.train_groups} must name groups 0..{self.num_groups - 1}")
            return groups
        return tuple(range(self.num_groups))

    def _queries(self, groups: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """Content [Q, D] and per-decoder-layer positional [Q, D] queries of ``groups``, concatenated."""
        content = [self._content_embedding(g).weight for g in groups]
        per_layer = []
        for layer in range(self.num_decoder_layers):
            rows = []
            for g in groups:
                embeddings = self.position_embeddings(g)
                rows.append(embeddings[layer if len(embeddings) > 1 else 0].weight)
            per_layer.append(rows[0] if len(rows) == 1 else torch.cat(rows))
        return (content[0] if len(content) == 1 else torch.cat(content)), per_layer

    def _self_attention_mask(self, slices: Sequence[slice], batch_size: int, like: Tensor) -> Tensor:
        """Additive block-diagonal mask [B * heads, Q, Q]: queries attend only within their group."""
        num_queries = max(s.stop for s in slices)
        mask = torch.full((num_queries, num_queries), float("-inf"), device=like.device, dtype=like.dtype)
        for group in slices:
            mask[group, group] = 0.0
        heads = self.config.num_attention_heads
        return mask.expand(batch_size * heads, num_queries, num_queries)

    def _class_logits(self, states: Tensor, group: int) -> Tensor:
        """[B, Q_g, width] logits of one group's query states: its own head, or every step block + no-object."""
        if self.options.classifier == "step_mlp":
            return torch.cat([head(states) for head in self.class_heads] + [self.no_object_head(states)], dim=-1)
        return self.class_heads[group](states)

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
        groups = self._active_groups()
        slices, q0 = [], 0
        for g in groups:
            size = self._group_queries[g].stop - self._group_queries[g].start
            slices.append(slice(q0, q0 + size))
            q0 += size
        content, layer_positions = self._queries(groups)
        query_features = content.unsqueeze(1).repeat(1, batch_size, 1)
        layer_positions = [p.unsqueeze(1).repeat(1, batch_size, 1) for p in layer_positions]

        several = len(groups) > 1
        recompose = (len(groups) != self.num_groups or (several and (
            self.group_attention_mask or self.options.layer_positions or self.options.group_mask_embedders)))
        if recompose:
            self_mask = (self._self_attention_mask(slices, batch_size, query_features)
                         if several and self.group_attention_mask else None)
            predict = module.decoder.mask_predictor
            if self.options.group_mask_embedders and any(g > 0 for g in groups):
                predict = _GroupedMaskPredictor(predict, [self.mask_embedder(g) for g in groups], slices)
            normed, masks, states = _decode(module.decoder, query_features, layer_positions, features, positions,
                                            mask_features, sizes, self_mask, predict)
        else:
            decoded = module.decoder(
                inputs_embeds=query_features,
                multi_stage_positional_embeddings=positions,
                pixel_embeddings=mask_features,
                encoder_hidden_states=features,
                query_position_embeddings=layer_positions[0],
                feature_size_list=sizes,
                output_hidden_states=True,
                output_attentions=False,
                return_dict=True,
            )
            normed, masks, states = (decoded.intermediate_hidden_states, decoded.masks_queries_logits,
                                     decoded.hidden_states)

        # Inactive groups get empty query slices (and [B, 0, width] logits), so group indices stay global.
        group_queries = [slice(0, 0)] * self.num_groups
        for g, where in zip(groups, slices):
            group_queries[g] = where
        layer_class_logits = []
        for layer_states in normed:
            layer_states = layer_states.transpose(0, 1)
            layer_class_logits.append(tuple(self._class_logits(layer_states[:, where], g)
                                            for g, where in enumerate(group_queries)))
        columns = self._group_columns
        if self.options.classifier == "step_mlp":
            columns = tuple(slice(0, self.num_columns) for _ in columns)
        return ModelOutputs(
            layer_class_logits=layer_class_logits,
            layer_mask_logits=list(masks),
            layer_query_states=[s.transpose(0, 1) for s in states],
            backbone_features=tuple(backbone_features),
            mask_features=mask_features,
            group_queries=tuple(group_queries),
            group_columns=columns,
            own_columns=self._group_columns,
        )


class _GroupedMaskPredictor(nn.Module):
    """``Mask2FormerMaskPredictor.forward`` with one mask MLP per query group (ECLIPSE's prompt mask MLPs).

    Each group's mask embeddings come from its own MLP; the dot product with the pixel embeddings and the
    binarised attention mask for the next layer are the stock ones.
    """

    def __init__(self, stock: nn.Module, embedders: Sequence[nn.Module], slices: Sequence[slice]):
        super().__init__()
        self.num_heads = stock.num_heads
        self.embedders = list(embedders)
        self.slices = list(slices)

    def forward(self, outputs: Tensor, pixel_embeddings: Tensor, attention_mask_target_size=None):
        states = outputs.transpose(0, 1)
        embeddings = torch.cat([mlp(states[:, where]) for mlp, where in zip(self.embedders, self.slices)], dim=1)
        outputs_mask = torch.einsum("bqc, bchw -> bqhw", embeddings, pixel_embeddings)
        attention_mask = nn.functional.interpolate(outputs_mask, size=attention_mask_target_size, mode="bilinear",
                                                   align_corners=False)
        attention_mask = attention_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1)
        attention_mask = (attention_mask.flatten(0, 1) < 0.5).bool().detach()
        return outputs_mask, attention_mask


def _decode(decoder, query_features, layer_positions, features, positions, mask_features, sizes, self_mask,
            predict_masks):
    """``Mask2FormerMaskedAttentionDecoder.forward`` re-composed: a self-attention mask (or None), one
    positional query tensor per decoder layer, and a mask predictor (the stock one or a grouped one).

    The stock decoder layer passes ``attention_mask=None`` to its self-attention, so the layer is
    re-composed here (post-norm, as every preset; dropout 0 means no layer-drop). Returns the
    layer-normed states, mask logits and raw states per prediction, as the stock decoder does.
    """
    levels = decoder.num_feature_levels
    hidden = query_features
    normed = decoder.layernorm(hidden)
    mask, attention_mask = predict_masks(normed, mask_features, sizes[0])
    all_normed, all_masks, all_states = [normed], [mask], [hidden]
    for index, layer in enumerate(decoder.layers):
        where = (attention_mask.sum(-1) != attention_mask.shape[-1]).to(attention_mask.dtype)
        attention_mask = attention_mask * where.unsqueeze(-1)
        hidden = _decoder_layer(layer, hidden, index % levels, positions, layer_positions[index], features,
                                attention_mask, self_mask)
        normed = decoder.layernorm(hidden)
        mask, attention_mask = predict_masks(normed, mask_features, sizes[(index + 1) % levels])
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
    options: ModelOptions = ModelOptions()

    def build(self) -> SegModel:
        return SegModel(self.preset, self.layout, group_attention_mask=self.group_attention_mask,
                        options=self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset.to_dict(), "layout": [list(g) for g in self.layout],
                "group_attention_mask": self.group_attention_mask, "options": asdict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(ModelPreset.from_dict(data["preset"]), _validate_layout(data["layout"]),
                   bool(data.get("group_attention_mask", False)), ModelOptions(**data.get("options", {})))


def build_model(preset: str | ModelPreset, layout: Iterable[Sequence[int]], *,
                group_attention_mask: bool = False, options: ModelOptions | None = None) -> SegModel:
    """A randomly initialised SegModel; ``layout`` is (num_queries, num_columns) per query group.

    Group 0's query count comes from ``layout`` (``preset.num_queries`` is the default a method
    uses when it builds the layout).
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    return SegModel(preset, layout, group_attention_mask=group_attention_mask, options=options)
