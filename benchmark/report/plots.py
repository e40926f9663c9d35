"""Per-step curves and per-class heatmaps (matplotlib, Agg canvas; no pyplot global state).

- ``curves_<protocol>.png``: one panel per group (base, novel, seen), score after each step, one line per
  method with a mean ± std band over seeds (with one run: its bootstrap interval over validation images,
  when the summary has one); joint is a dashed horizontal line (its final score), the upper bound every
  curve is read against.
- ``curves_<split>_orders.png``: the same over the class orders of a split (bands = std over orders).
- ``heatmap_<protocol>_<method>.png``: class (rows, grouped by the step that introduced them) x step
  (columns), the per-class score averaged over seeds; grey = not learned yet, white = no ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from benchmark.tasks import get_task

from .summary import JOINT, METHOD_ORDER, ProtocolLayout, method_order
from .tables import METRIC_LABEL, display_name

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_DPI = 120


def method_colour(method: str, others: list[str]) -> str:
    """Stable colours: known methods keep theirs across protocols and figures."""
    ordered = list(METHOD_ORDER) + sorted(set(others) - set(METHOD_ORDER) - {JOINT})
    return _PALETTE[ordered.index(method) % len(_PALETTE)] if method in ordered else "#555555"


def plot_curves(summary: pd.DataFrame, layout: ProtocolLayout, path: str | Path, title: str | None = None) -> Path:
    """Per-step base / novel / seen scores of every method of ``layout.name``.

    ``title`` may contain ``{metric}``; default: the protocol's name, mean ± std over seeds.
    """
    rows = summary[(summary["protocol"] == layout.name) & (summary["metric"] == layout.summary_metric)]
    panels = [("base", f"base ({layout.base_label})"), ("novel", f"novel ({layout.novel_label})"),
              ("seen", "seen (= all at the last step)")] if layout.final_step > 0 else [("seen", "all classes")]
    methods = method_order(rows["method"].unique())
    metric = METRIC_LABEL.get(layout.summary_metric, layout.summary_metric)
    fig = Figure(figsize=(4.3 * len(panels), 4.2), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    steps = np.arange(layout.final_step + 1)
    top = 0.0
    for ax, (group, title) in zip(axes, panels):
        for method in methods:
            data = rows[(rows["method"] == method) & (rows["group"] == group)].sort_values("step")
            if data.empty:
                continue
            colour = method_colour(method, methods)
            mean, std = data["mean"].to_numpy(), data["std"].fillna(0.0).to_numpy()
            low, high = mean - std, mean + std
            if (data["n_seeds"] == 1).all() and "ci_low" in data and data["ci_low"].notna().any():
                low = data["ci_low"].fillna(data["mean"]).to_numpy()      # one run: its bootstrap interval
                high = data["ci_high"].fillna(data["mean"]).to_numpy()
            top = max(top, float(np.nanmax(high)))
            label = display_name(method)
            if method == JOINT:
                ax.axhline(mean[-1], color="black", linestyle="--", linewidth=1.3, label=f"{label} (upper bound)")
                if std[-1] > 0:
                    ax.axhspan(mean[-1] - std[-1], mean[-1] + std[-1], color="black", alpha=0.08, linewidth=0)
                continue
            ax.plot(data["step"], mean, marker="o", markersize=4, linewidth=1.8, color=colour, label=label)
            if (high > low).any():
                ax.fill_between(data["step"], low, high, color=colour, alpha=0.18, linewidth=0)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_xticks(steps if len(steps) <= 12 else steps[:: int(np.ceil(len(steps) / 12))])
        ax.set_xlim(-0.3, layout.final_step + 0.3)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%)")
    axes[0].set_ylim(0, min(100.0, top * 1.08 + 2) if top > 0 else 100.0)
    handles, labels = axes[-1].get_legend_handles_labels()
    for ax in axes[:-1]:   # methods missing from the last panel still get a legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    title = title or "{name}: {metric} after each step (mean ± std over seeds; one run: 95% bootstrap interval)"
    fig.suptitle(title.format(name=layout.name, metric=metric), fontsize=12)
    return _save(fig, path)


def plot_heatmap(rows: pd.DataFrame, layout: ProtocolLayout, method: str, path: str | Path) -> Path:
    """Class x step heatmap of one method on one protocol, from its :func:`prepare`-d long-table rows."""
    data = rows[(rows["protocol"] == layout.name) & (rows["method"] == method) & (rows["metric"] == layout.metric)]
    classes = data.drop_duplicates("class_id")[["class_id", "class_name", "class_step"]]
    classes = classes.sort_values("class_step", kind="stable").reset_index(drop=True)
    steps = sorted(data["step"].unique())
    grid = data.groupby(["class_id", "step"])["value"].mean().unstack("step").reindex(
        index=classes["class_id"], columns=steps)
    values = grid.to_numpy(dtype=float, copy=True)
    future = classes["class_step"].to_numpy()[:, None] > np.asarray(steps)[None, :]
    values[future] = np.nan

    n_cls, n_steps = values.shape
    font = 8 if n_cls <= 40 else 6.5
    height = 1.8 + 0.17 * max(n_cls, 14)
    fig = Figure(figsize=(max(6.0, 3.2 + 0.55 * n_steps), height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    ax.imshow(np.where(future, 1.0, np.nan), cmap=ListedColormap(["#c8c8c8"]), vmin=0, vmax=1, aspect="auto",
              interpolation="nearest")
    ax.set_facecolor("white")
    for boundary in np.flatnonzero(np.diff(classes["class_step"].to_numpy())):
        ax.axhline(boundary + 0.5, color="white", linewidth=1.5)
    if n_cls <= 30 and n_steps <= 12:
        for i, j in zip(*np.nonzero(np.isfinite(values))):
            ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if values[i, j] > 60 else "white")
    ax.set_xticks(range(n_steps), [str(s) for s in steps])
    ax.set_yticks(range(n_cls), [f"{name} ({cid})" for cid, name in zip(classes["class_id"], classes["class_name"])],
                  fontsize=font)
    ax.set_xlabel("step" if method != JOINT else "step (joint's single step, shown as the final one)")
    ax.set_ylabel("class (in order of introduction)")
    per_class = get_task(layout.task).per_class_label
    ax.set_title(f"{display_name(method)} on {layout.name}: per-class {per_class} (%)\n"
                 f"grey = not learned yet, white = no ground truth", fontsize=10)
    if n_cls <= 40:
        fig.colorbar(image, ax=ax, label=f"{per_class} (%)")
    else:   # a tall figure: a short horizontal colour bar on top, where the reader starts
        fig.colorbar(image, ax=ax, location="top", label=f"{per_class} (%)", shrink=0.6,
                     fraction=0.22 / height, pad=0.1 / height, aspect=30)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    from benchmark.store import atomic_write

    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))
    return path
