"""Continual aggregates over the steps of one run (protocols.md).

- Forgetting of class c (Chaudhry et al., ECCV 2018, "Riemannian Walk", applied per class as in the
  continual segmentation literature): the best score c had at any step from the one that introduced it
  up to the step before the final one, minus its final score. Only classes introduced before the final
  step have one; the run's forgetting is its mean over those ("old") classes. Positive = forgotten.
- Average incremental score (PLOP's "avg", ``average_csv.py``): the mean over steps 0..T of the
  seen-class mean score of each step.

Scores are whatever the caller passes (IoU or AP, in percent in the results); NaN (a class without
ground truth) is skipped in maxima and means.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pandas as pd


def forgetting_per_class(scores: pd.DataFrame, class_steps: Mapping[int, int],
                         final_step: int | None = None) -> pd.Series:
    """Forgetting of every class introduced before ``final_step`` (default: the last step in ``scores``).

    ``scores``: index = step, columns = class id, values = the class's score after that step.
    Returns a Series indexed by class id; NaN where the class has no score at an earlier step or at the
    final step.
    """
    if scores.empty:
        return pd.Series(dtype=float)
    final = int(scores.index.max()) if final_step is None else int(final_step)
    if final not in scores.index:
        raise ValueError(f"no scores at the final step {final}; steps present: {sorted(scores.index)}")
    out = {}
    for c in scores.columns:
        introduced = int(class_steps[c])
        if introduced >= final:
            continue
        earlier = scores.loc[(scores.index >= introduced) & (scores.index < final), c]
        best = earlier.max(skipna=True)
        out[c] = float(best - scores.at[final, c]) if np.isfinite(best) else float("nan")
    return pd.Series(out, dtype=float).rename_axis(scores.columns.name or "class_id")


def mean_forgetting(per_class: pd.Series, classes: Iterable[int] | None = None) -> float:
    """Mean forgetting over ``classes`` (default: every class in ``per_class``), NaN if none has a value."""
    values = per_class if classes is None else per_class.reindex(list(classes))
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def average_incremental(seen_scores: Mapping[int, float] | pd.Series, num_steps: int | None = None) -> float:
    """Mean of the per-step seen-class scores; NaN unless every step 0..num_steps-1 has one."""
    s = pd.Series(seen_scores, dtype=float)
    steps = range(int(s.index.max()) + 1 if num_steps is None else num_steps) if len(s) else range(0)
    values = s.reindex(list(steps))
    if not len(values) or values.isna().any():
        return float("nan")
    return float(values.mean())
