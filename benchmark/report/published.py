"""Published numbers beside the user's: ``run_benchmark.py report DIR --published``.

``benchmark/report/published.csv`` holds results as the papers print them (one row per method, protocol
and metric: the old / new / all columns, i.e. classes of step 0, the classes added after it, and every
class, at the final step), with the backbone, the source paper and table, and the convention of its
'all' column. Only numbers with a checkable source are there (the paper's table, its repository's README,
or a maintainers' thread quoting it); a column the source does not print as one number is left empty
(per-step columns are kept in the note), never derived. The harness's columns are base / novel / seen at
the protocol's final step, which are the papers' old / new / all (``1-100 | 101-150 | all``).

Conventions that differ are stated row by row (``convention``): the harness's 'all' never counts ADE's
void (index 0; CoMFormer's semantic 'all' does), the backbone of the user's runs against the paper's
(e.g. MiB's DeepLab-v3 rows), and a secondary source.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.errors import DataError

PUBLISHED = Path(__file__).with_name("published.csv")
COLUMNS = ("old", "new", "all")
# the harness's summary group for each published column, at the final step
GROUP_OF = {"old": "base", "new": "novel", "all": "seen"}


def load_published(path: str | Path = PUBLISHED) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, keep_default_na=True)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the published numbers {path}: {err}",
                        hint="restore benchmark/report/published.csv") from None
    missing = {"method", "protocol", "metric", *COLUMNS, "backbone", "source", "table", "all_convention",
               "all_counts_void", "note"} - set(table.columns)
    if missing:
        raise DataError(f"{path} lacks the columns {sorted(missing)}", hint="restore benchmark/report/published.csv")
    return table


def compare(summary: pd.DataFrame, engines: dict[tuple[str, str], str],
            published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table: per published (method, protocol, metric, column) that the user's runs also have, the
    user's mean ± std over seeds at the final step, the published number, the difference (ours - theirs)
    and the conventions that differ. ``engines``: the model preset of the runs per (protocol, method)."""
    published = load_published() if published is None else published
    rows = []
    finals = summary.groupby("protocol")["step"].max()
    for pub in published.itertuples(index=False):
        if pub.protocol not in finals.index:
            continue
        ours = summary[(summary.protocol == pub.protocol) & (summary.method == pub.method)
                       & (summary.metric == pub.metric) & (summary.step == finals[pub.protocol])]
        if ours.empty:
            continue
        engine = engines.get((pub.protocol, pub.method), "?")
        for column in COLUMNS:
            theirs = getattr(pub, column)
            if pd.isna(theirs):
                continue
            match = ours[ours.group == GROUP_OF[column]]
            if match.empty:
                continue
            mine = match.iloc[0]
            differences = [f"backbone: {pub.backbone} vs our {engine} preset"]
            if column == "all" and str(pub.all_counts_void).lower() == "true":
                differences.append(f"their 'all' counts void ({pub.all_convention}); ours does not")
            if "secondary source" in str(pub.note):
                differences.append("secondary source")
            rows.append({"protocol": pub.protocol, "method": pub.method, "metric": pub.metric, "column": column,
                         "ours": mine["mean"], "ours_std": mine["std"], "n_seeds": int(mine["n_seeds"]),
                         "published": float(theirs), "difference": mine["mean"] - float(theirs),
                         "source": f"{pub.source}, {pub.table}", "convention": "; ".join(differences),
                         "note": "" if pd.isna(pub.note) else pub.note})
    return pd.DataFrame(rows, columns=["protocol", "method", "metric", "column", "ours", "ours_std", "n_seeds",
                                       "published", "difference", "source", "convention", "note"])


def markdown(comparison: pd.DataFrame, decimals: int = 1) -> str:
    """One table per protocol: ours ± std, published, difference, source and conventions."""
    from tabulate import tabulate

    if comparison.empty:
        return ("# Published numbers\n\nNone of the runs is on a protocol and method with published numbers "
                f"({PUBLISHED.name} covers ADE20K semantic and panoptic splits).\n")
    parts = ["# Published numbers beside ours (final step; ours: mean ± std over seeds)"]
    fmt = f"{{:.{decimals}f}}"
    for protocol, rows in comparison.groupby("protocol", sort=True):
        table = [[r.method, r.metric, r.column,
                  fmt.format(r.ours) + ("" if pd.isna(r.ours_std) else " ± " + fmt.format(r.ours_std)),
                  fmt.format(r.published), f"{r.difference:+.{decimals}f}", r.source, r.convention]
                 for r in rows.itertuples()]
        parts.append(f"## {protocol}\n\n" + tabulate(
            table, headers=["method", "metric", "column", "ours", "published", "ours - published", "source",
                            "conventions that differ"], tablefmt="github", disable_numparse=True))
    return "\n\n".join(parts) + "\n"
