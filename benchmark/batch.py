"""What a training data loader yields and the engine consumes.

``labels`` are class columns: positions in ``protocol.class_order`` (see benchmark/engine/outputs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Target:
    """Training target of one image: ``labels`` [n] class columns, ``masks`` [n, H, W] (bool or float)."""

    labels: Tensor
    masks: Tensor

    def to(self, device: torch.device | str) -> "Target":
        return Target(self.labels.to(device), self.masks.to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Batch:
    """A collated training batch.

    pixel_values: [B, 3, H, W] float32, normalised (ImageNet mean/std), padded to a common size.
    pixel_mask:   [B, H, W] long, 1 on real pixels, 0 on padding.
    targets:      one Target per image; masks at the padded input resolution.
    image_ids:    the dataset's image ids, for logs and reproducibility checks.
    replay:       per image, whether it is a replayed image of an earlier step (empty: none is).
    """

    pixel_values: Tensor
    pixel_mask: Tensor
    targets: list[Target]
    image_ids: list = field(default_factory=list)
    replay: list = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.pixel_values.to(device, non_blocking=True),
            self.pixel_mask.to(device, non_blocking=True),
            [t.to(device) for t in self.targets],
            list(self.image_ids),
            list(self.replay),
        )

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class EvalSample:
    """One validation image as the evaluation view yields it.

    pixel_values: [3, h, w] float32 normalised, resized for test (short side to the eval size).
    orig_size:    (H, W) of the original image; predictions are resized back to it.
    target:       semantic: [H, W] int64 numpy array of native ids (void = 255);
                  instance: list of (native class id, [H, W] bool numpy mask).
    """

    pixel_values: Tensor
    image_id: object
    orig_size: tuple[int, int]
    target: object
