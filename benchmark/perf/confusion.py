"""Confusion-matrix accumulation: ``benchmark.metrics.confusion_update`` vs torchmetrics' ``MulticlassJaccardIndex``.

Both accumulate the same label maps (``num_classes`` classes, about 10 % void pixels = 255, ignored) on
the same device; torchmetrics runs as a user would run it (argument validation on, its default), as
ours validates too. The two matrices are checked equal once, so the comparison is of equal work.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from benchmark.errors import EnvironmentProblem
from benchmark.metrics.confusion import VOID, confusion_update, new_confusion

VOID_FRACTION = 0.1


def label_maps(count: int, size: int, num_classes: int, device: torch.device | str,
               seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """(prediction, target) int64 pairs of ``size`` x ``size``; targets have ~10 % void pixels."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(count):
        target = torch.randint(0, num_classes, (size, size), generator=generator)
        target[torch.rand(size, size, generator=generator) < VOID_FRACTION] = VOID
        pred = torch.randint(0, num_classes, (size, size), generator=generator)
        maps.append((pred.to(device), target.to(device)))
    return maps


def ours(maps: list[tuple[Tensor, Tensor]], num_classes: int, device: torch.device | str) -> Tensor:
    matrix = new_confusion(num_classes, device)
    for pred, target in maps:
        confusion_update(matrix, pred, target)
    return matrix


def torchmetrics_jaccard(num_classes: int, device: torch.device | str):
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError as err:
        raise EnvironmentProblem(f"the confusion benchmark compares with torchmetrics, which cannot be imported ({err})",
                                 hint='install the test extras: pip install -e ".[test]"') from err
    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=VOID, average="none").to(device)


def theirs(maps: list[tuple[Tensor, Tensor]], num_classes: int, device: torch.device | str) -> Tensor:
    metric = torchmetrics_jaccard(num_classes, device)
    for pred, target in maps:
        metric.update(pred, target)
    return metric.confmat


def check_equal(maps: list[tuple[Tensor, Tensor]], num_classes: int, device: torch.device | str) -> None:
    """Both sides count the same pixels into the same cells (rows = ground truth)."""
    a, b = ours(maps, num_classes, device), theirs(maps, num_classes, device)
    if not torch.equal(a.cpu(), b.to(torch.int64).cpu()):
        raise RuntimeError("benchmark.metrics.confusion_update and torchmetrics disagree on the same label maps")


def cases(maps: list[tuple[Tensor, Tensor]], num_classes: int,
          device: torch.device | str) -> dict[str, Callable[[], Tensor]]:
    return {"confusion": lambda: ours(maps, num_classes, device),
            "confusion_torchmetrics": lambda: theirs(maps, num_classes, device)}
