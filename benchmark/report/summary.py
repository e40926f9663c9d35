"""From the long metrics table to per-run group scores and their mean/std over seeds (pure functions).

Conventions (recorded in every report, see :meth:`ReportOptions.conventions`):

- Classes are grouped per step by the step that introduced them (``class_step``), see
  :mod:`benchmark.metrics.groups`; a step only reports classes learned so far.
- A class without ground truth (NaN IoU / AP) is left out of every mean.
- Group score of one run = plain mean of the per-class scores of the group (MiB/PLOP/CoMFormer); the
  summary gives mean and sample standard deviation (ddof=1, NaN for one seed) over seeds.
- VOC background: counted as a base class (``base``, PLOP) or left out of every group (``exclude``, MiB).
- Joint (method ``joint``) has one step; it is reported at its protocol's final step.
- ``forgetting`` (group ``old``) and ``avg_incremental`` (group ``seen``) rows are given at the final
  step, computed on the protocol's primary metric (IoU for semantic, AP for instance) of each run that
  has every step, then averaged over seeds like the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from benchmark.errors import ConfigError, DataError
from benchmark.metrics.continual import average_incremental, forgetting_per_class, mean_forgetting
from benchmark.metrics.groups import GROUPS, VOC_BACKGROUND, check_voc_background, group_member, range_label
from benchmark.tasks import TASKS, task_for_metric

from .bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, BootstrapConfig

JOINT = "joint"
# Derived from the task registry (benchmark.tasks): each task's primary long-table metric, and long-table
# metric -> summary metric (per-class IoU averages to mIoU; AP keeps its name).
PRIMARY = {task.name: task.primary_metric for task in TASKS.values()}
SUMMARY_METRIC = {m: s for task in TASKS.values() for m, s in task.summary_metrics.items()}
METRIC_ORDER = tuple(SUMMARY_METRIC.values()) + ("forgetting", "avg_incremental")
METHOD_ORDER = ("finetune", "mib", "plop", "comformer", "cisdq", "cisdq-kl", "eclipse", "balconpas", "balconpas-r")
SUMMARY_COLUMNS = ["protocol", "method", "step", "group", "metric", "mean", "std", "n_seeds"]
CI_COLUMNS = ["ci_low", "ci_high", "ci_source"]
SCORE_COLUMNS = ["protocol", "method", "seed", "step", "group", "metric", "value"]


@dataclass(frozen=True)
class ReportOptions:
    """How to report. ``voc_background``: "base" (PLOP's 0-15) or "exclude" (MiB's 1-15); ``decimals`` in
    the tables; ``plots=False`` skips the PNGs (they take most of the time for 150-class heatmaps);
    ``resamples`` (0 = no intervals), ``ci_seed`` and ``confidence`` of the bootstrap
    (:mod:`benchmark.report.bootstrap`)."""

    voc_background: str = "base"
    decimals: int = 1
    plots: bool = True
    resamples: int = DEFAULT_RESAMPLES
    ci_seed: int = 0
    confidence: float = DEFAULT_LEVEL
    published: bool = False       # also write published.csv / published.md (benchmark.report.published)

    def __post_init__(self) -> None:
        check_voc_background(self.voc_background)
        if not isinstance(self.decimals, int) or not 0 <= self.decimals <= 4:
            raise ConfigError(f"decimals must be an integer 0..4, got {self.decimals!r}")
        self.bootstrap   # validates resamples and confidence

    @property
    def bootstrap(self) -> BootstrapConfig:
        return BootstrapConfig(resamples=self.resamples, seed=self.ci_seed, level=self.confidence)

    def conventions(self) -> dict[str, str]:
        """The conventions in words, written into every table file and report.json."""
        return {
            "voc_background": ("VOC background (class 0) counted as a base class (PLOP's '0-15')"
                               if self.voc_background == "base" else
                               "VOC background (class 0) excluded from every group (MiB's '1-15')"),
            "absent_classes": "classes without ground truth in the validation set are excluded from means",
            "groups": "base = step-0 classes, novel = classes of steps 1..t, old = steps < t, new = step t, "
                      "seen = steps <= t (all at the final step); future classes are never counted",
            "seeds": "mean and sample standard deviation (ddof=1) over seeds",
            "joint": "the joint upper bound is reported at the protocol's final step",
            "forgetting": "per class: max score over the steps from its introduction to the one before the "
                          "final, minus the final score; mean over old classes (percentage points)",
            "avg_incremental": "mean over steps of the seen-class score (PLOP's 'avg')",
            "intervals": (f"{100 * self.confidence:g}% percentile bootstrap, {self.resamples} resamples (seed "
                          f"{self.ci_seed}): validation images resampled with one draw shared by every method, seed "
                          "and class order of a split, scores recomputed from the resampled per-image tp/fp/fn "
                          "sums; with several runs the runs (seeds; orders x seeds) are resampled too. Instance AP "
                          "and runs without per_image.npz: intervals from the runs (seeds) only, none for one run"
                          if self.resamples else "no intervals (resamples = 0)"),
            "significance": "difference of each continual method to the best continual method (highest mean; lowest "
                            "forgetting) of the same step, group and metric, on the same resamples (paired); "
                            "significant when its interval excludes 0. Bold in the tables = best and significantly "
                            "better than the runner-up; a dagger marks methods statistically tied with the best",
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProtocolLayout:
    """What a table needs to know about a protocol, derived from its rows."""

    name: str
    task: str
    final_step: int
    metric: str                 # primary long-table metric of its task: "iou", "ap", ...
    base_label: str             # "1-100", "0-15"
    novel_label: str            # "101-150", "" when the protocol has a single step
    has_background: bool
    kinds: tuple[str, ...] = ()  # extra class partitions of its task scored at each step (panoptic: things, stuff)

    @property
    def summary_metric(self) -> str:
        return SUMMARY_METRIC[self.metric]


def prepare(df: pd.DataFrame, options: ReportOptions = ReportOptions()) -> pd.DataFrame:
    """Checked long table with the report's ``step`` (joint moved to the final step) and conventions applied.

    Raises DataError for mixed-up results: the same (protocol, method, seed) in two run folders, a
    protocol with both semantic and instance rows, class steps that disagree between runs.
    """
    if df.empty:
        raise DataError("no completed step in the results", hint="run the benchmark first; a step counts once its "
                                                                  "step_XX/DONE marker is written")
    df = df.copy()
    if "run_dir" in df.columns:
        owners = df.groupby(["protocol", "method", "seed"])["run_dir"].unique()
        clash = owners[owners.map(len) > 1]
        if len(clash):
            (protocol, method, seed), dirs = next(iter(clash.items()))
            raise DataError(f"{method} on {protocol} with seed {seed} is stored twice: {', '.join(sorted(dirs))}",
                            hint="move one of these run folders out of the results folder")
    dup = df.duplicated(["protocol", "method", "seed", "step", "class_id", "metric"])
    if dup.any():
        r = df[dup].iloc[0]
        raise DataError(f"duplicate rows for {r['method']} on {r['protocol']} seed {r['seed']} step {r['step']} "
                        f"class {r['class_id']}", hint="delete that run's metrics.csv and resume the run to rebuild it")
    for protocol, rows in df.groupby("protocol"):
        _check_class_steps(protocol, rows)
        tasks = sorted({task_for_metric(m).name for m in set(rows["metric"])})
        if len(tasks) > 1:
            raise DataError(f"protocol {protocol} has rows of several tasks ({', '.join(tasks)})",
                            hint="keep runs of one task per protocol name")
    final = df.groupby("protocol")["class_step"].max()
    joint = df["method"] == JOINT
    if joint.any():
        steps = df[joint].groupby(["protocol", "seed"])["step"].nunique()
        if (steps > 1).any():
            raise DataError(f"joint runs must have a single step; {steps[steps > 1].index[0]} has several",
                            hint="joint trains one step on every class of the protocol")
        df.loc[joint, "step"] = df.loc[joint, "protocol"].map(final).to_numpy()
    if options.voc_background == "exclude":
        df = df[~((df["class_id"] == VOC_BACKGROUND) & (df["class_step"] == 0))]
    return df.reset_index(drop=True)


def protocol_layouts(df: pd.DataFrame, options: ReportOptions = ReportOptions()) -> dict[str, ProtocolLayout]:
    """One layout per protocol of a *raw* (unprepared) long table; the background is read from class ids."""
    layouts = {}
    for protocol, rows in df.groupby("protocol"):
        classes = rows.drop_duplicates("class_id")[["class_id", "class_step"]]
        has_bg = bool(((classes["class_id"] == VOC_BACKGROUND) & (classes["class_step"] == 0)).any())
        fg = classes[classes["class_id"] != VOC_BACKGROUND] if has_bg else classes
        n_base, n_all = int((fg["class_step"] == 0).sum()), len(fg)
        first = 0 if has_bg and options.voc_background == "base" else 1
        task = task_for_metric(rows["metric"].iloc[0])
        metric = task.primary_metric
        final = int(classes["class_step"].max())
        kinds = tuple(k for k, ids in task.class_kinds(protocol).items() if ids)
        layouts[protocol] = ProtocolLayout(
            name=protocol, task=task.name, final_step=final, metric=metric,
            base_label=range_label([first, n_base]),
            novel_label=range_label(list(range(n_base + 1, n_all + 1))) if final > 0 else "",
            has_background=has_bg, kinds=kinds if len(kinds) > 1 else ())
    return layouts


def run_scores(prepared: pd.DataFrame) -> pd.DataFrame:
    """Per-run group scores (SCORE_COLUMNS) of a :func:`prepare`-d table, plus forgetting and avg_incremental.

    Besides the step groups, a task's class kinds (:meth:`Task.class_kinds`; panoptic "things" and "stuff")
    are groups too: the mean over the seen classes of that kind, as CoMFormer's PQ^th / PQ^st columns."""
    learned = prepared[(prepared["class_step"] <= prepared["step"]) & prepared["value"].notna()]
    keys = ["protocol", "method", "seed", "step", "metric"]
    parts = []
    for group in GROUPS:
        member = learned[group_member(group, learned["class_step"].to_numpy(), learned["step"].to_numpy())]
        means = member.groupby(keys, sort=False)["value"].mean().reset_index()
        parts.append(means.assign(group=group))
    for protocol, rows in learned.groupby("protocol", sort=False):
        task = task_for_metric(rows["metric"].iloc[0])
        for kind, ids in task.class_kinds(protocol).items():
            member = rows[rows["class_id"].isin(list(ids))]
            if len(member):
                means = member.groupby(keys, sort=False)["value"].mean().reset_index()
                parts.append(means.assign(group=kind))
    scores = pd.concat(parts, ignore_index=True)
    scores["metric"] = scores["metric"].map(SUMMARY_METRIC).fillna(scores["metric"])
    scores = pd.concat([scores, _continual_scores(prepared, scores)], ignore_index=True)
    return _sorted(scores[SCORE_COLUMNS], "seed")


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and number of seeds of every per-run score (SUMMARY_COLUMNS)."""
    grouped = scores.groupby(["protocol", "method", "step", "group", "metric"], sort=False)["value"]
    out = grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count").reset_index()
    return _sorted(out[SUMMARY_COLUMNS])


def method_order(methods) -> list[str]:
    """The papers' row order: known methods first, others alphabetically, joint last."""
    methods = set(methods)
    known = [m for m in METHOD_ORDER if m in methods]
    rest = sorted(methods - set(METHOD_ORDER) - {JOINT})
    return known + rest + ([JOINT] if JOINT in methods else [])


