"""Batches for the engine: ``collate``, the resumable infinite ``TrainLoader`` and the evaluation loader.

The training stream is detectron2's ``TrainingSampler`` idea made resumable: epoch e visits the view in
the order ``permutation(seed, e)``; the stream of samples is the concatenation of epochs, cut into
batches (a batch may span two epochs). The k-th sample of the stream is (epoch k // N, position k % N),
and its augmentation is drawn from (seed, epoch, position) (:class:`~benchmark.data.views.SampleKey`).
So the batches depend only on (view, batch size, seed), not on the number of workers, and
``load_state_dict`` restarts the stream at any sample without loading the skipped images.

Under DDP (``world_size > 1``) every rank walks the same stream; each global batch of
``batch_size * world_size`` samples is split into contiguous per-rank slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmark.batch import Batch, EvalSample, Target
from benchmark.errors import ConfigError

from .views import EvalView, SampleKey, TrainSample, TrainView

SIZE_DIVISIBILITY = 32
PERMUTATION_SALT = 0x5045524D


@dataclass(frozen=True)
class LoaderConfig:
    """DataLoader settings (``--set data.workers=2``): worker processes for training and evaluation."""

    workers: int = 0
    eval_workers: int | None = None      # None: the same as ``workers``

    def __post_init__(self):
        if self.workers < 0 or (self.eval_workers is not None and self.eval_workers < 0):
            raise ConfigError("data.workers and data.eval_workers must be >= 0")

    @property
    def evaluation_workers(self) -> int:
        return self.workers if self.eval_workers is None else self.eval_workers


def collate(samples: Sequence[TrainSample], size_divisibility: int = SIZE_DIVISIBILITY) -> Batch:
    """Pad images (with 0 = the mean colour after normalisation) and masks (False) to a common size,
    the largest in the batch rounded up to a multiple of ``size_divisibility``."""
    height = max(s.image.shape[1] for s in samples)
    width = max(s.image.shape[2] for s in samples)
    height = -(-height // size_divisibility) * size_divisibility
    width = -(-width // size_divisibility) * size_divisibility
    pixel_values = torch.zeros(len(samples), 3, height, width)
    pixel_mask = torch.zeros(len(samples), height, width, dtype=torch.long)
    targets = []
    for b, sample in enumerate(samples):
        _, h, w = sample.image.shape
        pixel_values[b, :, :h, :w] = sample.image
        pixel_mask[b, :h, :w] = 1
        masks = torch.zeros(len(sample.target), height, width, dtype=torch.bool)
        masks[:, :h, :w] = sample.target.masks
        targets.append(Target(sample.target.labels, masks))
    return Batch(pixel_values, pixel_mask, targets, [s.image_id for s in samples], [s.replay for s in samples])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([PERMUTATION_SALT, seed, epoch]).permutation(n)


class _KeyBatches:
    """Infinite batch sampler of SampleKeys starting at sample ``start`` of the stream."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[SampleKey]]:
        sample, epoch, order = self.start, -1, None
        global_batch = self.batch_size * self.world_size
        while True:
            keys = []
            for _ in range(global_batch):
                e, position = divmod(sample, self.n)
                if e != epoch:
                    epoch, order = e, epoch_permutation(self.n, self.seed, e)
                keys.append(SampleKey(int(order[position]), self.seed, e, position))
                sample += 1
            yield keys[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


class TrainLoader:
    """Infinite iterator of :class:`~benchmark.batch.Batch` over a :class:`TrainView` (module docstring).

    ``state_dict()`` -> ``{"epoch", "position"}`` of the next sample to be consumed (not merely
    prefetched by workers); ``load_state_dict`` resumes there.
    """

    def __init__(self, view: TrainView, batch_size: int, seed: int = 0, workers: int = 0, *,
                 rank: int = 0, world_size: int = 1, size_divisibility: int = SIZE_DIVISIBILITY):
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ConfigError(f"the data seed must be non-negative, got {seed}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
        self.view = view
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.size_divisibility = size_divisibility
        self._sample = 0             # global index of the next sample to consume
        self._iterator = None

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self._loader())
        batch = next(self._iterator)
        self._sample += self.batch_size * self.world_size
        return batch

    def _loader(self) -> DataLoader:
        sampler = _KeyBatches(len(self.view), self.batch_size, self.seed, self._sample, self.rank, self.world_size)
        return DataLoader(self.view, batch_sampler=sampler, num_workers=self.workers,
                          collate_fn=_Collate(self.size_divisibility), persistent_workers=False)

    def state_dict(self) -> dict:
        epoch, position = divmod(self._sample, len(self.view))
        return {"epoch": int(epoch), "position": int(position)}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if not 0 <= position < len(self.view):
            raise ConfigError(f"loader position {position} is outside the view of {len(self.view)} images",
                              hint="the checkpoint was written for other data; restart the step")
        self.close()
        self._sample = int(state["epoch"]) * len(self.view) + position

    def close(self) -> None:
        """Stop the worker processes (they are restarted on the next batch)."""
        self._iterator = None


class _Collate:
    """Picklable collate function for worker processes."""

    def __init__(self, size_divisibility: int):
        self.size_divisibility = size_divisibility

    def __call__(self, samples):
        return collate(samples, self.size_divisibility)


def single_pass(view: TrainView, batch_size: int, seed: int = 0, workers: int = 0) -> Iterator[Batch]:
    """Every image of the view once, in view order (augmentation of image k drawn from (seed, epoch 0,
    position k)), for statistics over a step's training images such as PLOP's entropy thresholds."""
    keys = [SampleKey(i, seed, 0, i) for i in range(len(view))]
    batches = [keys[k:k + batch_size] for k in range(0, len(keys), batch_size)]
    yield from DataLoader(view, batch_sampler=batches, num_workers=workers, collate_fn=_Collate(SIZE_DIVISIBILITY))


def _first(samples: list[EvalSample]) -> EvalSample:
    return samples[0]


def eval_loader(view: EvalView, workers: int = 0) -> DataLoader:
    """Batch size 1, in dataset order; yields :class:`~benchmark.batch.EvalSample`."""
    return DataLoader(view, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_first)
