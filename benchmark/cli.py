"""Command line: ``run_benchmark.py`` parses arguments into run specs and hands them to the runner.

    python run_benchmark.py                                   # embedded default benchmark (synthetic, CPU)
    python run_benchmark.py --methods cisdq plop --protocol ade-100-5
    python run_benchmark.py --list protocols
    python run_benchmark.py report results/

User errors (unknown names, missing data, impossible devices) print ``error: ...`` and a hint, exit 2,
and never show a traceback; everything already written stays on disk (runs resume). Ctrl-C (exit 130) and
SIGTERM (``kill``, exit 143) stop the whole command, the parallel workers included.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from benchmark.errors import ConfigError, EnvironmentProblem, UserError

DEFAULT_PROTOCOL = "synth-10-5"
DEFAULT_SEEDS = (0,)


def _default_data_root() -> str:
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Train and evaluate continual segmentation methods on standard protocols; "
                    "with no arguments, run the embedded synthetic benchmark on the CPU.",
        epilog="Subcommand: run_benchmark.py report RESULTS_DIR [--out DIR] writes tables and plots.",
    )
    p.add_argument("--methods", nargs="+", metavar="M", help="methods to run (default: all, plus joint)")
    p.add_argument("--protocol", "--protocols", nargs="+", dest="protocols", metavar="P",
                   help=f"protocol name(s), e.g. ade-100-5, voc-15-1@b, synth-10-2 (default: {DEFAULT_PROTOCOL})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds (default: 0)")
    p.add_argument("--orders", type=_orders, default=0, metavar="N",
                   help="also run N seeded random class orders of every protocol (@rand1..@randN) beside its own "
                        "order; the report aggregates a split over its orders (default 0)")
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $DETECTRON2_DATASETS or datasets/)")
    p.add_argument("--dataset", choices=("real", "synth"), default="real",
                   help="synth: run the protocols' class structure on synthetic data of that size")
    p.add_argument("--engine", default=None, metavar="PRESET",
                   help="model preset: tiny (CPU default), mid, r50, r101, swin-t, swin-b")
    p.add_argument("--schedule", default=None, help="cpu (default without CUDA), paper, cisdq-paper, eclipse-paper, balconpas-paper")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="results", help="results folder (default: results/)")
    # nargs="+" with "extend": one flag takes several pairs (--set a=1 b=2, as detectron2's trailing opts)
    # and repeated flags still add up.
    p.add_argument("--set", action="extend", nargs="+", dest="overrides", metavar="KEY=VALUE", default=[],
                   help="typed overrides, e.g. --set increment.iterations=50 method.kd_weight=10 data.workers=2")
    p.add_argument("--backbone-weights", default=None, metavar="PATH",
                   help="pretrained backbone: HF folder, torchvision .pth or detectron2 .pkl")
    p.add_argument("--jobs", type=_jobs, default="auto",
                   help="runs in parallel (joblib processes): auto = one per CPU core (1 torch thread each) "
                        "or one per GPU")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per job")
    p.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per job")
    p.add_argument("--slurm-folder", default=None, help="submitit log folder (default: <out>/slurm)")
    p.add_argument("--slurm-max-timeouts", type=int, default=3,
                   help="requeue a job that hits its time limit at most this many times (preemptions are "
                        "always requeued); it resumes from its last checkpoint")
    p.add_argument("--track", choices=("none", "tensorboard", "wandb"), default="none",
                   help="log every iteration's loss terms, lr and grad norm and every step's metrics to "
                        "TensorBoard (<run>/tensorboard) or Weights & Biases (pip install -e \".[track]\")")
    p.add_argument("--dry-run", action="store_true", help="print steps, classes, image counts and run ids")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run folder whose recorded configuration differs from this command")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the runs")
    p.add_argument("--list", choices=("protocols", "methods"), help="list what is available and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _list(what: str) -> None:
    if what == "protocols":
        from protocols import describe_protocols
        from tabulate import tabulate

        rows = [(d["name"], d["dataset"], d["task"], d["mode"], d["num_steps"], d["num_classes"], d["sizes"],
                 d["aliases"] if isinstance(d["aliases"], str) else ", ".join(d["aliases"]))
                for d in describe_protocols()]
        print(tabulate(rows, headers=["protocol", "dataset", "task", "mode", "steps", "classes", "classes per step", "aliases"]))
        print("\nAny <dataset>-<base>-<inc>[-disjoint][@order] works too (orders: b, c, ..., rand<N>).")
    else:
        from methods import OPTIONAL, available_methods, get_method_class
        from tabulate import tabulate

        rows = []
        for name in available_methods():
            cls = get_method_class(name)
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            rows.append((name, "only when named" if name in OPTIONAL else "yes", doc[0] if doc else ""))
        print(tabulate(rows, headers=["method", "in the default run", "description"]))


def specs_from_args(args: argparse.Namespace):
    from benchmark.config import check_sections, parse_set_options
    from benchmark.runner import OVERRIDE_SECTIONS, RunSpec, resolve_device_name
    from methods import default_methods, get_method_class
    from protocols import get_protocol

    methods = args.methods or default_methods()
    for m in methods:
        get_method_class(m)                     # unknown names fail before anything starts
    protocols = args.protocols or [DEFAULT_PROTOCOL]
    names = []
    for name in protocols:
        for proto in with_random_orders(get_protocol(name), getattr(args, "orders", 0)):
            if args.dataset == "synth" and not proto.dataset.startswith("synth"):
                proto = proto.on_synthetic()
            if proto.name not in names:
                names.append(proto.name)
    device = resolve_device_name(args.device)
    synthetic = all(n.startswith("synth") or n.endswith("~synth") for n in names)
    schedule = args.schedule or ("paper" if device == "cuda" and not synthetic else "cpu")
    engine = args.engine or ("tiny" if schedule == "cpu" else "r50")
    overrides = parse_set_options(args.overrides)
    check_sections(overrides, OVERRIDE_SECTIONS)
    frozen_overrides = RunSpec.freeze_overrides(overrides)
    specs = [
        RunSpec(method=m, protocol=p, seed=s, engine=engine, schedule=schedule,
                data_root=args.data_root or _default_data_root(), device=device, out=args.out,
                overrides=frozen_overrides, backbone_weights=args.backbone_weights,
                overwrite=args.overwrite, track=args.track)
        for p in names for m in methods for s in (args.seeds or DEFAULT_SEEDS)
    ]
    return specs


def with_random_orders(protocol, n: int) -> list:
    """``protocol`` itself, then ``n`` seeded random orders of its split (``<split>@rand1`` .. ``@rand<n>``)."""
    from benchmark.report.orders import split_name
    from protocols import get_protocol

    if n == 0:
        return [protocol]
    if protocol.num_steps < 2:
        raise ConfigError(f"--orders {n}: {protocol.name} has a single step, so its class order changes nothing",
                          hint="use --orders with an incremental protocol such as synth-10-5 or ade-100-10")
    split = split_name(protocol.name)
    head, tilde, derivation = split.partition("~")
    return [protocol] + [get_protocol(f"{head}@rand{i}{tilde}{derivation}") for i in range(1, n + 1)]


def _count(text: str, what: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _orders(text: str) -> int:
    return _count(text, "a number of random class orders", 0)


# Third-party packages the command needs (pyproject.toml): a missing one is an installation problem.
REQUIRED_MODULES = frozenset({"torch", "transformers", "scipy", "numpy", "PIL", "pycocotools", "pandas",
                              "matplotlib", "seaborn", "tabulate", "joblib", "tqdm", "submitit"})


def _jobs(text: str) -> int | str:
    return text if text == "auto" else _count(text, "'auto' or a number of processes", 1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if sys.stderr.isatty():      # the bars show the iterations; plain log lines only when not a terminal
        from benchmark.progress import console_filter

        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(console_filter)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt.

    Why: with the default action a ``kill`` of the command ended the parent only; joblib's loky workers,
    orphaned, went on with their current runs (measured: two workers still training a joint run 6 minutes
    after the parent died), holding a core and the run's lock each, so that the same command, restarted to
    resume, waited for them. As an exception in the parent, joblib aborts the pool and kills its workers;
    what they finished is on disk, and a run killed mid-step resumes from its in-step checkpoint.
    """


