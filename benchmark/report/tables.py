"""Final-step tables in the papers' layout: one row per method (joint last), base | novel | all columns.

Each cell is the group score after the protocol's final step (mIoU for semantic, mask AP for instance):
``mean ± std`` when a method has several runs (seeds; class orders in the over-orders tables), ``mean ± h``
with ``h`` the half-width of the bootstrap interval when it has one run with an interval, the mean alone
otherwise; the caption says which. Marks (per column, continual methods only: joint is the upper bound, not
a competitor): the best continual method is **bold** only where its difference to the runner-up is
significant (the runner-up's row of significance.csv); where it is not, the best and every method not
significantly different from it carry a dagger (a statistical tie) and nothing is bold. Where no interval
exists (one run without per-image statistics), the highest printed mean is bold as before (ties on the
printed value all bold) and the caption says that significance was not tested. The terminal table adds how
many runs stand behind each row. Column headers are class ranges by position in the protocol's class order,
e.g. ``1-100 | 101-150 | all`` for ADE 100-x, ``0-15 | 16-20 | all`` for VOC with the background in base.

Splits run in several class orders get two more tables: the aggregate over orders (mean ± std over orders,
plus the default order's own "all" score) and a per-order table (the "all" score of every order).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark.tasks import TASKS

from .orders import DEFAULT_ORDER, order_name, splits_with_orders
from .summary import JOINT, ProtocolLayout, ReportOptions, method_order

DISPLAY_NAMES = {"finetune": "Fine-tuning", "joint": "Joint", "mib": "MiB", "plop": "PLOP",
                 "comformer": "CoMFormer", "cisdq": "CisDQ", "cisdq-kl": "CisDQ (KL)",
                 "eclipse": "ECLIPSE", "balconpas": "BalConpas", "balconpas-r": "BalConpas (replay)"}
METRIC_LABEL = {m: label for task in TASKS.values() for m, label in task.metric_labels.items()}
TIE = "†"
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
NAN = float("nan")


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    n_seeds: int
    ci_low: float = NAN
    ci_high: float = NAN
    n_runs: int = 0             # over-orders cells: the runs (orders x seeds) behind the mean

    @property
    def missing(self) -> bool:
        return not np.isfinite(self.mean)

    @property
    def half_width(self) -> float:
        """Half the width of the bootstrap interval (NaN without one)."""
        return (self.ci_high - self.ci_low) / 2 if np.isfinite(self.ci_low) and np.isfinite(self.ci_high) else NAN

    @property
    def spread(self) -> tuple[str, float]:
        """What follows '±': ("std", s) with several runs, ("ci", h) with one run and an interval, else ("", nan)."""
        if self.n_seeds >= 2 and np.isfinite(self.std):
            return "std", self.std
        if self.n_seeds == 1 and np.isfinite(self.half_width):
            return "ci", self.half_width
        return "", NAN


@dataclass(frozen=True)
class FinalTable:
    """One table: ``cells[method][column]`` with ``columns`` = (group, header) pairs.

    ``significance[group][method]`` = whether the method differs significantly from ``reference[group]``
    (None: not tested). ``kind``: "protocol", "orders" (a split over its class orders) or "per-order";
    ``orders``: the class orders of an over-orders table.
    """

    layout: ProtocolLayout
    columns: tuple[tuple[str, str], ...]
    methods: tuple[str, ...]
    cells: dict
    reference: dict = field(default_factory=dict)
    significance: dict = field(default_factory=dict)
    kind: str = "protocol"
    orders: tuple[str, ...] = ()

    def best(self, decimals: int) -> dict[str, set[str]]:
        """Per group, the continual methods with the highest printed mean."""
        out = {}
        for group, _ in self.columns:
            printed = {m: float(round_half_up(c.mean, decimals)) for m in self.methods if m != JOINT
                       for c in [self.cells[m][group]] if not c.missing}
            top = max(printed.values(), default=None)
            out[group] = {m for m, v in printed.items() if v == top} if len(printed) > 1 else set()
        return out

    def marks(self, decimals: int) -> dict[str, dict[str, str]]:
        """Per column, ``{method: "bold" | "tie"}`` (see the module docstring)."""
        if self.kind == "per-order":
            return {g: {} for g, _ in self.columns}
        best = self.best(decimals)
        out = {}
        for group, _ in self.columns:
            if group == "default":          # the default order's column beside an over-orders table
                out[group] = {}
                continue
            tests = self.significance.get(group, {})
            reference = self.reference.get(group)
            runner_up = max(tests, key=lambda m: self.cells[m][group].mean, default=None)
            verdict = tests.get(runner_up)
            if reference is None or verdict is None:          # not tested: the highest printed mean
                out[group] = {m: "bold" for m in best.get(group, set())}
            elif verdict:
                out[group] = {reference: "bold"}
            else:
                out[group] = {reference: "tie", **{m: "tie" for m, v in tests.items() if v is False}}
        return out

    def tested(self) -> bool:
        return any(v is not None for tests in self.significance.values() for v in tests.values())


def final_tables(summary: pd.DataFrame, layouts: dict[str, ProtocolLayout],
                 significance: pd.DataFrame | None = None) -> list[FinalTable]:
    """The final-step table of every protocol in ``layouts`` (alphabetical), from a summary frame."""
    tables = []
    for name in sorted(layouts):
        layout = layouts[name]
        columns = _group_columns(layout)
        rows = summary[(summary["protocol"] == name) & (summary["step"] == layout.final_step)
                       & (summary["metric"] == layout.summary_metric)]
        methods = tuple(method_order(summary.loc[summary["protocol"] == name, "method"].unique()))
        cells = {m: _cells(rows[rows["method"] == m], columns, "n_seeds") for m in methods}
        sig = _significance_of(significance, "protocol", name, layout)
        tables.append(FinalTable(layout, columns, methods, cells, *sig))
    return tables


def order_tables(intervals, layouts: dict[str, ProtocolLayout]) -> list[FinalTable]:
    """Per split with several class orders: the over-orders table and the per-order table."""
    orders, summary = intervals.orders, intervals.summary
    if orders is None or not len(orders):
        return []
    tables = []
    for split, protocols in splits_with_orders(layouts).items():
        layout = replace(layouts[protocols[0]], name=split, kinds=())
        columns = _group_columns(layout)
        rows = orders[(orders["split"] == split) & (orders["step"] == layout.final_step)
                      & (orders["metric"] == layout.summary_metric)]
        methods = tuple(method_order(rows["method"].unique()))
        has_default = any(order_name(p) == DEFAULT_ORDER for p in protocols)
        all_columns = columns + ((("default", "all (default order)"),) if has_default else ())
        cells = {}
        for m in methods:
            mine = rows[rows["method"] == m]
            cells[m] = _cells(mine, columns, "n_orders")
            if has_default:
                seen = mine[mine["group"] == "seen"]
                cells[m]["default"] = Cell(float(seen["default"].iloc[0]) if len(seen) else NAN, NAN, 1)
        sig = _significance_of(intervals.orders_significance, "split", split, layout)
        order_list = tuple(order_name(p) for p in protocols)
        tables.append(FinalTable(layout, all_columns, methods, cells, *sig, kind="orders", orders=order_list))
        per_order_columns = tuple((p, order_name(p)) for p in protocols)
        per = summary[summary["protocol"].isin(protocols) & (summary["step"] == layout.final_step)
                      & (summary["metric"] == layout.summary_metric) & (summary["group"] == "seen")]
        per_cells = {m: {p: _cell(per[(per["method"] == m) & (per["protocol"] == p)], "n_seeds")
                         for p, _ in per_order_columns} for m in methods}
        tables.append(FinalTable(layout, per_order_columns, methods, per_cells, kind="per-order", orders=order_list))
    return tables


def _group_columns(layout: ProtocolLayout) -> tuple[tuple[str, str], ...]:
    return ((("base", layout.base_label), ("novel", layout.novel_label)) if layout.final_step > 0 else ()) \
        + (("seen", "all"),) + tuple((kind, f"{TASKS[layout.task].metric_labels[layout.summary_metric]} {kind}")
                                     for kind in layout.kinds)


def _cell(row: pd.DataFrame, count: str) -> Cell:
    if not len(row):
        return Cell(NAN, NAN, 0)
    r = row.iloc[0]
    return Cell(float(r["mean"]), float(r["std"]), int(r[count]), float(r.get("ci_low", NAN)),
                float(r.get("ci_high", NAN)), int(r.get("n_runs", r[count])))


def _cells(rows: pd.DataFrame, columns, count: str) -> dict[str, Cell]:
    return {g: _cell(rows[rows["group"] == g], count) for g, _ in columns}


def _significance_of(significance: pd.DataFrame | None, key: str, name: str, layout: ProtocolLayout):
    """``(reference, significance)`` dicts per group of the final step's primary metric."""
    reference, tests = {}, {}
    if significance is None or not len(significance):
        return reference, tests
    rows = significance[(significance[key] == name) & (significance["step"] == layout.final_step)
                        & (significance["metric"] == layout.summary_metric)]
    for group, g in rows.groupby("group"):
        reference[group] = str(g["reference"].iloc[0])
        tests[group] = {str(r.method): (None if pd.isna(r.significant) else bool(r.significant))
                        for r in g.itertuples()}
    return reference, tests


