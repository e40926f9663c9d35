"""The report's bootstrap at ADE20K size: what one (protocol, step) comparison of two methods costs.

The timed work is what :mod:`benchmark.report.intervals` does per step for a pair of methods of one seed:
draw the image resample (``W``, ``resamples x images``), recompute each method's per-class IoU from the
resampled tp / fp / fn sums (one matrix product per method), the five group means, the percentile interval
of each group for each method and of their paired difference. Per-image counts are random ADE-like
counts (``images x classes``, most classes absent from most images). Goal: under 10 s on the project's
2-core CPU for 2000 images x 150 classes x 1000 resamples.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from benchmark.metrics.groups import GROUPS, group_member
from benchmark.metrics.per_image import PER_IMAGE_METRICS
from benchmark.report.bootstrap import (BootstrapConfig, group_means, percentile_interval, resample_weights,
                                        resampled_class_scores)

GOAL_SECONDS = 10.0


@dataclass
class BootstrapTiming:
    images: int
    classes: int
    resamples: int
    rounds: list[float]

    @property
    def seconds(self) -> float:
        return statistics.median(self.rounds)

    @property
    def label(self) -> str:
        return (f"bootstrap: {self.images} images x {self.classes} classes x {self.resamples} resamples, "
                "2 methods paired (s)")


def per_image_counts(images: int, classes: int, seed: int = 0) -> np.ndarray:
    """Stacked ``[images, 3 * classes]`` tp | fp | fn pixel counts: each image holds about 10 classes."""
    rng = np.random.default_rng(seed)
    present = rng.random((images, classes)) < min(1.0, 10 / classes)
    gt = np.where(present, rng.integers(100, 50_000, (images, classes)), 0)
    tp = (gt * rng.uniform(0.3, 0.95, (images, classes))).astype(np.int64)
    fn = gt - tp
    fp = np.where(rng.random((images, classes)) < 0.1, rng.integers(0, 5_000, (images, classes)), 0)
    return np.concatenate([tp, fp, fn], axis=1)


def compare_pair(stats_a: np.ndarray, stats_b: np.ndarray, class_steps: np.ndarray, step: int,
                 config: BootstrapConfig) -> dict:
    """Intervals of both methods' group means and of their difference, on one shared image resample."""
    names, score_fn = PER_IMAGE_METRICS["iou"]
    weights = resample_weights(stats_a.shape[0], config.resamples, config.rng("images:perf"))
    members = np.stack([group_member(g, class_steps, step) for g in GROUPS])
    a = group_means(resampled_class_scores(stats_a, weights, score_fn, len(names)), members)
    b = group_means(resampled_class_scores(stats_b, weights, score_fn, len(names)), members)
    return {g: (percentile_interval(a[:, i], config.level), percentile_interval(b[:, i], config.level),
                percentile_interval(a[:, i] - b[:, i], config.level)) for i, g in enumerate(GROUPS)}


def measure_bootstrap(images: int = 2000, classes: int = 150, resamples: int = 1000, repeats: int = 5,
                      warmup: int = 1) -> BootstrapTiming:
    """Median wall time of :func:`compare_pair` over ``repeats`` rounds after ``warmup``."""
    a, b = per_image_counts(images, classes, 0), per_image_counts(images, classes, 1)
    class_steps = np.minimum(np.arange(classes) // max(1, classes // 11), 10)    # ADE 100-5-like steps
    step = int(class_steps.max())
    config = BootstrapConfig(resamples=resamples)
    rounds = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        compare_pair(a, b, class_steps, step, config)
        if i >= warmup:
            rounds.append(time.perf_counter() - start)
    return BootstrapTiming(images, classes, resamples, rounds)
