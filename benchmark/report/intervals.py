"""Confidence intervals of every summary row and significance of method differences, from a results folder.

:func:`compute_intervals` applies the bootstrap of :mod:`benchmark.report.bootstrap` (read its docstring for
the decisions) to the runs of a results folder:

1. Per split (protocol without its class order) one image resample ``W`` over the split's validation
   images (sorted image ids), shared by all its protocols (orders), methods and seeds.
2. Per run, its resampled per-class scores after every step: from ``step_XX/per_image.npz`` where the step
   has it and the metric can be recomputed from per-image statistics
   (:data:`benchmark.metrics.per_image.PER_IMAGE_METRICS`), otherwise the stored per-class score,
   constant over the resamples. From them, exactly as :func:`benchmark.report.summary.run_scores` does from
   the stored scores: group means, forgetting and average incremental score.
3. Per aggregate (a protocol: units = seeds; a split over its orders: units = (order, seed)), the
   unit-resampled mean of each method (:func:`bootstrap.combine_units`), its percentile interval, and for
   every continual method the interval of its difference to the best continual method (highest mean;
   lowest for forgetting) of that (step, group, metric).

``ci_source`` says what an interval covers: ``images`` (one run, per-image statistics), ``images+seeds`` /
``images+runs`` (several runs), ``seeds`` / ``runs`` (no per-image statistics: instance AP, older run
folders), empty when there is none (one run without per-image statistics, or ``resamples = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import DataError
from benchmark.metrics.groups import GROUPS, group_member
from benchmark.metrics.per_image import PER_IMAGE_METRICS
from benchmark.store import RunStore
from benchmark.tasks import task_for_metric

from .bootstrap import (BootstrapConfig, combine_units, forgetting, group_means, percentile_interval,
                        resample_weights, resampled_class_scores, significant)
from .orders import order_name, split_name, splits_with_orders
from .summary import JOINT, PRIMARY, SUMMARY_METRIC, method_order

SIGNIFICANCE_COLUMNS = ["protocol", "method", "reference", "step", "group", "metric", "diff", "ci_low", "ci_high",
                        "significant"]
LOWER_IS_BETTER = frozenset({"forgetting"})
KEY = ("step", "group", "metric")


@dataclass
class RunSeries:
    """One run's resampled scores: ``values[(step, group, metric)]`` ``[B]``; ``from_images`` per key."""

    protocol: str
    method: str
    seed: int
    values: dict = field(default_factory=dict)
    from_images: dict = field(default_factory=dict)


@dataclass
class Intervals:
    """What the report writes: the summary with intervals, significance, the same for splits over orders."""

    summary: pd.DataFrame
    significance: pd.DataFrame
    orders: pd.DataFrame | None = None
    orders_significance: pd.DataFrame | None = None
    info: dict = field(default_factory=dict)


def compute_intervals(results_dir: str | Path, prepared: pd.DataFrame, summary: pd.DataFrame,
                      config: BootstrapConfig, orders: pd.DataFrame | None = None) -> Intervals:
    """Add ``ci_low``, ``ci_high``, ``ci_source`` to ``summary`` (and ``orders``) and build the significance tables.

    ``prepared`` is the :func:`benchmark.report.summary.prepare`-d long table with ``run_dir``.
    """
    results_dir = Path(results_dir)
    series: dict[str, list[RunSeries]] = {}
    sources: dict[str, str] = {}
    if config.enabled:
        for split, protocols in _splits(prepared["protocol"].unique()).items():
            rows = prepared[prepared["protocol"].isin(protocols)]
            weights, n_images = _image_weights(results_dir, rows, split, config)
            sources[split] = f"{n_images} validation images" if weights is not None else "no per-image statistics"
            for protocol in protocols:
                p_rows = rows[rows["protocol"] == protocol]
                classes = p_rows.drop_duplicates("class_id").sort_values("class_id")
                class_ids = classes["class_id"].to_numpy()
                class_steps = classes["class_step"].to_numpy()
                series[protocol] = [
                    _run_series(results_dir / run_dir, run_rows, class_ids, class_steps, weights, config)
                    for run_dir, run_rows in p_rows.groupby("run_dir", sort=True)]

    ci, sig = [], []
    for protocol in sorted(prepared["protocol"].unique()):
        means = summary[summary["protocol"] == protocol]
        c, s = _aggregate(protocol, series.get(protocol, []), means, lambda r: r.seed, "seeds", config)
        ci.append(c.assign(protocol=protocol))
        sig.append(s)
    summary = summary.merge(pd.concat(ci, ignore_index=True), on=["protocol", "method", *KEY], how="left")
    significance = _sorted(pd.concat(sig, ignore_index=True)[SIGNIFICANCE_COLUMNS])

    out = Intervals(summary, significance, info={
        "resamples": config.resamples, "seed": config.seed, "level": config.level, "image_sets": sources})
    if orders is not None and len(orders):
        ci, sig = [], []
        for split, protocols in splits_with_orders(prepared["protocol"].unique()).items():
            members = [r for p in protocols for r in series.get(p, [])]
            means = orders[orders["split"] == split]
            c, s = _aggregate(split, members, means, lambda r: (order_name(r.protocol), r.seed), "runs", config)
            ci.append(c.assign(split=split))
            sig.append(s)                       # its "protocol" column holds the split's name
        out.orders = orders.merge(pd.concat(ci, ignore_index=True), on=["split", "method", *KEY], how="left")
        sig = pd.concat(sig, ignore_index=True).rename(columns={"protocol": "split"})
        out.orders_significance = sig[["split"] + SIGNIFICANCE_COLUMNS[1:]]
    return out