def latex_tables(tables: list[FinalTable], options: ReportOptions = ReportOptions(),
                 order_tables: list[FinalTable] = ()) -> str:
    """booktabs tables, one per protocol, then the over-orders ones (needs ``\\usepackage{booktabs}``)."""
    parts = ["% Generated by the benchmark reporter (python run_benchmark.py report).",
             "% Requires \\usepackage{booktabs}. Conventions:"]
    parts += [f"%   {k}: {v}" for k, v in options.conventions().items()]
    for table in [*tables, *order_tables]:
        marks = table.marks(options.decimals)
        header = " & ".join(["Method"] + [latex_escape(h).replace("-", "--") for _, h in table.columns])
        body = []
        for method in table.methods:
            if method == JOINT and len(table.methods) > 1:
                body.append("    \\midrule")
            cells = [_latex_cell(table.cells[method][g], options.decimals, marks.get(g, {}).get(method))
                     for g, _ in table.columns]
            body.append("    " + " & ".join([latex_escape(display_name(method))] + cells) + r" \\")
        parts += [
            "",
            r"\begin{table}[t]",
            r"  \centering",
            f"  \\caption{{{_latex_caption(table, options)}}}",
            f"  \\label{{tab:{_label(table.layout.name)}{_label_suffix(table)}}}",
            f"  \\begin{{tabular}}{{l{'c' * len(table.columns)}}}",
            r"    \toprule",
            f"    {header} \\\\",
            r"    \midrule",
            *body,
            r"    \bottomrule",
            r"  \end{tabular}",
            r"\end{table}",
        ]
    return "\n".join(parts) + "\n"


