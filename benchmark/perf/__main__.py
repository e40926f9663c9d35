"""``python -m benchmark.perf [--quick] [--json PATH]``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from benchmark.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from benchmark.perf.settings import MIN_REPEATS, PerfSettings

    defaults = PerfSettings()
    p = argparse.ArgumentParser(
        prog="python -m benchmark.perf",
        description="Measure the engine's training step against stock transformers, each method's step against "
                    "fine-tuning's, confusion accumulation against torchmetrics and the data loader against "
                    "training; print a Markdown table and optionally write the JSON.")
    p.add_argument("--quick", action="store_true",
                   help=f"{MIN_REPEATS} rounds and small workloads (a few minutes on two CPU cores)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--bootstrap-only", action="store_true",
                   help="time only the report's bootstrap case (2000 images x 150 classes x 1000 resamples; "
                        "--repeats rounds) and print its row")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the CPU, and CUDA too when available (default)")
    p.add_argument("--protocol", default=defaults.protocol, help=f"(default {defaults.protocol})")
    p.add_argument("--engine", default=defaults.engine, help=f"model preset (default {defaults.engine})")
    p.add_argument("--schedule", default=defaults.schedule, help=f"(default {defaults.schedule})")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help=f"torch threads (default: the cores this process may use, {defaults.threads})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"measured rounds, at least {MIN_REPEATS} (default {defaults.repeats}; --quick {MIN_REPEATS})")
    p.add_argument("--workers", type=int, default=None, help="training-loader workers (default: data.workers)")
    p.add_argument("--set", action="extend", nargs="+", dest="overrides", metavar="KEY=VALUE", default=[],
                   help="run configuration override as in run_benchmark.py, e.g. model.train_num_points=2048")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-heap-retention", action="store_true",
                   help="leave glibc's malloc at its defaults (freed memory goes back to the kernel) instead of "
                        "retaining it as the benchmark's CPU runs do; compare the two runs' step times")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write torch.profiler and cProfile tables of every training-step case to DIR")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where the trained step-0 models are kept between runs (default: <cache>/perf, the "
                        "cache being $CISDQ_BENCH_CACHE or ~/.cache/cisdq-bench)")
    # Internal: one memory measurement in this (fresh) process, called by benchmark.perf.memory.measure.
    for name in ("--memory-case", "--memory-device", "--memory-work-dir", "--memory-settings"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    return p


def settings_from_args(args: argparse.Namespace):
    import torch

    from benchmark.config import parse_set_options
    from benchmark.perf.settings import PerfSettings, quick

    if args.device == "auto":
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    else:
        devices = (args.device,)
    overrides = tuple((section, tuple(pairs.items())) for section, pairs in parse_set_options(args.overrides).items())
    settings = PerfSettings(protocol=args.protocol, engine=args.engine, schedule=args.schedule, devices=devices,
                            threads=args.threads, workers=args.workers, overrides=overrides,
                            memory=not args.no_memory, profile_dir=args.profile,
                            heap_retention=not args.no_heap_retention)
    if args.quick:
        settings = quick(settings)
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    return settings


def _memory_case(args: argparse.Namespace) -> int:
    from benchmark.perf.memory import measure_in_process, report_line
    from benchmark.perf.settings import PerfSettings

    settings = PerfSettings.from_dict(json.loads(args.memory_settings))
    result = measure_in_process(settings, args.memory_device, args.memory_case, Path(args.memory_work_dir))
    print(report_line(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # The trainer logs every log point at INFO; the perf run's own progress is enough.
    # Restored on return: main() is also called in-process, and the runner's log.txt needs INFO.
    quiet = [logging.getLogger(name) for name in ("benchmark.engine", "benchmark.runner")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        if args.memory_case:
            return _memory_case(args)
        from benchmark.engine.device import check_torchvision
        from benchmark.perf.report import bootstrap_markdown, markdown, write_json
        from benchmark.perf.suite import run_bootstrap, run_perf

        settings = settings_from_args(args)
        if args.bootstrap_only:
            print(bootstrap_markdown(run_bootstrap(settings)))
            return 0
        check_torchvision()
        result = run_perf(settings, Path(args.work_dir) if args.work_dir else None)
        print(markdown(result))
        if args.json:
            write_json(result, args.json)
            print(f"JSON: {args.json}")
        return 0
    except UserError as err:
        return err.report()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
