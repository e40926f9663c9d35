"""The one value every forward of the engine returns, and every method reads.

Class-column convention (used by data views, heads, losses and inference): a protocol's classes are
numbered by their position in ``protocol.class_order`` (the steps flattened in order). At step t the
model predicts the seen columns ``0 .. K_t - 1``; the columns of step t's new classes are the last
``|C_t|`` of them. A single-head model (finetune, MiB, PLOP, CoMFormer) has one query group whose head
covers all seen columns plus a trailing no-object logit. CisDQ has one group per step; group g's head
covers the columns of step g plus its own trailing no-object logit (its "adaptive background").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ModelOutputs:
    """Everything one forward computes; methods never run a second forward or register hooks.

    Per-layer lists are ordered as the decoder produces them; the last entry is the final prediction.
    """

    # [layer][group] -> [B, Q_g, C_g + 1] class logits, no-object last.
    layer_class_logits: list[tuple[Tensor, ...]]
    # [layer] -> [B, Q, h, w] mask logits of all queries (groups concatenated in group order), 1/4 res.
    layer_mask_logits: list[Tensor]
    # [layer] -> [B, Q, D] decoder query hidden states (after each layer's final norm).
    layer_query_states: list[Tensor]
    # the backbone stages (strides 4, 8, 16, 32), [B, C_s, H_s, W_s] each.
    backbone_features: tuple[Tensor, ...]
    # the pixel decoder's 1/4-resolution mask features, [B, D, h, w].
    mask_features: Tensor
    # query slice of each group in the concatenated query axis.
    group_queries: tuple[slice, ...]
    # class-column slice (global columns, no-object excluded) covered by each group's head.
    group_columns: tuple[slice, ...]
    # the columns each group is responsible for: its step's classes (= group_columns, except for a step_mlp
    # classifier whose every group sees all columns; ECLIPSE's logit manipulation needs both). None: group_columns.
    own_columns: tuple[slice, ...] | None = None

    def columns_owned(self) -> tuple[slice, ...]:
        return self.group_columns if self.own_columns is None else self.own_columns

    @property
    def num_groups(self) -> int:
        return len(self.group_queries)

    @property
    def num_layers(self) -> int:
        return len(self.layer_mask_logits)

    @property
    def num_columns(self) -> int:
        return self.group_columns[-1].stop

    def class_logits(self, group: int = 0, layer: int = -1) -> Tensor:
        """[B, Q_g, C_g + 1] class logits of one group at one layer (no-object last)."""
        return self.layer_class_logits[layer][group]

    def layer_class_logits_of(self, group: int = 0) -> list[Tensor]:
        """[layer] -> [B, Q_g, C_g + 1]: one group's class logits at every layer (for the set loss)."""
        return [layer[group] for layer in self.layer_class_logits]

    def mask_logits(self, group: int | None = None, layer: int = -1) -> Tensor:
        """[B, Q(_g), h, w] mask logits of every query, or of one group's queries."""
        masks = self.layer_mask_logits[layer]
        return masks if group is None else masks[:, self.group_queries[group]]

    def query_states(self, group: int | None = None, layer: int = -1) -> Tensor:
        states = self.layer_query_states[layer]
        return states if group is None else states[:, self.group_queries[group]]

    def class_probs(self, layer: int = -1) -> Tensor:
        """[B, Q, K] probabilities in the global seen-column space, no-object dropped.

        Each query's softmax runs over its own group's head (its classes + its no-object), then the
        no-object probability is dropped and the rest is placed at the group's global columns; columns
        of other groups are 0 for that query. For a single-group model this is the usual
        ``softmax(logits)[..., :-1]``.
        """
        logits = self.layer_class_logits[layer]
        first = logits[0]
        num_queries = max(where.stop for where in self.group_queries)
        out = first.new_zeros(first.shape[0], num_queries, self.num_columns)
        for g, group_logits in enumerate(logits):
            probs = group_logits.float().softmax(-1)[..., :-1].to(out.dtype)
            out[:, self.group_queries[g], self.group_columns[g]] = probs
        return out

    def detach(self) -> "ModelOutputs":
        """A copy with every tensor detached (for the frozen old model's outputs)."""
        return ModelOutputs(
            layer_class_logits=[tuple(t.detach() for t in layer) for layer in self.layer_class_logits],
            layer_mask_logits=[t.detach() for t in self.layer_mask_logits],
            layer_query_states=[t.detach() for t in self.layer_query_states],
            backbone_features=tuple(t.detach() for t in self.backbone_features),
            mask_features=self.mask_features.detach(),
            group_queries=self.group_queries,
            group_columns=self.group_columns,
            own_columns=self.own_columns,
        )
