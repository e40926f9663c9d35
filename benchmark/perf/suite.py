"""One performance run: every measurement on every requested device (see the package docstring)."""

from __future__ import annotations

import logging
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmark.perf import confusion
from benchmark.perf.bootstrap import BootstrapTiming, measure_bootstrap
from benchmark.perf.cases import (
    BASELINE_METHOD,
    CONFUSION_CASES,
    CaseBuilder,
    all_cases,
    clear_device_cache,
    loader_rates,
    method_case_name,
)
from benchmark.perf.memory import MemoryResult, measure
from benchmark.perf.profiling import write_profiles
from benchmark.perf.settings import METHOD_GOALS, PerfSettings
from benchmark.perf.steps import StepCase, StockStep
from benchmark.perf.timing import Measurements, interleaved, steady_iteration_seconds, timed

log = logging.getLogger(__name__)

METHODS = tuple(METHOD_GOALS)


@dataclass
class CaseResult:
    """Median seconds of one unit of a case (``unit``: iteration, pass or batch) and its throughput."""

    seconds: float
    unit: str
    throughput: float
    throughput_unit: str
    memory: MemoryResult | None = None


@dataclass
class DeviceResult:
    device: str
    engine_ratio: float
    method_ratios: dict[str, float]
    confusion_speedup: float
    loader_ratio: float
    cases: dict[str, CaseResult] = field(default_factory=dict)
    # per-round ratios behind the medians ("engine", each method, "confusion"): their spread shows the noise
    round_ratios: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class PerfResult:
    settings: PerfSettings
    environment: dict[str, object]
    devices: list[DeviceResult]
    bootstrap: BootstrapTiming | None = None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _step_timings(runs: dict[str, StepCase | StockStep], settings: PerfSettings,
                  device: str) -> tuple[Measurements, dict[str, CaseResult]]:
    """Interleaved steady iteration times of step cases (StepCase / StockStep), profiled if asked."""
    n = settings.step_iterations
    timings = interleaved({name: (lambda case=case: steady_iteration_seconds(case.run(n)))
                           for name, case in runs.items()}, settings.repeats, settings.warmup)
    if settings.profile_dir:
        write_profiles({name: (lambda case=case: case.run(n)) for name, case in runs.items()}, device,
                       Path(settings.profile_dir))
    cases = {name: CaseResult(timings.median(name), "iteration", case.images / timings.median(name), "images/s")
             for name, case in runs.items()}
    return timings, cases


def measure_engine(builder: CaseBuilder) -> tuple[list[float], dict[str, CaseResult]]:
    """Engine step / stock transformers step (fine-tune's step 0, same weights and batch)."""
    engine = builder.engine_case()
    timings, cases = _step_timings({"engine_step": engine, "transformers_step": StockStep(engine)},
                                   builder.settings, builder.device)
    return timings.ratios("engine_step", "transformers_step"), cases


def measure_loader(builder: CaseBuilder) -> CaseResult:
    """Images/s of the step-0 training loader (median over rounds)."""
    s = builder.settings
    loader, batch_size = builder.loader()
    rate = statistics.median(loader_rates(loader, batch_size, s.repeats, s.loader_batches, s.warmup))
    return CaseResult(batch_size / rate, "batch", rate, "images/s")


def measure_methods(builder: CaseBuilder) -> tuple[dict[str, list[float]], dict[str, CaseResult]]:
    """Each method's step-1 iteration / fine-tune's (the step-0 models are trained first, once)."""
    runs = {method_case_name(m): builder.method_case(m) for m in (BASELINE_METHOD, *METHODS)}
    timings, cases = _step_timings(runs, builder.settings, builder.device)
    baseline = method_case_name(BASELINE_METHOD)
    return {m: timings.ratios(method_case_name(m), baseline) for m in METHODS}, cases


def measure_confusion(builder: CaseBuilder) -> tuple[list[float], dict[str, CaseResult]]:
    """torchmetrics accumulation time / ours over the same label maps (checked to give the same matrix)."""
    s, device = builder.settings, builder.device
    maps = builder.label_maps()
    confusion.check_equal(maps, s.confusion_classes, device)
    work = confusion.cases(maps, s.confusion_classes, device)
    timings = interleaved({name: timed(work[name], device) for name in CONFUSION_CASES}, s.repeats, s.warmup)
    pixels = sum(target.numel() for _, target in maps)
    cases = {name: CaseResult(timings.median(name), f"pass ({len(maps)} maps)",
                              pixels / timings.median(name) / 1e6, "Mpixel/s") for name in CONFUSION_CASES}
    return timings.ratios("confusion_torchmetrics", "confusion"), cases


