"""What ``python -m benchmark.perf`` measures and how long it measures it (``--quick`` or the full run)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmark.errors import ConfigError

# The methods compared with fine-tuning at step 1, and their goals (ratio of step times, at most).
METHOD_GOALS: dict[str, float] = {"mib": 1.6, "plop": 1.6, "comformer": 1.6, "cisdq": 2.0}
ENGINE_GOAL = 1.05           # engine step / stock transformers step, at most
CONFUSION_GOAL = 2.0         # torchmetrics time / our time, at least
LOADER_GOAL = 2.0            # loader images/s over training images/s, at least
MIN_REPEATS = 5
QUICK_STEP0_ITERATIONS = 200


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PerfSettings:
    """Settings of one performance run.

    protocol / engine / schedule / seed / overrides: the run configuration, resolved by the runner exactly
        as ``run_benchmark.py`` resolves it (``overrides`` = ``--set section.key=value`` pairs), so the
        measured steps are the steps the benchmark trains. Default: the embedded CPU benchmark.
    devices: "cpu" and/or "cuda"; every measurement is made on each.
    repeats / warmup: measured rounds (the median is reported; at least 5) and discarded first rounds.
    step_iterations: trainer iterations per timed call (at least 3; ``--quick``: 3, full: 5). The first
        allocates AdamW's state and the last ends with the loop's log flush, so each call times the mean
        of the ``step_iterations - 2`` iterations between them.
    step0_iterations: iterations of the step-0 training that gives the methods their old model
        (None = the schedule's; ``--quick``: 200). The old model's predictions decide how many
        pseudo-labels PLOP, CoMFormer and CisDQ add, hence their loss cost, so the old model should be a
        trained one. On synth-10-5 the step ratios after 200 and after the schedule's 600 iterations
        agreed within the noise of the measurement. The models are cached
        (``cases.CaseBuilder.step0_model``), so the training is paid once per configuration.
    plop_batches: batches of PLOP's threshold pass in ``before_step`` (not timed).
    confusion_maps / confusion_size / confusion_classes: label maps of the confusion benchmark
        (ADE20K-like: 150 classes, 512 x 512, about 10 % void).
    loader_batches: batches per timed round of the loader throughput.
    workers: training-loader worker processes (None = the configured ``data.workers``).
    threads: torch intra-op threads, set once for the whole run and in every memory subprocess.
    memory: measure each case's peak memory in its own subprocess (CPU: peak RSS; CUDA: peak allocated).
    memory_iterations: trainer iterations (or confusion passes, loader batches) in a memory subprocess.
    heap_retention: keep freed CPU memory in the process (:mod:`benchmark.engine.host_memory`), as every
        CPU run of the benchmark does; ``--no-heap-retention`` measures glibc's default instead (the
        difference is that module's measured effect).
    profile_dir: write a torch.profiler and a cProfile table per training-step case there (None: no profiling).
    bootstrap_images / bootstrap_classes / bootstrap_resamples: the report's bootstrap case
        (:mod:`benchmark.perf.bootstrap`; ADE20K size: 2000 x 150 x 1000), timed once, on the CPU.
    """

    protocol: str = "synth-10-5"
    engine: str = "tiny"
    schedule: str = "cpu"
    seed: int = 0
    overrides: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    repeats: int = 11
    warmup: int = 1
    step_iterations: int = 5
    step0_iterations: int | None = None
    plop_batches: int = 8
    confusion_maps: int = 16
    confusion_size: int = 512
    confusion_classes: int = 150
    loader_batches: int = 8
    workers: int | None = None
    threads: int = field(default_factory=available_cores)
    memory: bool = True
    memory_iterations: int = 3
    heap_retention: bool = True
    profile_dir: str | None = None
    bootstrap_images: int = 2000
    bootstrap_classes: int = 150
    bootstrap_resamples: int = 1000

    def apply_heap_setting(self) -> None:
        """Retain freed CPU memory in this process as the benchmark's CPU runs do (``runner.run_one``), unless
        ``heap_retention`` is off; process-wide and one-way, so every memory subprocess applies it itself."""
        if self.heap_retention:
            from benchmark.engine.host_memory import retain_freed_memory

            retain_freed_memory()

    def __post_init__(self) -> None:
        problems = []
        if self.repeats < MIN_REPEATS:
            problems.append(f"repeats must be at least {MIN_REPEATS} (the median of {MIN_REPEATS} or more rounds is "
                            f"reported), got {self.repeats}")
        if self.warmup < 0:
            problems.append(f"warmup must be >= 0, got {self.warmup}")
        if self.step_iterations < 3:
            problems.append(f"step_iterations must be at least 3 (the first is warm-up), got {self.step_iterations}")
        if self.step0_iterations is not None and self.step0_iterations < 1:
            problems.append(f"step0_iterations must be at least 1, got {self.step0_iterations}")
        for name in ("plop_batches", "confusion_maps", "confusion_size", "confusion_classes", "loader_batches",
                     "threads", "memory_iterations", "bootstrap_images", "bootstrap_classes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.bootstrap_resamples < 50:
            problems.append(f"bootstrap_resamples must be at least 50, got {self.bootstrap_resamples}")
        if self.confusion_classes >= 255:
            problems.append(f"confusion_classes must be below 255 (the void label), got {self.confusion_classes}")
        if self.workers is not None and self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        unknown = sorted(set(self.devices) - {"cpu", "cuda"})
        if unknown or not self.devices:
            problems.append(f"devices must be a non-empty subset of ('cpu', 'cuda'), got {self.devices}")
        if problems:
            raise ConfigError("invalid performance settings: " + "; ".join(problems),
                              hint="see python -m benchmark.perf --help")

    def run_overrides(self) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
        """``overrides`` plus what these settings imply (step-0 iterations, loader workers), RunSpec form;
        an explicit ``step0.iterations`` / ``data.workers`` in ``overrides`` wins."""
        sections = {section: dict(pairs) for section, pairs in self.overrides}
        if self.step0_iterations is not None:
            sections.setdefault("step0", {}).setdefault("iterations", str(self.step0_iterations))
        if self.workers is not None:
            sections.setdefault("data", {}).setdefault("workers", str(self.workers))
        return tuple((section, tuple(pairs.items())) for section, pairs in sections.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PerfSettings":
        """Inverse of :meth:`to_dict` after a JSON round trip (lists become tuples again)."""
        values = dict(data)
        values["devices"] = tuple(values["devices"])
        values["overrides"] = tuple((section, tuple(tuple(kv) for kv in pairs)) for section, pairs in values["overrides"])
        return cls(**values)


def quick(settings: PerfSettings) -> PerfSettings:
    """``--quick``: the minimum repeats and small workloads, a few minutes on two CPU cores."""
    return replace(settings, repeats=MIN_REPEATS, warmup=1, step_iterations=3,
                   step0_iterations=settings.step0_iterations or QUICK_STEP0_ITERATIONS,
                   plop_batches=4, confusion_maps=4, loader_batches=4, memory_iterations=3)