@contextlib.contextmanager
def _sigterm_raises():
    """While inside, SIGTERM raises :class:`Terminated` (main thread only: signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with _sigterm_raises():
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "report":
            from benchmark.report import report_main

            return report_main(argv[1:])
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        from benchmark.engine.device import check_torchvision

        check_torchvision()
        if args.list:
            _list(args.list)
            return 0
        specs = specs_from_args(args)
        if args.dry_run:
            from benchmark.runner import describe_plan

            print(describe_plan(specs))
            return 0
        from benchmark.parallel import default_jobs, run_grid

        jobs = default_jobs(specs) if args.jobs == "auto" else args.jobs
        run_dirs = run_grid(specs, jobs=jobs, launcher=args.launcher, slurm=dict(
            partition=args.slurm_partition, time=args.slurm_time, gpus=args.slurm_gpus,
            max_timeouts=args.slurm_max_timeouts,
            folder=args.slurm_folder or str(Path(args.out) / "slurm")))
        if run_dirs and not args.no_report and _is_main_process():
            from benchmark.report import write_report
            from benchmark.runner import print_final_summary

            report_dir = write_report(Path(args.out))
            print_final_summary(Path(args.out), specs)
            print(f"\nreport: {report_dir}")
        return 0
    except UserError as err:
        return err.report()
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}: finished steps are kept; run the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in REQUIRED_MODULES:
            raise
        return EnvironmentProblem(f"the package {err.name!r} is not installed in this Python ({sys.executable})",
                                  hint="install the project first: pip install -e .  (CPU machines: torch==2.13.0 "
                                       "CPU build)").report()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
