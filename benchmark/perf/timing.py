"""Paired, interleaved wall-clock measurements that noise on a shared machine hits evenly.

Every round runs each case once, in an order rotated by one case per round (A B C, B C A, C A B, ...),
so slow phases of the machine and drift (thermal, other processes) fall on every case alike. Ratios are
the median over rounds of the per-round ratios (paired), which cancels what a round's noise has in
common; the first ``warmup`` rounds are run and discarded (allocator, caches, lazily built kernels).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from benchmark.batch import Batch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a clock read measures the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurements:
    """Seconds per round of each case (warm-up rounds excluded)."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, case: str) -> float:
        return statistics.median(self.samples[case])

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """``numerator / denominator`` of every round (paired: both from the same round)."""
        return [a / b for a, b in zip(self.samples[numerator], self.samples[denominator], strict=True)]

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of :meth:`ratios`."""
        return statistics.median(self.ratios(numerator, denominator))


def interleaved(cases: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 1) -> Measurements:
    """Run every case ``warmup + repeats`` times, interleaved; each callable returns its own seconds.

    Callables time themselves (see :func:`timed`, :class:`RepeatLoader`) so that a case can leave its
    set-up, or a first iteration that allocates optimiser state, out of the measurement.
    """
    names = list(cases)
    out = Measurements({name: [] for name in names})
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = cases[name]()
            if round_index >= warmup:
                out.samples[name].append(seconds)
    return out


def timed(work: Callable[[], object], device: torch.device | str) -> Callable[[], float]:
    """A case callable that times all of ``work`` (GPU work included)."""

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        return time.perf_counter() - start

    return run


class RepeatLoader:
    """The trainer's loader contract over one batch: yields it forever and stamps the clock at every request.

    The trainer asks for a batch at the start of each iteration (after ``zero_grad``), so consecutive
    stamps delimit whole iterations: forward, old-model forward, loss, backward, clipping, AdamW and
    scheduler steps and the loop's own bookkeeping, without any data loading.
    """

    def __init__(self, batch: Batch, device: torch.device | str):
        self.batch = batch
        self.device = device
        self.stamps: list[float] = []

    def __iter__(self) -> "RepeatLoader":
        return self

    def __next__(self) -> Batch:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def steady_iteration_seconds(stamps: list[float]) -> float:
    """Mean seconds of the iterations between the first and the last stamp, the first one excluded.

    The first iteration of a fresh optimiser allocates AdamW's moment buffers, so it is warm-up; the
    trainer's last iteration also flushes its loss log and is not delimited by a stamp. Needs >= 3 stamps.
    """
    if len(stamps) < 3:
        raise ValueError(f"need at least 3 iteration stamps to skip the first iteration, got {len(stamps)}")
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2)