def run_device(settings: PerfSettings, device: str, work_dir: Path) -> DeviceResult:
    """Every measurement on one device; the step-0 models are trained (once) into ``work_dir``."""
    builder = CaseBuilder(settings, device, work_dir)
    rounds = f"{settings.repeats} rounds + {settings.warmup} warm-up"
    log.info("[%s] engine vs transformers training step (%s)", device, rounds)
    engine_ratios, cases = measure_engine(builder)
    clear_device_cache(device)
    log.info("[%s] training loader with %d worker(s)", device, builder.workers())
    cases["loader"] = measure_loader(builder)
    log.info("[%s] methods at step 1 (%s; the step-0 models are trained first)", device, rounds)
    method_ratios, method_cases = measure_methods(builder)
    cases.update(method_cases)
    clear_device_cache(device)
    log.info("[%s] confusion accumulation vs torchmetrics (%s)", device, rounds)
    confusion_ratios, confusion_cases = measure_confusion(builder)
    cases.update(confusion_cases)
    clear_device_cache(device)
    if settings.memory:
        for name in all_cases(METHODS):
            log.info("[%s] peak memory of %s (subprocess)", device, name)
            cases[name].memory = measure(settings, device, name, work_dir)
    median = statistics.median
    return DeviceResult(
        device=device,
        engine_ratio=median(engine_ratios),
        method_ratios={m: median(r) for m, r in method_ratios.items()},
        confusion_speedup=median(confusion_ratios),
        loader_ratio=cases["loader"].throughput / cases["engine_step"].throughput,
        cases=cases,
        round_ratios={"engine": engine_ratios, **method_ratios, "confusion": confusion_ratios},
    )


def environment(settings: PerfSettings) -> dict[str, object]:
    """What the numbers depend on, for the report header."""
    from importlib.metadata import version

    from benchmark.perf.steps import resolve_method

    r = resolve_method(settings, BASELINE_METHOD, "cpu")
    sched = r.schedule.for_step(0)
    return {
        "torch": torch.__version__, "transformers": version("transformers"), "threads": settings.threads,
        "cores": os.cpu_count(), "devices": {d: _device_name(d) for d in settings.devices},
        "protocol": r.protocol.name, "engine": r.preset.name, "schedule": r.schedule.name,
        "batch_size": sched.batch_size, "crop_size": sched.crop_size, "loss_points": r.criterion.num_points,
        "workers": r.loader.workers, "repeats": settings.repeats, "warmup": settings.warmup,
        "heap_retention": settings.heap_retention,
    }


def default_work_dir() -> Path:
    """Where the step-0 models are kept between runs: ``<cache root>/perf``."""
    from benchmark.data.cache import cache_root

    return cache_root() / "perf"


def run_perf(settings: PerfSettings, work_dir: Path | None = None) -> PerfResult:
    """Measure everything on every device of ``settings`` (torch threads set to ``settings.threads``).

    ``work_dir`` keeps the trained step-0 models, keyed by configuration (default :func:`default_work_dir`).
    """
    from benchmark.engine.device import resolve_device

    for device in settings.devices:
        resolve_device(device)   # "cuda" without a GPU: EnvironmentProblem before any work
    settings.apply_heap_setting()
    # The thread count is process-wide state: restored afterwards so that a caller (a test, a notebook)
    # does not train with the perf run's count and get other numbers than the same run on the command line.
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
        env = environment(settings)
        env["load_start"] = _load_average()
        devices = [run_device(settings, d, work_dir / d) for d in settings.devices]
        boot = run_bootstrap(settings)
        env["load_end"] = _load_average()
    finally:
        torch.set_num_threads(threads)
    return PerfResult(settings, env, devices, boot)


def run_bootstrap(settings: PerfSettings) -> BootstrapTiming:
    """The report's bootstrap case (numpy on the CPU, whatever the devices)."""
    log.info("[cpu] report bootstrap: %d images x %d classes x %d resamples (%d rounds + %d warm-up)",
             settings.bootstrap_images, settings.bootstrap_classes, settings.bootstrap_resamples, settings.repeats,
             settings.warmup)
    return measure_bootstrap(settings.bootstrap_images, settings.bootstrap_classes, settings.bootstrap_resamples,
                             settings.repeats, settings.warmup)


def _load_average() -> float | None:
    """The machine's 1-minute load average (other processes competing for the cores), None if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
