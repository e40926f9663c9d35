"""Replay memory: which earlier training images a step replays (the engine's sampler for exemplar methods).

Class-proportional memory (CPM) of BalConpas (Chen et al., ECCV 2024; jinpeng0528/BalConpas
``continual/memory_generator/memory_selection_{pan,sem,inst}.py`` L61-189; reference eclipse-balconpas B7):

* A fixed budget of ``size`` images in total (300 in every setting of the release).
* The memory used while training step t is built from steps 0..t-1 in order. Class statistic of a candidate:
  the presence (0/1) of each class of the step it is drawn from (the original's semantic rule; its panoptic and
  instance rules count segments and instances: presence is what the readers cache, so it is used for every task,
  a documented simplification). Target distribution: the cumulative per-class counts over all training images of
  the steps seen so far, normalised.
* Greedy selection: repeatedly add the candidate whose addition brings the memory's class ratios closest to the
  target in L1; ties go to the first candidate (dataset order).
* After step 0: ``size`` images from step 0's training images. After step s >= 1: first ``floor(size * keep)``
  images re-selected from the previous memory (greedy from empty counts), ``keep`` = classes before step s /
  classes after it, then the remaining slots filled from step s's training images (continuing from the kept
  counts).
* An entry is (dataset index, step it was drawn from): a replayed image is annotated with the classes of that
  step only (the original stores only those segments). An image drawn at two steps keeps the later entry's
  classes only (the original merges the annotations; decision: keep one entry per image, the simpler rule).

The memory is a pure function of the dataset, the protocol and the size; the runner writes it into the run
folder (``replay_step_XX.json``) before training the step and reads it back on resume.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .selection import step_indices

Entry = tuple[int, int]          # (dataset index, step it was drawn from)


def greedy_class_proportional(stats: np.ndarray, target: np.ndarray, k: int,
                              start: np.ndarray | None = None) -> list[int]:
    """Indices (rows of ``stats`` [N, C]) of ``k`` greedy picks bringing ``start + sum(picked)`` closest in L1 to the
    ratio ``target / sum(target)`` (BalConpas's CPM step); ties to the lowest index."""
    stats = np.asarray(stats, dtype=np.float64)
    counts = np.zeros(stats.shape[1]) if start is None else np.asarray(start, dtype=np.float64).copy()
    goal = np.asarray(target, dtype=np.float64)
    goal = goal / goal.sum() if goal.sum() > 0 else goal
    available = np.ones(len(stats), dtype=bool)
    picked: list[int] = []
    for _ in range(min(k, len(stats))):
        totals = counts[None] + stats                                    # [N, C]
        sums = totals.sum(1, keepdims=True)
        ratios = np.divide(totals, sums, out=np.zeros_like(totals), where=sums > 0)
        distance = np.abs(ratios - goal[None]).sum(1)
        distance[~available] = np.inf
        best = int(np.argmin(distance))
        picked.append(best)
        available[best] = False
        counts += stats[best]
    return picked


def class_proportional_memory(ds, protocol, step: int, size: int, *, cache_dir=None) -> list[Entry]:
    """The replay memory used while training ``step`` (>= 1): at most ``size`` entries (module docstring)."""
    if step < 1 or size < 1:
        return []
    classes = list(protocol.all_classes)
    column = {c: k for k, c in enumerate(classes)}
    presence = ds.presence()

    def stats_of(entries: Sequence[Entry]) -> np.ndarray:
        out = np.zeros((len(entries), len(classes)))
        for row, (i, s) in enumerate(entries):
            own = set(protocol.steps[s])
            for c in presence[i]:
                if c in own:
                    out[row, column[c]] = 1.0
        return out

    memory: list[Entry] = []
    target = np.zeros(len(classes))
    for s in range(step):
        candidates = [(i, s) for i in step_indices(ds, protocol, s, cache_dir=cache_dir)]
        new_stats = stats_of(candidates)
        target += new_stats.sum(0)
        if s == 0:
            memory = [candidates[k] for k in greedy_class_proportional(new_stats, target, size)]
            continue
        seen_before = sum(len(c) for c in protocol.steps[:s])
        keep = math.floor(size * seen_before / (seen_before + len(protocol.steps[s])))
        old_stats = stats_of(memory)
        kept_rows = greedy_class_proportional(old_stats, target, keep)
        kept = [memory[k] for k in kept_rows]
        taken = {i for i, _ in kept}
        fresh = [(k, e) for k, e in enumerate(candidates) if e[0] not in taken]
        fill = greedy_class_proportional(new_stats[[k for k, _ in fresh]], target, size - len(kept),
                                         start=old_stats[kept_rows].sum(0) if kept_rows else None)
        memory = kept + [fresh[k][1] for k in fill]
    return memory
