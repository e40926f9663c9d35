"""The reporter: pure functions from the long metrics table to tables (LaTeX, Markdown, CSV) and plots.

``write_report(results_dir, out_dir=None, options=ReportOptions()) -> Path`` writes everything;
``report_main(argv)`` is the ``run_benchmark.py report RESULTS_DIR [--out DIR] [--voc-background ...]
[--resamples N] [--ci-seed S]`` command. Confidence intervals and significance: :mod:`.bootstrap` (the
resampling, pure array functions) and :mod:`.intervals` (applied to a results folder); class orders: :mod:`.orders`.
"""

from .build import build_parser, final_table, report_main, write_report
from .summary import ProtocolLayout, ReportOptions, prepare, protocol_layouts, run_scores, summarize
from .tables import final_tables, latex_tables, markdown_tables, text_tables

__all__ = [
    "ProtocolLayout", "ReportOptions", "build_parser", "final_table", "final_tables", "latex_tables",
    "markdown_tables", "prepare", "protocol_layouts", "report_main", "run_scores", "summarize", "text_tables",
    "write_report",
]
