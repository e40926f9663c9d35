"""Percentile bootstrap over validation images and runs: pure, vectorised functions over arrays.

Which bootstrap (decisions; :mod:`benchmark.report.intervals` applies them to a results folder):

- **Images.** One resample is a multiset of the N validation images drawn with replacement, represented
  by its weight matrix ``W [B, N]`` (how often image i is in resample b). Every score is recomputed from
  the resampled *sums* of the per-image statistics (``W @ stats``, one matrix product for all resamples
  and classes), exactly as the full-set score is computed from the full sums: per-class IoU from the
  resampled tp / fp / fn, then the plain mean over the group's classes that have ground truth in the
  resample. Resampling per-image IoUs instead would weight small images like large ones and change the
  statistic.
- **Pairing.** One ``W`` per split (the protocol without its class order), shared by every method, seed and
  class order evaluated on the split's validation set: differences between methods are computed resample by
  resample (a paired bootstrap), so the image-to-image variation that all methods share cancels. Rows of
  ``W`` are aligned by image id, not by evaluation order.
- **Seeds and orders (two levels).** With several runs per method (seeds; seeds x orders when a split is
  aggregated over its class orders), each resample also draws the runs ("units": a seed, or an (order,
  seed) pair) with replacement, one draw ``V [B, U]`` shared by all methods (unit u of every method has the
  same seed, hence the same shared step-0 model and data order). The resampled statistic is the
  V-weighted mean over the drawn units of each unit's score on the resampled images. This adds the
  run-to-run variance to the image variance; with one run it reduces to the image bootstrap. Chosen over
  averaging the seeds on a shared image resample (which ignores seed variance, and would make a lucky seed
  look significant) and over a t-interval over seeds (which needs more seeds than runs usually have).
  With few units the seed level is coarse (two seeds give three distinct draws): intervals from two or
  three seeds are optimistic, and the report states how many runs stand behind every number.
- **Runs without per-image statistics** (instance AP, older run folders) contribute their stored score,
  constant over the image resamples: their intervals come from the runs (seeds, orders) only, and are NaN
  for a single run.
- **Interval.** The percentile interval ``[q(alpha/2), q(1 - alpha/2)]`` of the resampled statistic
  (resamples whose statistic is undefined, e.g. a group whose classes all lost their ground truth, are
  left out). A difference is significant when its interval excludes 0.
- **Reproducibility.** Every random draw comes from ``numpy.random.default_rng([seed, crc32(name)])``:
  the same seed, resample count and results give the same intervals, independent of which other
  protocols are in the folder.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from benchmark.errors import ConfigError

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class BootstrapConfig:
    """``resamples`` (0 = no intervals), ``seed`` of every draw, two-sided confidence ``level``."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if not isinstance(self.resamples, int) or self.resamples < 0 or 0 < self.resamples < 50:
            raise ConfigError(f"resamples must be 0 (no intervals) or at least 50, got {self.resamples!r}",
                              hint="use e.g. --resamples 1000 (the default) or --resamples 200 for a quick look")
        if not 0.5 <= float(self.level) < 1:
            raise ConfigError(f"confidence level must be in [0.5, 1), got {self.level!r}", hint="use 0.95")

    @property
    def enabled(self) -> bool:
        return self.resamples > 0

    def rng(self, name: str, stream: int = 0) -> np.random.Generator:
        """The generator of one named draw (a split's images, an aggregate's units)."""
        return np.random.default_rng([int(self.seed), zlib.crc32(str(name).encode("utf-8")), int(stream)])


def resample_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[resamples, n]`` float64: how often each of ``n`` items is drawn in each resample (rows sum to n)."""
    if n == 0:
        return np.zeros((resamples, 0))
    draws = rng.integers(0, n, size=(resamples, n))
    flat = draws + n * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def resampled_sums(stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights [B, N] @ stats [N, M]``: the statistics' sums over every resampled image set, ``[B, M]``."""
    return weights @ np.asarray(stats, dtype=np.float64)


def resampled_class_scores(stacked: np.ndarray, weights: np.ndarray, score_fn, num_stats: int) -> np.ndarray:
    """Per-class scores ``[B, K]`` of every resample from stacked per-image statistics ``[N, num_stats * K]``."""
    sums = resampled_sums(stacked, weights)
    return score_fn(*np.split(sums, num_stats, axis=1))


def group_means(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    """NaN-skipping mean over each group's classes: ``scores [..., K]``, ``members [G, K]`` bool -> ``[..., G]``."""
    valid = np.isfinite(scores)
    m = np.asarray(members, dtype=np.float64).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(valid, scores, 0.0) @ m) / (valid.astype(np.float64) @ m)


def forgetting(scores: np.ndarray, class_steps: np.ndarray, final: int) -> np.ndarray:
    """Mean forgetting over the old classes for every resample (as :mod:`benchmark.metrics.continual`).

    ``scores [T, B, K]`` per-class scores after each step 0..T-1 (``final`` = T - 1); ``class_steps [K]``.
    Per class: max over the steps from its introduction to the one before ``final``, minus its final score.
    """
    steps = np.arange(scores.shape[0])[:, None]
    window = (steps >= class_steps[None, :]) & (steps < final)                # [T, K]
    usable = window[:, None, :] & np.isfinite(scores)
    best = np.where(usable, scores, -np.inf).max(axis=0)                      # [B, K]
    best[np.isinf(best)] = np.nan
    drop = best - scores[final]
    old = np.asarray(class_steps) < final
    return group_means(drop, old[None, :])[..., 0]


def combine_units(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean over units per resample: ``values [U, B]`` (NaN = missing), ``weights [B, U]`` -> ``[B]``."""
    valid = np.isfinite(values).T                                             # [B, U]
    v = np.where(valid, values.T, 0.0)
    w = weights * valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * v).sum(axis=1) / w.sum(axis=1)


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The percentile interval of the finite samples (NaN, NaN when there are fewer than two)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < 2:
        return float("nan"), float("nan")
    alpha = 1.0 - level
    lo, hi = np.percentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def significant(low: float, high: float) -> bool | None:
    """Whether an interval of a difference excludes 0 (None when the interval is unknown)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return bool(low > 0 or high < 0)
