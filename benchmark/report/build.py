"""Write the whole report of a results folder; the ``run_benchmark.py report`` command.

Output folder (default ``RESULTS_DIR/report/``)::

    summary.csv                    protocol, method, step, group, metric, mean, std, n_seeds, ci_low, ci_high,
                                   ci_source (benchmark.report.intervals)
    significance.csv / .md         protocol, method, reference, step, group, metric, diff, ci_low, ci_high,
                                   significant: each continual method against the best one
    per_seed.csv                   the per-run group scores the summary averages
    orders.csv                     splits run in several class orders: mean / std over orders, n_orders,
                                   n_runs, the default order's mean, ci_low, ci_high, ci_source
    orders_significance.csv        the significance table of those splits (column split instead of protocol)
    tables.tex / tables.md         final-step tables in the papers' layout (+ over-orders and per-order tables)
    curves_<protocol>.png          per-step base / novel / seen per method
    curves_<split>_orders.png      the same over class orders (bands = std over orders)
    heatmap_<protocol>_<method>.png  class x step scores
    report.json                    options, conventions, the runs included, what was averaged over orders,
                                   the bootstrap settings and the files written

Plots of an earlier report in the same folder are removed first, so none is left from a run that is gone
(also with ``--no-plots``: the folder never mixes files of two reports).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from benchmark.errors import DataError, UserError
from benchmark.metrics.groups import VOC_BACKGROUND_OPTIONS
from benchmark.store import atomic_write, load_results

from .intervals import Intervals, compute_intervals
from .bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from .orders import orders_info, orders_summary, split_name
from .plots import plot_curves, plot_heatmap
from .summary import ReportOptions, prepare, protocol_layouts, run_scores, summarize
from .tables import final_tables, latex_tables, markdown_tables, order_tables, significance_markdown, text_tables


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 options: ReportOptions = ReportOptions()) -> Path:
    """Read every run under ``results_dir`` and write the report; returns the output folder."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    raw = load_results(results_dir)
    if raw.empty:
        raise DataError(f"no completed run under {results_dir}",
                        hint="a run folder has run.json and metrics.csv; run the benchmark with --out pointing here")
    prepared = prepare(raw, options)
    layouts = protocol_layouts(raw, options)
    scores = run_scores(prepared)
    iv = analyse(results_dir, prepared, scores, options)
    tables = final_tables(iv.summary, layouts, iv.significance)
    by_order = order_tables(iv, layouts)

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("curves_*.png"), *out.glob("heatmap_*.png"), *out.glob("orders*.csv")]:
        old.unlink()
    written = [
        _write_text(out / "summary.csv", _csv(iv.summary)),
        _write_text(out / "significance.csv", _csv(iv.significance)),
        _write_text(out / "significance.md", significance_markdown(iv, options)),
        _write_text(out / "per_seed.csv", _csv(scores)),
        _write_text(out / "tables.tex", latex_tables(tables, options, by_order)),
        _write_text(out / "tables.md", markdown_tables(tables, options, by_order)),
    ]
    if iv.orders is not None and len(iv.orders):
        written += [_write_text(out / "orders.csv", _csv(iv.orders)),
                    _write_text(out / "orders_significance.csv", _csv(iv.orders_significance))]
    costs = cost_rows(results_dir, raw)
    if len(costs):
        written += [_write_text(out / "cost.csv", _csv(costs)), _write_text(out / "cost.md", cost_markdown(costs))]
    if options.published:
        from benchmark.report.published import compare, markdown

        comparison = compare(iv.summary, _engines(results_dir, raw))
        written += [_write_text(out / "published.csv", _csv(comparison)),
                    _write_text(out / "published.md", markdown(comparison, options.decimals))]
    if options.plots:
        written += _plots(iv, prepared, layouts, out)
    runs = raw.drop_duplicates("run_dir")[["run_dir", "protocol", "method", "seed"]]
    steps = raw.groupby("run_dir")["step"].unique().map(lambda s: sorted(int(x) for x in s))
    info = {
        "results_dir": str(results_dir.resolve()),
        "options": options.to_dict(),
        "conventions": options.conventions(),
        "runs": [{**{k: (int(v) if k == "seed" else v) for k, v in r.items()}, "steps": steps[r["run_dir"]]}
                 for r in runs.to_dict("records")],
        "bootstrap": iv.info,
        "orders": orders_info(raw),
        "files": [p.name for p in written],
    }
    written.append(_write_text(out / "report.json", json.dumps(info, indent=2) + "\n"))
    return out


COST_FIELDS = ("wall_time_s", "images_per_s", "device_hours", "peak_memory_mib", "trainable_params", "total_params")


def cost_rows(results_dir: str | Path, raw) -> "pd.DataFrame":
    """One row per stored step with a cost record (the ``cost`` of its DONE marker): protocol, method, seed,
    step, the cost fields, the memory kind and ``reused_from`` (a shared step 0 trained in another folder)."""
    import pandas as pd

    from benchmark.store import RunStore

    rows = []
    for run_dir, run in raw.groupby("run_dir", sort=True):
        store, first = RunStore(Path(results_dir) / run_dir), run.iloc[0]
        for step in store.done_steps():
            cost = store.done_record(step).get("cost")
            if cost:
                rows.append({"protocol": first["protocol"], "method": first["method"], "seed": int(first["seed"]),
                             "step": int(step), **{k: cost.get(k) for k in COST_FIELDS},
                             "peak_memory_kind": cost.get("peak_memory_kind"),
                             "reused_from": cost.get("reused_from", "")})
    return pd.DataFrame(rows)


