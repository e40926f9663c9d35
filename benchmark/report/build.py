"""Write the whole report of a results folder; the ``run_benchmark.py report`` command.

Output folder (default ``RESULTS_DIR/report/``)::

    summary.csv                    protocol, method, step, group, metric, mean, std, n_seeds
    per_seed.csv                   the per-run group scores the summary averages
    tables.tex / tables.md         final-step tables in the papers' layout
    curves_<protocol>.png          per-step base / novel / seen per method
    heatmap_<protocol>_<method>.png  class x step scores
    report.json                    options, conventions, the runs included and the files written

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

from .plots import plot_curves, plot_heatmap
from .summary import ReportOptions, prepare, protocol_layouts, run_scores, summarize
from .tables import final_tables, latex_tables, markdown_tables, text_tables


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
    summary = summarize(scores)
    tables = final_tables(summary, layouts)

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("curves_*.png"), *out.glob("heatmap_*.png")]:
        old.unlink()
    written = [
        _write_text(out / "summary.csv", summary.to_csv(index=False, na_rep="", lineterminator="\n")),
        _write_text(out / "per_seed.csv", scores.to_csv(index=False, na_rep="", lineterminator="\n")),
        _write_text(out / "tables.tex", latex_tables(tables, options)),
        _write_text(out / "tables.md", markdown_tables(tables, options)),
    ]
    if options.plots:
        written += _plots(summary, prepared, layouts, out)
    runs = raw.drop_duplicates("run_dir")[["run_dir", "protocol", "method", "seed"]]
    steps = raw.groupby("run_dir")["step"].unique().map(lambda s: sorted(int(x) for x in s))
    info = {
        "results_dir": str(results_dir.resolve()),
        "options": options.to_dict(),
        "conventions": options.conventions(),
        "runs": [{**{k: (int(v) if k == "seed" else v) for k, v in r.items()}, "steps": steps[r["run_dir"]]}
                 for r in runs.to_dict("records")],
        "files": [p.name for p in written],
    }
    written.append(_write_text(out / "report.json", json.dumps(info, indent=2) + "\n"))
    return out


def final_table(results_dir: str | Path, protocols: Sequence[str] | None = None,
                options: ReportOptions = ReportOptions()) -> str:
    """The final-step base / novel / all tables as plain text (for the terminal after a run)."""
    raw = load_results(results_dir)
    if protocols is not None:
        raw = raw[raw["protocol"].isin(list(protocols))]
    if raw.empty:
        return f"no completed step under {results_dir}" + (f" for {', '.join(protocols)}" if protocols else "")
    summary = summarize(run_scores(prepare(raw, options)))
    return text_tables(final_tables(summary, protocol_layouts(raw, options)), options)


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
    return p


def report_main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``run_benchmark.py report``; ``argv`` are the arguments after ``report``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = write_report(args.results_dir, args.out,
                           ReportOptions(voc_background=args.voc_background, decimals=args.decimals,
                                         plots=not args.no_plots))
    except UserError as err:
        return err.report()
    print((out / "tables.md").read_text())
    print(f"report written to {out}")
    return 0


def _plots(summary, prepared, layouts, out: Path) -> list[Path]:
    written = []
    for name, layout in sorted(layouts.items()):
        written.append(plot_curves(summary, layout, out / f"curves_{_file_part(name)}.png"))
        for method in sorted(prepared.loc[prepared["protocol"] == name, "method"].unique()):
            written.append(plot_heatmap(prepared, layout, method,
                                        out / f"heatmap_{_file_part(name)}_{_file_part(method)}.png"))
    return written


def _write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def _file_part(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in str(name))