# ---------------------------------------------------------------------------------------------- per run
def _splits(protocols) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in sorted(protocols):
        out.setdefault(split_name(p), []).append(p)
    return out


def _stored_step(method: str, step: int) -> int:
    """Joint is stored as its single step 0 and reported at the protocol's final step."""
    return 0 if method == JOINT else int(step)


def _image_weights(results_dir: Path, rows: pd.DataFrame, split: str, config: BootstrapConfig):
    """``((sorted image ids, W [B, N]), N)`` over the split's validation images, ``(None, 0)`` without per-image data.

    The image set is taken from the first stored per_image.npz; every other one is checked against it when it
    is read (:func:`_class_scores`).
    """
    for run_dir, run_rows in rows.groupby("run_dir", sort=True):
        store = RunStore(results_dir / run_dir)
        method = run_rows["method"].iloc[0]
        for step in sorted(run_rows["step"].unique()):
            stats = store.read_per_image(_stored_step(method, step))
            if stats is not None:
                ids = np.sort(stats.image_ids)
                weights = resample_weights(len(ids), config.resamples, config.rng(f"images:{split}"))
                return (ids, weights, f"{run_dir} step {step}"), len(ids)
    return None, 0


def _run_series(run_dir: Path, rows: pd.DataFrame, class_ids: np.ndarray, class_steps: np.ndarray, images,
                config: BootstrapConfig) -> RunSeries:
    """Resampled group scores (and continual aggregates) of one run, keyed like the summary rows."""
    first = rows.iloc[0]
    out = RunSeries(str(first["protocol"]), str(first["method"]), int(first["seed"]))
    store = RunStore(run_dir)
    steps = sorted(int(s) for s in rows["step"].unique())
    b = config.resamples
    kinds = task_for_metric(str(first["metric"])).class_kinds(out.protocol)
    kinds = {k: np.isin(class_ids, list(ids)) for k, ids in kinds.items() if 0 < len(ids) < len(class_ids)}
    for metric, metric_rows in rows.groupby("metric", sort=False):
        per_step, from_images = {}, {}
        for step in steps:
            scores, used = _class_scores(store, out.method, step, metric, metric_rows, class_ids, images, b)
            per_step[step], from_images[step] = scores, used
            names = GROUPS + tuple(kinds)
            members = np.stack([group_member(g, class_steps, step) for g in GROUPS]
                               + [group_member("seen", class_steps, step) & kinds[k] for k in kinds])
            means = group_means(scores, members)                                   # [B, G]
            for g, group in enumerate(names):
                if members[g].any():
                    key = (step, group, SUMMARY_METRIC.get(metric, metric))
                    out.values[key], out.from_images[key] = means[:, g], used
        final = int(class_steps.max())
        primary = metric in PRIMARY.values()
        if out.method != JOINT and primary and final > 0 and steps == list(range(final + 1)):
            stacked = np.stack([per_step[t] for t in steps])                        # [T, B, K]
            everywhere = all(from_images.values())
            out.values[(final, "old", "forgetting")] = forgetting(stacked, class_steps, final)
            seen = np.stack([group_means(per_step[t], group_member("seen", class_steps, t)[None, :])[:, 0]
                             for t in steps])
            out.values[(final, "seen", "avg_incremental")] = seen.mean(axis=0)
            out.from_images[(final, "old", "forgetting")] = everywhere
            out.from_images[(final, "seen", "avg_incremental")] = everywhere
    return out