def markdown_tables(tables: list[FinalTable], options: ReportOptions = ReportOptions(),
                    order_tables: list[FinalTable] = ()) -> str:
    """GitHub-flavoured Markdown (tabulate), one section per protocol, conventions listed first."""
    parts = ["# Final-step results", "", "Conventions:", ""]
    parts += [f"- {k}: {v}" for k, v in options.conventions().items()]
    for table in tables:
        parts += ["", f"## {table.layout.name}", "", _caption(table, options), "",
                  _tabulate(table, options, "github", bold="**")]
    if order_tables:
        parts += ["", "# Over class orders"]
    for table in order_tables:
        title = "per order" if table.kind == "per-order" else f"over {len(table.orders)} class orders"
        parts += ["", f"## {table.layout.name}, {title}", "", _caption(table, options), "",
                  _tabulate(table, options, "github", bold="**")]
    return "\n".join(parts) + "\n"


def text_tables(tables: list[FinalTable], options: ReportOptions = ReportOptions(),
                order_tables: list[FinalTable] = ()) -> str:
    """Plain-text tables for the terminal, with the number of runs behind each row."""
    parts = []
    for table in [*tables, *order_tables]:
        parts += [_caption(table, options), _tabulate(table, options, "simple", bold="", runs=True), ""]
    return "\n".join(parts).rstrip() + "\n"


def significance_markdown(intervals, options: ReportOptions = ReportOptions()) -> str:
    """significance.csv (and orders_significance.csv) as Markdown: final-step rows first, then every step."""
    level = f"{100 * options.confidence:g}%"
    parts = ["# Differences to the best continual method", "",
             f"diff = method - reference (the best continual method of the step, group and metric), in points; "
             f"[low, high] = its {level} paired bootstrap interval ({options.resamples} resamples, seed "
             f"{options.ci_seed}); significant = the interval excludes 0. Empty interval: no interval (one run "
             "without per-image statistics).", ""]
    for title, frame, key in (("Protocols", intervals.significance, "protocol"),
                              ("Splits over class orders", intervals.orders_significance, "split")):
        if frame is None or not len(frame):
            continue
        parts += [f"## {title}", ""]
        rows = [[r[key], display_name(r["method"]), display_name(r["reference"]), int(r["step"]), r["group"],
                 r["metric"], _num(r["diff"], options.decimals),
                 "" if pd.isna(r["ci_low"]) else f"[{_num(r['ci_low'], options.decimals)}, "
                                                  f"{_num(r['ci_high'], options.decimals)}]",
                 "" if pd.isna(r["significant"]) else ("yes" if bool(r["significant"]) else "no")]
                for _, r in frame.iterrows()]
        parts += [tabulate(rows, headers=[key, "method", "reference", "step", "group", "metric", "diff", "interval",
                                          "significant"], tablefmt="github", disable_numparse=True), ""]
    if len(parts) == 5:
        parts.append("No comparison: every protocol has at most one continual method.")
    return "\n".join(parts).rstrip() + "\n"


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def format_cell(cell: Cell, decimals: int, pm: str = " ± ") -> str:
    """``mean ± std`` (several runs), ``mean ± half-width`` (one run with an interval), else the mean."""
    if cell.missing:
        return "–"
    mean = round_half_up(cell.mean, decimals)
    kind, value = cell.spread
    return f"{mean}{pm}{round_half_up(value, decimals)}" if kind else mean


