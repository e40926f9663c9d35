"""Class orders as an axis of the report: a split (a protocol without its ``@order``) over its class orders.

Runs of ``synth-10-5``, ``synth-10-5@rand1`` and ``synth-10-5@rand2`` are three orders of the split
``synth-10-5`` (``run_benchmark.py --orders 2`` makes them). Groups are defined by the step that introduced a
class, so "base", "novel" and "all" are comparable across orders even though their classes differ.

What is averaged (stated in report.json): for every (method, step, group, metric), first the mean over the
seeds of each order (the per-order summary row), then the mean and the sample standard deviation (ddof=1)
over the orders that have a row; ``default`` keeps the default order's own mean beside them. A split is
aggregated only when at least two of its orders are in the results.
"""

from __future__ import annotations

import pandas as pd

DEFAULT_ORDER = "default"
ORDERS_COLUMNS = ["split", "method", "step", "group", "metric", "mean", "std", "n_orders", "n_runs", "default"]
KEYS = ["method", "step", "group", "metric"]


def split_name(protocol: str) -> str:
    """``ade-100-10@rand3~synth`` -> ``ade-100-10~synth``; a name without an order is its own split."""
    head, _, rest = str(protocol).partition("@")
    if not rest:
        return head
    _, tilde, derivation = rest.partition("~")
    return head + (tilde + derivation if tilde else "")


def order_name(protocol: str) -> str:
    """``synth-10-5@rand1`` -> ``rand1``; ``default`` without a suffix."""
    _, has, rest = str(protocol).partition("@")
    return rest.partition("~")[0] if has else DEFAULT_ORDER


def splits_with_orders(protocols) -> dict[str, list[str]]:
    """``{split: [protocols]}`` for the splits with at least two orders (default order first, then by name)."""
    by_split: dict[str, list[str]] = {}
    for p in sorted(set(protocols)):
        by_split.setdefault(split_name(p), []).append(p)
    return {s: sorted(ps, key=lambda p: (order_name(p) != DEFAULT_ORDER, _order_key(order_name(p))))
            for s, ps in sorted(by_split.items()) if len(ps) > 1}


def orders_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over orders of the per-order means (ORDERS_COLUMNS), for every split with several orders."""
    frames = []
    for split, protocols in splits_with_orders(summary["protocol"].unique()).items():
        rows = summary[summary["protocol"].isin(protocols)]
        grouped = rows.groupby(KEYS, sort=False)
        out = grouped["mean"].agg(mean="mean", std=lambda v: v.std(ddof=1), n_orders="count").reset_index()
        out = out.merge(grouped["n_seeds"].sum().rename("n_runs").reset_index(), on=KEYS)
        default = rows[rows["protocol"].map(order_name) == DEFAULT_ORDER][KEYS + ["mean"]].rename(
            columns={"mean": "default"})
        out = out.merge(default, on=KEYS, how="left")
        frames.append(out.assign(split=split))
    if not frames:
        return pd.DataFrame(columns=ORDERS_COLUMNS)
    return pd.concat(frames, ignore_index=True)[ORDERS_COLUMNS]


def orders_info(raw: pd.DataFrame) -> list[dict]:
    """For report.json: per split, the orders and the seeds of every method that were averaged."""
    info = []
    for split, protocols in splits_with_orders(raw["protocol"].unique()).items():
        rows = raw[raw["protocol"].isin(protocols)].drop_duplicates(["protocol", "method", "seed"])
        info.append({
            "split": split,
            "orders": [order_name(p) for p in protocols],
            "protocols": protocols,
            "seeds": {m: {order_name(p): sorted(int(s) for s in g["seed"]) for p, g in r.groupby("protocol")}
                      for m, r in rows.groupby("method")},
            "averaged": "mean over the orders of each order's mean over seeds; std = sample std (ddof=1) over "
                        "orders; 'default' = the default order's mean; intervals: percentile bootstrap over "
                        "validation images (one draw shared by every order) and over (order, seed) runs",
        })
    return info


def _order_key(order: str) -> tuple:
    if order.startswith("rand") and order[4:].isdigit():
        return (1, int(order[4:]), "")
    return (0, 0, order)
