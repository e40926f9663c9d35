"""The JSON (exactly :data:`JSON_KEYS`) and the Markdown tables of a performance run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmark.perf.bootstrap import GOAL_SECONDS as BOOTSTRAP_GOAL
from benchmark.perf.bootstrap import BootstrapTiming
from benchmark.perf.cases import all_cases
from benchmark.perf.settings import CONFUSION_GOAL, ENGINE_GOAL, LOADER_GOAL, METHOD_GOALS
from benchmark.perf.suite import METHODS, PerfResult

JSON_KEYS = (
    "engine_step_ratio_vs_transformers",
    "method_step_ratio_vs_finetune",
    "confusion_speedup_vs_torchmetrics",
    "loader_to_train_throughput",
    "peak_memory_mib",
)

CASE_LABELS = {
    "engine_step": "engine training step (fine-tune, step 0)",
    "transformers_step": "transformers Mask2FormerForUniversalSegmentation step",
    "confusion": "confusion accumulation (benchmark.metrics)",
    "confusion_torchmetrics": "confusion accumulation (torchmetrics MulticlassJaccardIndex)",
    "loader": "training data loader",
}


def _round(value: float) -> float:
    return round(float(value), 3)


def to_json(result: PerfResult) -> dict[str, Any]:
    """Exactly the keys of :data:`JSON_KEYS`; each maps a device ("cpu", "cuda") to its measurement.

    ``peak_memory_mib`` maps each device to ``{case: {"peak": MiB, "above_setup": MiB}}`` (``null`` per case
    when the run skipped memory measurements).
    """
    out: dict[str, Any] = {key: {} for key in JSON_KEYS}
    for d in result.devices:
        out["engine_step_ratio_vs_transformers"][d.device] = _round(d.engine_ratio)
        out["method_step_ratio_vs_finetune"][d.device] = {m: _round(d.method_ratios[m]) for m in METHODS}
        out["confusion_speedup_vs_torchmetrics"][d.device] = _round(d.confusion_speedup)
        out["loader_to_train_throughput"][d.device] = _round(d.loader_ratio)
        out["peak_memory_mib"][d.device] = {
            name: None if d.cases[name].memory is None else d.cases[name].memory.to_dict()
            for name in all_cases(METHODS)}
    return out


def write_json(result: PerfResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(result), indent=2) + "\n")


def _goal_rows(result: PerfResult) -> list[list[str]]:
    rows = []

    def add(label: str, device: str, value: float, goal: float, at_most: bool, rounds: list[float] | None) -> None:
        met = value <= goal if at_most else value >= goal
        spread = "" if not rounds else f"{min(rounds):.2f} - {max(rounds):.2f}"
        rows.append([label, device, f"{value:.2f}", spread, ("<= " if at_most else ">= ") + f"{goal:g}",
                     "yes" if met else "**no**"])

    for d in result.devices:
        rounds = d.round_ratios
        add("engine step / transformers step", d.device, d.engine_ratio, ENGINE_GOAL, True, rounds.get("engine"))
        for m in METHODS:
            add(f"{m} step / finetune step (step 1)", d.device, d.method_ratios[m], METHOD_GOALS[m], True,
                rounds.get(m))
        add("confusion: torchmetrics time / ours", d.device, d.confusion_speedup, CONFUSION_GOAL, False,
            rounds.get("confusion"))
        add("loader images/s / training images/s", d.device, d.loader_ratio, LOADER_GOAL, False, None)
    if result.bootstrap is not None:
        rows.append(bootstrap_row(result.bootstrap))
    return rows


def bootstrap_row(timing: BootstrapTiming) -> list[str]:
    """The goals-table row of the report's bootstrap case (seconds, at most :data:`BOOTSTRAP_GOAL`)."""
    return [timing.label, "cpu", f"{timing.seconds:.2f}", f"{min(timing.rounds):.2f} - {max(timing.rounds):.2f}",
            f"<= {BOOTSTRAP_GOAL:g}", "yes" if timing.seconds <= BOOTSTRAP_GOAL else "**no**"]


def bootstrap_markdown(timing: BootstrapTiming) -> str:
    """The bootstrap case alone (``python -m benchmark.perf --bootstrap-only``)."""
    return tabulate([bootstrap_row(timing)], headers=["measurement", "device", "median", "rounds (min - max)", "goal",
                                                      "met"], tablefmt="github") + "\n"


def _case_rows(result: PerfResult) -> list[list[str]]:
    rows = []
    for d in result.devices:
        for name in all_cases(METHODS):
            case = d.cases[name]
            label = CASE_LABELS.get(name) or f"{name[: -len('_step1')]} training step (step 1)"
            time = f"{case.seconds * 1000:.1f} ms / {case.unit}"
            memory = ("", "") if case.memory is None else (f"{case.memory.peak:.0f}", f"{case.memory.above_setup:.0f}")
            rows.append([label, d.device, time, f"{case.throughput:.1f} {case.throughput_unit}", *memory])
    return rows


def markdown(result: PerfResult) -> str:
    """The settings line, the goals table and the per-case table (median time, throughput, peak memory)."""
    env = result.environment
    devices = ", ".join(f"{d} ({name})" for d, name in env["devices"].items())
    load = ""
    if env.get("load_start") is not None:
        load = (f" Machine load (1-min average) {env['load_start']} at the start, {env.get('load_end')} at the end, "
                f"on {env['cores']} cores.")
    heap = "freed CPU memory retained" if env.get("heap_retention", True) else "glibc's default malloc"
    header = (f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} torch thread(s), "
              f"{heap}; devices: {devices}.{load}  \n"
              f"Protocol {env['protocol']}, engine {env['engine']}, schedule {env['schedule']} (batch "
              f"{env['batch_size']}, crop {env['crop_size']}, {env['loss_points']} loss points), loader workers "
              f"{env['workers']}; median of {env['repeats']} interleaved rounds after {env['warmup']} warm-up.")
    goals = tabulate(_goal_rows(result), headers=["measurement", "device", "median", "rounds (min - max)", "goal", "met"],
                     tablefmt="github")
    cases = tabulate(_case_rows(result), headers=["case", "device", "median time", "throughput",
                                                  "peak memory (MiB)", "above set-up (MiB)"], tablefmt="github")
    return f"{header}\n\n{goals}\n\n{cases}\n"