def round_half_up(value: float, decimals: int) -> str:
    """Printed as the papers do (65.25 -> 65.3), not Python's round-half-to-even (65.2)."""
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def _num(value: float, decimals: int) -> str:
    return round_half_up(value, decimals) if np.isfinite(value) else ""


def _latex_cell(cell: Cell, decimals: int, mark: str | None) -> str:
    if cell.missing:
        return "--"
    text = format_cell(cell, decimals, pm=r"$\pm$")
    if mark == "tie":
        return f"{text}$^\\dagger$"
    return f"\\textbf{{{text}}}" if mark == "bold" else text


def _tabulate(table: FinalTable, options: ReportOptions, fmt: str, bold: str, runs: bool = False) -> str:
    marks = table.marks(options.decimals)
    rows = []
    for method in table.methods:
        cells = []
        for g, _ in table.columns:
            text = format_cell(table.cells[method][g], options.decimals)
            mark = marks.get(g, {}).get(method)
            if mark == "tie":
                text += TIE
            elif mark == "bold" and bold:
                text = f"{bold}{text}{bold}"
            cells.append(text)
        row = [display_name(method)] + cells
        if runs:
            row.append(_runs_label(table, method))
        rows.append(row)
    headers = ["Method"] + [h for _, h in table.columns] + (["runs"] if runs else [])
    return tabulate(rows, headers=headers, tablefmt=fmt,
                    colalign=("left",) + ("center",) * len(table.columns) + (("left",) if runs else ()),
                    disable_numparse=True)


def _runs_label(table: FinalTable, method: str) -> str:
    """'3 seeds', '1-3 seeds', '2 orders, 4 runs': the runs behind the row's numbers."""
    cells = [c for g, c in table.cells[method].items() if not c.missing and g != "default"]
    if not cells:
        return ""

    def span(values) -> str:
        values = sorted(set(values))
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    plural = "s" if max(c.n_seeds for c in cells) != 1 else ""
    if table.kind == "orders":
        return f"{span(c.n_seeds for c in cells)} order{plural}, {span(c.n_runs for c in cells)} runs"
    return f"{span(c.n_seeds for c in cells)} seed{plural}"


def _caption(table: FinalTable, options: ReportOptions) -> str:
    layout = table.layout
    metric = METRIC_LABEL.get(layout.summary_metric, layout.summary_metric)
    if table.kind == "per-order":
        return (f"{layout.name}: {metric} (%) over all classes after the final step (step {layout.final_step}) in "
                f"each class order ({', '.join(table.orders)}), mean ± std over seeds.")
    text = f"{layout.name}: {metric} (%) after the final step (step {layout.final_step})"
    word = "class orders" if table.kind == "orders" else "seeds"
    continual = _seed_range(table, lambda m: m != JOINT)
    joint = _seed_range(table, lambda m: m == JOINT)
    if continual not in ("", "1"):
        text += f", mean ± std over {continual} {word}"
        if joint and joint != continual:
            text += f" (joint: {joint})"
    elif joint not in ("", "1"):
        text += f", joint: mean ± std over {joint} {word}"
    if table.kind == "orders":
        text += f" ({', '.join(table.orders)}) of each order's mean over seeds"
        if any(g == "default" for g, _ in table.columns):
            text += "; last column: the default order alone"
    if any(c.spread[0] == "ci" for m in table.methods for c in table.cells[m].values()):
        text += (f"; one run: ± half-width of the {100 * options.confidence:g}% bootstrap interval over "
                 "validation images")
    if layout.has_background:
        text += ("; background counted in base" if options.voc_background == "base"
                 else "; background excluded")
    if sum(m != JOINT for m in table.methods) > 1:
        if table.tested():
            text += (f"; bold: best continual method, significantly better than the runner-up "
                     f"({100 * options.confidence:g}% paired bootstrap); {TIE}: statistically tied with the best")
        else:
            text += "; best continual method in bold (not tested for significance: no interval)"
    return text + "."


def _seed_range(table: FinalTable, keep) -> str:
    """'3' or '2-3': the numbers of runs behind the cells of the kept methods ('' if none)."""
    counts = sorted({c.n_seeds for m in table.methods if keep(m) for g, c in table.cells[m].items()
                     if not c.missing and g != "default"})
    return "" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _latex_caption(table: FinalTable, options: ReportOptions) -> str:
    return latex_escape(_caption(table, options)).replace("±", r"$\pm$").replace(TIE, r"$^\dagger$")


def _label(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-:." else "-" for ch in name)


def _label_suffix(table: FinalTable) -> str:
    return {"orders": ":orders", "per-order": ":per-order"}.get(table.kind, "")
