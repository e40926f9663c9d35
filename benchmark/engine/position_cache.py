"""The stock sine position embeddings, computed once per feature shape instead of once per call.

Why: transformers' ``Mask2FormerSinePositionEmbedding.build_sine_position_embedding`` keeps an
``lru_cache(maxsize=1)``, and one forward of the model asks for six shapes (the pixel decoder's three levels, then
the transformer decoder's three), so every call misses and rebuilds the table: 1.1-1.4 ms per forward of a ~75 ms
training iteration of the ``tiny`` preset on one CPU thread (measured 2026-12-07, README Performance). The table
depends only on the shape, device and dtype (no mask is ever passed: the pixel decoder's padding masks are all
false), so caching it changes no value: the stock module computes every entry, bit for bit.

A cache entry made under ``torch.inference_mode`` (evaluation) is an inference tensor, which autograd may not save
for a later training step, so the mode is part of the key. The cache is per module instance (a model, its frozen
teacher copy and a rebuilt model each have their own) and bounded, so evaluating images of many sizes cannot
grow it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MAX_ENTRIES = 16


class CachedSinePositions(nn.Module):
    """Wraps a stock ``Mask2FormerSinePositionEmbedding`` (same call signature); no parameters, no buffers, so
    state dicts and checkpoints are unchanged."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.stock = stock
        self._tables: dict[tuple, Tensor] = {}

    def forward(self, shape: torch.Size, device: torch.device | str, dtype: torch.dtype,
                mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            return self.stock(shape, device, dtype, mask)
        key = (tuple(shape), torch.device(device), dtype, torch.is_inference_mode_enabled())
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= MAX_ENTRIES:
                self._tables.clear()
            table = self._tables[key] = self.stock(shape, device, dtype)
        return table


def cache_position_embeddings(model: nn.Module) -> None:
    """Wrap the two position-embedding modules of a freshly built transformers ``Mask2FormerModel`` in place."""
    for owner, name in ((model.pixel_level_module.decoder, "position_embedding"),
                        (model.transformer_module, "position_embedder")):
        setattr(owner, name, CachedSinePositions(getattr(owner, name)))