def _class_scores(store: RunStore, method: str, step: int, metric: str, rows: pd.DataFrame, class_ids: np.ndarray,
                  images, resamples: int) -> tuple[np.ndarray, bool]:
    """``[B, K]`` per-class scores of one step: resampled from per-image statistics, else the stored constant."""
    if images is not None and metric in PER_IMAGE_METRICS:
        stats = store.read_per_image(_stored_step(method, step))
        if stats is not None and metric in stats.metrics():
            reference, weights, origin = images
            aligned = stats.aligned_to(reference)
            if aligned is None:
                raise DataError(f"{store.run_dir} step {_stored_step(method, step)} was evaluated on other validation "
                                f"images than {origin} ({stats.num_images} vs {len(reference)} images)",
                                hint="runs of one split must be evaluated on the same validation set; move the "
                                     "other run folders out of the results folder")
            stats = aligned
            column = {int(c): i for i, c in enumerate(stats.class_ids)}
            if all(int(c) in column for c in class_ids):
                idx = [column[int(c)] for c in class_ids]
                names, score_fn = PER_IMAGE_METRICS[metric]
                stacked = np.concatenate([stats.arrays[n][:, idx] for n in names], axis=1)
                return resampled_class_scores(stacked, weights, score_fn, len(names)), True
    values = rows[rows["step"] == step].set_index("class_id")["value"].reindex(class_ids).to_numpy(dtype=float)
    return np.broadcast_to(values, (resamples, len(class_ids))), False


# ---------------------------------------------------------------------------------------------- aggregates
def _aggregate(name: str, members: list[RunSeries], means: pd.DataFrame, unit_of, unit_word: str,
               config: BootstrapConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Intervals of every method's mean and of every continual method's difference to the best, in one draw."""
    ci_cols = ["method", *KEY, "ci_low", "ci_high", "ci_source"]
    sig_cols = SIGNIFICANCE_COLUMNS
    point = {(r.method, r.step, r.group, r.metric): float(r.mean) for r in means.itertuples()}
    if not config.enabled or not members:
        ci = means[["method", *KEY]].assign(ci_low=np.nan, ci_high=np.nan, ci_source="")
        return ci[ci_cols], _significance(name, point, {}, config)[sig_cols]
    units = sorted({unit_of(r) for r in members}, key=str)
    position = {u: i for i, u in enumerate(units)}
    unit_weights = (resample_weights(len(units), config.resamples, config.rng(f"units:{name}", 1))
                    if len(units) > 1 else np.ones((config.resamples, 1)))
    by_method: dict[str, list[RunSeries]] = {}
    for r in members:
        by_method.setdefault(r.method, []).append(r)
    samples, rows = {}, []
    for method, runs in by_method.items():
        for key in sorted({k for r in runs for k in r.values}):
            have = [r for r in runs if key in r.values]
            values = np.full((len(units), config.resamples), np.nan)
            for r in have:
                values[position[unit_of(r)]] = r.values[key]
            stat = combine_units(values, unit_weights)
            images = all(r.from_images[key] for r in have)
            several = len(have) > 1
            source = "+".join(s for s, on in (("images", images), (unit_word, several)) if on)
            low = high = np.nan
            if source:        # a single run without per-image statistics has no interval (and no test)
                samples[(method, *key)] = stat
                low, high = percentile_interval(stat, config.level)
            rows.append((method, *key, low, high, source))
    ci = pd.DataFrame(rows, columns=ci_cols)
    return ci, _significance(name, point, samples, config)[sig_cols]


def _significance(name: str, point: dict, samples: dict, config: BootstrapConfig) -> pd.DataFrame:
    """Per (step, group, metric): every continual method against the best continual one (by mean)."""
    cells: dict[tuple, dict[str, float]] = {}
    for (method, step, group, metric), mean in point.items():
        if method != JOINT and np.isfinite(mean):
            cells.setdefault((step, group, metric), {})[method] = mean
    rows = []
    for (step, group, metric), means in cells.items():
        if len(means) < 2:
            continue
        order = method_order(means)
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        reference = max(order, key=lambda m: (sign * means[m], -order.index(m)))
        ref = samples.get((reference, step, group, metric))
        for method in order:
            if method == reference:
                continue
            mine = samples.get((method, step, group, metric))
            low = high = np.nan
            if mine is not None and ref is not None:
                low, high = percentile_interval(mine - ref, config.level)
            rows.append((name, method, reference, step, group, metric, means[method] - means[reference],
                         low, high, significant(low, high)))
    return pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    from .summary import _sorted as sort_rows

    return sort_rows(frame) if len(frame) else frame