def _engines(results_dir: Path, raw) -> dict[tuple[str, str], str]:
    """The model preset of each (protocol, method), from the runs' run.json ("?" when not recorded)."""
    from benchmark.store import RunStore

    engines = {}
    for run_dir, run in raw.groupby("run_dir", sort=True):
        config = (RunStore(Path(results_dir) / run_dir).read_run_json() or {}).get("config", {})
        engines[(run.iloc[0]["protocol"], run.iloc[0]["method"])] = config.get("engine", "?")
    return engines


def cost_markdown(costs) -> str:
    """Per protocol a method x step table of the mean cost over seeds (wall time, images/s, peak memory,
    trainable parameters); a shared step 0 is marked, since its training was paid once."""
    from tabulate import tabulate

    parts = []
    for protocol, rows in costs.groupby("protocol", sort=True):
        means = rows.groupby(["method", "step"], sort=True).agg(
            wall=("wall_time_s", "mean"), speed=("images_per_s", "mean"), memory=("peak_memory_mib", "max"),
            trainable=("trainable_params", "max"), total=("total_params", "max"),
            shared=("reused_from", lambda v: any(bool(x) for x in v)), seeds=("seed", "nunique")).reset_index()
        table = [[r.method, r.step, f"{r.wall:.1f}" + (" (shared)" if r.shared else ""), f"{r.speed:.2f}",
                  f"{r.memory:.0f}", f"{int(r.trainable):,} / {int(r.total):,}", r.seeds]
                 for r in means.itertuples()]
        parts.append(f"## {protocol}\n\n" + tabulate(
            table, headers=["method", "step", "train s", "images/s", "peak MiB", "trainable / total params", "seeds"],
            tablefmt="github"))
    return "# Cost per step (means over seeds; memory and parameters: max)\n\n" + "\n\n".join(parts) + "\n"


def analyse(results_dir: str | Path, prepared, scores, options: ReportOptions) -> Intervals:
    """Summary over seeds, the aggregate over class orders, their intervals and the significance tables."""
    summary = summarize(scores)
    return compute_intervals(results_dir, prepared, summary, options.bootstrap, orders_summary(summary))


def final_table(results_dir: str | Path, protocols: Sequence[str] | None = None,
                options: ReportOptions = ReportOptions()) -> str:
    """The final-step base / novel / all tables as plain text (for the terminal after a run)."""
    raw = load_results(results_dir)
    if protocols is not None:
        raw = raw[raw["protocol"].isin(list(protocols))]
    if raw.empty:
        return f"no completed step under {results_dir}" + (f" for {', '.join(protocols)}" if protocols else "")
    layouts = protocol_layouts(raw, options)
    prepared = prepare(raw, options)
    iv = analyse(results_dir, prepared, run_scores(prepared), options)
    return text_tables(final_tables(iv.summary, layouts, iv.significance), options, order_tables(iv, layouts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmark.py report",
        description="Tables (LaTeX, Markdown, CSV) and plots from every run under RESULTS_DIR.")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="folder holding the run folders (the runs' --out)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: RESULTS_DIR/report)")
    p.add_argument("--voc-background", choices=VOC_BACKGROUND_OPTIONS, default="base",
                   help="VOC background: count it as a base class (PLOP's 0-15, default) or exclude it from every "
                        "group (MiB's 1-15)")
    p.add_argument("--decimals", type=int, choices=range(0, 5), default=1, metavar="{0..4}",
                   help="decimals in the tables (default 1)")
    p.add_argument("--no-plots", action="store_true", help="only the CSV and table files (no PNG)")
    p.add_argument("--published", action="store_true",
                   help="also put the published numbers (benchmark/report/published.csv) next to the runs' "
                        "final-step numbers, with the difference and the conventions that differ "
                        "(published.csv, published.md)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                   help=f"bootstrap resamples of the confidence intervals (default {DEFAULT_RESAMPLES}; 0 = none)")
    p.add_argument("--ci-seed", type=int, default=0, metavar="S", help="seed of the bootstrap draws (default 0)")
    p.add_argument("--confidence", type=float, default=DEFAULT_LEVEL, metavar="L",
                   help=f"two-sided confidence level of the intervals (default {DEFAULT_LEVEL})")
    return p


def report_main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``run_benchmark.py report``; ``argv`` are the arguments after ``report``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = write_report(args.results_dir, args.out,
                           ReportOptions(voc_background=args.voc_background, decimals=args.decimals,
                                         plots=not args.no_plots, resamples=args.resamples, ci_seed=args.ci_seed,
                                         confidence=args.confidence, published=args.published))
    except UserError as err:
        return err.report()
    print((out / "tables.md").read_text())
    if args.published:
        print((out / "published.md").read_text())
    print(f"report written to {out}")
    return 0


def _plots(iv: Intervals, prepared, layouts, out: Path) -> list[Path]:
    written = []
    for name, layout in sorted(layouts.items()):
        written.append(plot_curves(iv.summary, layout, out / f"curves_{_file_part(name)}.png"))
        for method in sorted(prepared.loc[prepared["protocol"] == name, "method"].unique()):
            written.append(plot_heatmap(prepared, layout, method,
                                        out / f"heatmap_{_file_part(name)}_{_file_part(method)}.png"))
    if iv.orders is not None:
        for split, rows in iv.orders.groupby("split"):
            layout = next(layouts[p] for p in layouts if split_name(p) == split)
            frame = rows.rename(columns={"split": "protocol"}).assign(
                protocol=layout.name, n_seeds=rows["n_orders"])
            written.append(plot_curves(frame, layout, out / f"curves_{_file_part(split)}_orders.png",
                                       title=f"{split}: {{metric}} after each step (mean ± std over "
                                             f"{int(rows['n_orders'].max())} class orders)"))
    return written


def _csv(frame) -> str:
    return frame.to_csv(index=False, na_rep="", lineterminator="\n")


def _write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def _file_part(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in str(name))


