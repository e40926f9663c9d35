"""One performance run: every measurement on every requested device (see the package docstring)."""

from __future__ import annotations

import logging
import platform
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmark.perf import confusion
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
from benchmark.perf.steps import StockStep
from benchmark.perf.timing import interleaved, steady_iteration_seconds, timed

log = logging.getLogger(__name__)

METHODS = tuple(METHOD_GOALS)


@dataclass
class CaseResult:
    """Median seconds of one unit of a case (``unit``: iteration, pass or batch) and its throughput."""

    seconds: float | None
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


@dataclass
class PerfResult:
    settings: PerfSettings
    environment: dict[str, object]
    devices: list[DeviceResult]


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return platform.processor() or platform.machine()


def run_device(settings: PerfSettings, device: str, work_dir: Path) -> DeviceResult:
    """Every measurement on one device; the step-0 models are trained (once) into ``work_dir``."""
    builder = CaseBuilder(settings, device, work_dir)
    n, repeats, warmup = settings.step_iterations, settings.repeats, settings.warmup
    cases: dict[str, CaseResult] = {}

    log.info("[%s] engine vs transformers training step (%d rounds + %d warm-up)", device, repeats, warmup)
    engine = builder.engine_case()
    stock = StockStep(engine)
    steps = interleaved({"engine_step": lambda: steady_iteration_seconds(engine.run(n)),
                         "transformers_step": lambda: steady_iteration_seconds(stock.run(n))}, repeats, warmup)
    for name in ("engine_step", "transformers_step"):
        seconds = steps.median(name)
        cases[name] = CaseResult(seconds, "iteration", engine.images / seconds, "images/s")
    engine_ratio = steps.ratio("engine_step", "transformers_step")
    if settings.profile_dir:
        write_profiles({"engine_step": lambda: engine.run(n), "transformers_step": lambda: stock.run(n)}, device,
                       Path(settings.profile_dir))
    del stock
    clear_device_cache(device)

    log.info("[%s] training loader with %d worker(s)", device, builder.workers())
    loader, batch_size = builder.loader()
    rates = loader_rates(loader, batch_size, repeats, settings.loader_batches, warmup)
    loader_rate = statistics.median(rates)
    cases["loader"] = CaseResult(batch_size / loader_rate, "batch", loader_rate, "images/s")
    loader_ratio = loader_rate / cases["engine_step"].throughput

    log.info("[%s] methods at step 1 (training the step-0 models first)", device)
    method_cases = {method_case_name(m): builder.method_case(m) for m in (BASELINE_METHOD, *METHODS)}
    methods = interleaved({name: (lambda case=case: steady_iteration_seconds(case.run(n)))
                           for name, case in method_cases.items()}, repeats, warmup)
    for name, case in method_cases.items():
        seconds = methods.median(name)
        cases[name] = CaseResult(seconds, "iteration", case.images / seconds, "images/s")
    baseline = method_case_name(BASELINE_METHOD)
    method_ratios = {m: methods.ratio(method_case_name(m), baseline) for m in METHODS}
    if settings.profile_dir:
        write_profiles({name: (lambda case=case: case.run(n)) for name, case in method_cases.items()}, device,
                       Path(settings.profile_dir))
    del method_cases
    clear_device_cache(device)

    log.info("[%s] confusion accumulation vs torchmetrics", device)
    maps = builder.label_maps()
    confusion.check_equal(maps, settings.confusion_classes, device)
    work = confusion.cases(maps, settings.confusion_classes, device)
    matrices = interleaved({name: timed(work[name], device) for name in CONFUSION_CASES}, repeats, warmup)
    pixels = sum(target.numel() for _, target in maps)
    for name in CONFUSION_CASES:
        seconds = matrices.median(name)
        cases[name] = CaseResult(seconds, f"pass ({len(maps)} maps)", pixels / seconds / 1e6, "Mpixel/s")
    speedup = matrices.ratio("confusion_torchmetrics", "confusion")
    del maps, work
    clear_device_cache(device)

    if settings.memory:
        for name in all_cases(METHODS):
            log.info("[%s] peak memory of %s (subprocess)", device, name)
            cases[name].memory = measure(settings, device, name, work_dir)
    return DeviceResult(device, engine_ratio, method_ratios, speedup, loader_ratio, cases)


def environment(settings: PerfSettings) -> dict[str, object]:
    """What the numbers depend on, for the report header."""
    from importlib.metadata import version

    from benchmark.perf.steps import resolve_method

    r = resolve_method(settings, BASELINE_METHOD, "cpu")
    sched = r.schedule.for_step(0)
    return {
        "torch": torch.__version__, "transformers": version("transformers"), "threads": settings.threads,
        "devices": {d: _device_name(d) for d in settings.devices}, "protocol": r.protocol.name,
        "engine": r.preset.name, "schedule": r.schedule.name, "batch_size": sched.batch_size,
        "crop_size": sched.crop_size, "loss_points": r.criterion.num_points, "workers": r.loader.workers,
        "repeats": settings.repeats, "warmup": settings.warmup,
    }


def run_perf(settings: PerfSettings, work_dir: Path | None = None) -> PerfResult:
    """Measure everything on every device of ``settings`` (torch threads set to ``settings.threads``).

    ``work_dir`` keeps the step-0 models (a temporary folder, removed afterwards, when None).
    """
    from benchmark.engine.device import resolve_device

    for device in settings.devices:
        resolve_device(device)   # "cuda" without a GPU: EnvironmentProblem before any work
    torch.set_num_threads(settings.threads)
    env = environment(settings)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        return PerfResult(settings, env, [run_device(settings, d, Path(work_dir) / d) for d in settings.devices])
    with tempfile.TemporaryDirectory(prefix="cisdq-perf-") as tmp:
        return PerfResult(settings, env, [run_device(settings, d, Path(tmp) / d) for d in settings.devices])
