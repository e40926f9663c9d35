"""Torch datasets over a reader: the training view of one protocol step and the evaluation view.

Training targets follow protocols.md ("Training targets at step t"); the dataset's task
(:mod:`benchmark.tasks`) builds them from the reader's sample (semantic: one binary mask per class of C_t
present in the augmented crop; instance: the instances of C_t). ``Target.labels`` are class columns
(``protocol.column(id)``), ordered by column.

Augmentation randomness is a pure function of the :class:`SampleKey` (seed, epoch, position in the
epoch), never of worker ids or global state, so batches do not depend on the number of workers and a
resumed run sees exactly the same data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmark.batch import EvalSample, Target
from benchmark.errors import ConfigError, DataError

from .selection import step_indices
from .transforms import AugConfig, resize_for_test, to_tensor


# First word of the augmentation seed sequence (numpy zero-pads short seed lists: a salt keeps this
# stream apart from the loader's per-epoch permutation stream).
AUG_SALT = 0x41554731


class SampleKey(NamedTuple):
    """Which image (position in the view) and the random stream of its augmentation."""

    index: int
    seed: int = 0
    epoch: int = 0
    position: int = 0


class TrainSample(NamedTuple):
    image: torch.Tensor          # [3, h, w] float32, normalised
    target: Target               # labels [n] int64 class columns, masks [n, h, w] bool
    image_id: object
    replay: bool = False         # a replayed image of an earlier step (benchmark.data.replay)


def _as_key(key: int | SampleKey) -> SampleKey:
    return key if isinstance(key, SampleKey) else SampleKey(int(key), position=int(key))


def _train_sample(task, ds, i: int, columns, aug, key: SampleKey, replay: bool = False) -> TrainSample:
    """Image ``i`` augmented by the random stream of ``key``, with the targets of ``columns``."""
    rng = np.random.default_rng([AUG_SALT, key.seed, key.epoch, key.position])
    image, masks, labels = task.train_sample(ds, i, columns, aug, rng)
    target = Target(torch.as_tensor(labels, dtype=torch.int64), torch.from_numpy(masks))
    return TrainSample(to_tensor(image), target, ds.image_id(i), replay)


class TrainView(Dataset):
    """The augmented training images of ``step`` of ``protocol`` (``protocol.as_joint()`` for joint)."""

    def __init__(self, ds, protocol, step: int, aug: AugConfig | None = None, *, indices=None, cache_dir=None):
        if ds.task != protocol.task:
            raise ConfigError(f"protocol {protocol.name} is a {protocol.task} protocol but dataset {ds.name} is "
                              f"{ds.task}", hint="open the dataset named by protocol.dataset")
        from benchmark.tasks import get_task

        self.task = get_task(ds.task)
        self.task.prepare_dataset(ds)
        self.ds = ds
        self.protocol = protocol
        self.step = step
        self.aug = aug or AugConfig()
        self.indices = np.asarray(step_indices(ds, protocol, step, cache_dir=cache_dir) if indices is None
                                  else indices, dtype=np.int64)
        background = getattr(protocol, "background", None)
        self.classes = tuple(sorted(protocol.new(step), key=protocol.column))
        self.columns = {c: protocol.column(c) for c in self.classes}
        if len(self.indices) == 0:
            shown = ", ".join(map(str, self.classes[:10])) + (", ..." if len(self.classes) > 10 else "")
            raise DataError(f"no training image of {ds.name}/{ds.split} contains a class of step {step} of "
                            f"{protocol.name} ({protocol.mode}; classes {shown}"
                            + (", background excluded)" if background is not None else ")"),
                            hint="check the dataset, or use the overlap mode / another split of the classes")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> TrainSample:
        key = _as_key(key)
        return _train_sample(self.task, self.ds, int(self.indices[key.index]), self.columns, self.aug, key)


class ReplayView(Dataset):
    """Replayed training images (:mod:`benchmark.data.replay` entries), each with the targets of the step it was
    drawn from only, flagged ``replay``; augmented as the current images."""

    def __init__(self, ds, protocol, entries, aug: AugConfig | None = None):
        from benchmark.tasks import get_task

        self.task = get_task(ds.task)
        self.task.prepare_dataset(ds)
        self.ds = ds
        self.aug = aug or AugConfig()
        self.entries = [(int(i), int(s)) for i, s in entries]
        self.columns = {s: {c: protocol.column(c) for c in sorted(protocol.steps[s], key=protocol.column)}
                        for s in {s for _, s in self.entries}}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | SampleKey) -> TrainSample:
        key = _as_key(key)
        i, step = self.entries[key.index]
        return _train_sample(self.task, self.ds, i, self.columns[step], self.aug, key, replay=True)


class ConcatView(Dataset):
    """Views one after another (the current step's images, then the replay memory), sampled uniformly as one
    dataset, as BalConpas concatenates its memory to the step's data (reference eclipse-balconpas B7.3)."""

    def __init__(self, *views):
        self.views = views
        self.offsets = np.cumsum([0] + [len(v) for v in views])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | SampleKey) -> TrainSample:
        key = _as_key(key)
        part = int(np.searchsorted(self.offsets, key.index, side="right")) - 1
        return self.views[part][key._replace(index=key.index - int(self.offsets[part]))]


class EvalView(Dataset):
    """Every image of a (validation) dataset, resized for test, with ground truth at the original size.

    ``size`` is the test-time short side (None: original size); the long side is capped at ``max_size``
    (default 4 x ``size``, detectron2's MAX_SIZE_TEST 2048 for 512).
    """

    def __init__(self, ds, size: int | None, max_size: int | None = None):
        from benchmark.tasks import get_task

        self.task = get_task(ds.task)
        self.task.prepare_dataset(ds)
        self.ds = ds
        self.size = size
        self.max_size = max_size if max_size is not None or size is None else 4 * size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> EvalSample:
        image, target = self.ds.load(int(i))
        target = self.task.eval_target(target)
        pixels = to_tensor(resize_for_test(image, self.size, self.max_size))
        return EvalSample(pixels, self.ds.image_id(int(i)), tuple(image.shape[:2]), target)
