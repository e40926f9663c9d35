"""Every measured case of one device, built once and shared by the timing run and the memory subprocesses.

Cases:
  * ``engine_step``: fine-tuning's step 0 through the engine's trainer (SegModel + SetCriterion);
  * ``transformers_step``: the same batch, weights and settings through transformers' stock model and loss;
  * ``<method>_step1``: each method's step 1 (fine-tune included) from the step-0 model it trains after;
  * ``confusion`` / ``confusion_torchmetrics``: confusion accumulation over the same label maps;
  * ``loader``: the training loader of step 0 with the configured workers.

The step-0 models the methods start from are trained once and kept in ``work_dir`` (default: the cache
folder), keyed by their configuration, so that later runs and the memory subprocesses load them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from benchmark.data.cache import digest
from benchmark.perf import confusion
from benchmark.perf.settings import PerfSettings
from benchmark.perf.steps import (
    StepCase,
    StockStep,
    build_step_case,
    resolve_method,
    step_data,
    step_runner,
    train_step0,
)

STEP_CASES = ("engine_step", "transformers_step")
CONFUSION_CASES = ("confusion", "confusion_torchmetrics")
LOADER_CASE = "loader"
BASELINE_METHOD = "finetune"


def method_case_name(method: str) -> str:
    return f"{method}_step1"


def all_cases(methods: tuple[str, ...]) -> tuple[str, ...]:
    """Every case name, in report order."""
    return (*STEP_CASES, *(method_case_name(m) for m in (BASELINE_METHOD, *methods)), *CONFUSION_CASES, LOADER_CASE)


class CaseBuilder:
    """Builds the cases of one device from the runner's resolved configurations (cached per method)."""

    def __init__(self, settings: PerfSettings, device: str, work_dir: Path):
        self.settings = settings
        self.device = device
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._resolved: dict[str, object] = {}
        self._runners: dict[str, object] = {}

    def resolved(self, method: str):
        if method not in self._resolved:
            self._resolved[method] = resolve_method(self.settings, method, self.device)
        return self._resolved[method]

    def runner(self, method: str):
        if method not in self._runners:
            self._runners[method] = step_runner(self.resolved(method))
        return self._runners[method]

    def _shares_baseline_step0(self, method: str) -> bool:
        """As the runner decides (its step-0 cache key holds the layout): a standard step 0 on the same model."""
        def layout(name):
            r = self.resolved(name)
            return r.method.initial_layout(r.train_protocol, r.preset)

        return self.resolved(method).method.shares_standard_step0 and layout(method) == layout(BASELINE_METHOD)

    def step0_model(self, method: str):
        """The step-0 model ``method`` continues from: the shared standard one, or the method's own.

        Trained once per (configuration, protocol, seed, device type) and kept in ``work_dir`` under that
        key, so later runs and the memory subprocesses load it; an interrupted training resumes.
        """
        from benchmark.engine.checkpoint import save_weights

        owner = BASELINE_METHOD if self._shares_baseline_step0(method) else method
        r, runner = self.resolved(owner), self.runner(owner)
        key = digest("perf-step0", r.config, r.protocol.fingerprint, r.spec.seed, runner.device.type)[:16]
        path = self.work_dir / f"step0_{owner}_{key}.pt"
        if path.is_file():
            return runner.load_model(path).to(runner.device)
        train_dir = self.work_dir / f"train_{owner}_{key}"
        model = train_step0(runner, train_dir)
        save_weights(model, path)
        shutil.rmtree(train_dir, ignore_errors=True)
        return model

    # --- the cases ---------------------------------------------------------------------------------
    def engine_case(self) -> StepCase:
        runner = self.runner(BASELINE_METHOD)
        return build_step_case("engine_step", self.resolved(BASELINE_METHOD), runner, 0, runner.initial_model(),
                               plop_batches=self.settings.plop_batches)

    def method_case(self, method: str) -> StepCase:
        return build_step_case(method_case_name(method), self.resolved(method), self.runner(method), 1,
                               self.step0_model(method), plop_batches=self.settings.plop_batches)

    def label_maps(self):
        s = self.settings
        return confusion.label_maps(s.confusion_maps, s.confusion_size, s.confusion_classes, self.device, s.seed)

    def loader(self):
        """The step-0 training loader with the configured workers, and its batch size."""
        from benchmark.data import TrainLoader

        resolved = self.resolved(BASELINE_METHOD)
        data = step_data(resolved, self.runner(BASELINE_METHOD), 0)
        return TrainLoader(data.view, batch_size=data.micro_batch, seed=data.seed,
                           workers=resolved.loader.workers), data.micro_batch

    def workers(self) -> int:
        return self.resolved(BASELINE_METHOD).loader.workers


def loader_rates(loader, batch_size: int, rounds: int, batches: int, warmup: int) -> list[float]:
    """Images per second of ``rounds`` timed runs of ``batches`` consecutive batches, after ``warmup`` runs
    (the first of which starts the worker processes)."""
    rates = []
    try:
        for round_index in range(warmup + rounds):
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            if round_index >= warmup:
                rates.append(batches * batch_size / (time.perf_counter() - start))
    finally:
        loader.close()
    return rates


def memory_workload(builder: CaseBuilder, case: str) -> tuple[Callable[[], object], Callable[[], None]]:
    """``(work, cleanup)``: the work whose memory a subprocess measures, its set-up done before this
    returns; ``cleanup`` stops what the work leaves running (loader workers are measured alive)."""
    s = builder.settings
    iterations = max(s.memory_iterations, 2)
    nothing = lambda: None   # noqa: E731
    if case == "engine_step":
        step = builder.engine_case()
        return (lambda: step.run(iterations)), nothing
    if case == "transformers_step":
        stock = StockStep(builder.engine_case())   # the engine model is dropped once the stock copy exists
        return (lambda: stock.run(iterations)), nothing
    if case in CONFUSION_CASES:
        maps = builder.label_maps()
        work = confusion.cases(maps, s.confusion_classes, builder.device)[case]
        return (lambda: [work() for _ in range(s.memory_iterations)]), nothing
    if case == LOADER_CASE:
        loader, _ = builder.loader()
        return (lambda: [next(loader) for _ in range(s.memory_iterations)]), loader.close
    if case.endswith("_step1"):
        step = builder.method_case(case[: -len("_step1")])
        return (lambda: step.run(iterations)), nothing
    raise ValueError(f"unknown perf case {case!r}")


def clear_device_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