def _continual_scores(prepared: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    rows = []
    final = prepared.groupby("protocol")["class_step"].max()
    for (protocol, method, seed), run in prepared[prepared["method"] != JOINT].groupby(
            ["protocol", "method", "seed"], sort=False):
        t_final = int(final[protocol])
        metric = task_for_metric(run["metric"].iloc[0]).primary_metric
        run = run[run["metric"] == metric]
        if t_final == 0 or t_final not in set(run["step"]):
            continue
        wide = run.pivot(index="step", columns="class_id", values="value")
        class_steps = run.drop_duplicates("class_id").set_index("class_id")["class_step"]
        per_class = forgetting_per_class(wide, class_steps.to_dict(), t_final)
        old = class_steps[class_steps < t_final].index
        value = mean_forgetting(per_class, old)
        if np.isfinite(value):
            rows.append((protocol, method, seed, t_final, "old", "forgetting", value))
        seen = scores[(scores["protocol"] == protocol) & (scores["method"] == method) & (scores["seed"] == seed)
                      & (scores["group"] == "seen") & (scores["metric"] == SUMMARY_METRIC[metric])]
        avg = average_incremental(seen.set_index("step")["value"], t_final + 1)
        if np.isfinite(avg):
            rows.append((protocol, method, seed, t_final, "seen", "avg_incremental", avg))
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def _check_class_steps(protocol: str, rows: pd.DataFrame) -> None:
    """Every continual run of a protocol must agree on when each class is introduced."""
    continual = rows[rows["method"] != JOINT]
    steps = (continual if len(continual) else rows).groupby("class_id")["class_step"].nunique()
    if (steps > 1).any():
        raise DataError(f"runs of {protocol} disagree on the step of class {int(steps[steps > 1].index[0])}",
                        hint="runs of different class orders must have different protocol names (e.g. @b)")
    if len(continual):
        ref = continual.drop_duplicates("class_id").set_index("class_id")["class_step"]
        joint = rows[rows["method"] == JOINT].drop_duplicates("class_id").set_index("class_id")["class_step"]
        common = ref.index.intersection(joint.index)
        if len(joint) and not (ref[common] == joint[common]).all():
            raise DataError(f"the joint run of {protocol} records other class steps than its continual runs",
                            hint="joint rows must carry the continual protocol's class steps (pass the continual "
                                 "protocol to semantic_rows / instance_rows)")


def _sorted(frame: pd.DataFrame, *extra: str) -> pd.DataFrame:
    methods = method_order(frame["method"].unique())
    key = {
        "method": lambda s: s.map({m: i for i, m in enumerate(methods)}),
        "group": lambda s: s.map({g: i for i, g in enumerate(GROUPS)}).fillna(len(GROUPS)),
        "metric": lambda s: s.map({m: i for i, m in enumerate(METRIC_ORDER)}).fillna(len(METRIC_ORDER)),
    }
    by = ["protocol", "method", *extra, "step", "metric", "group"]
    return frame.sort_values(by, key=lambda s: key[s.name](s) if s.name in key else s,
                             kind="stable").reset_index(drop=True)
