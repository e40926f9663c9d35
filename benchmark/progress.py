"""Progress of a grid of runs, counted in training iterations and read from the results store.

A grid's work is a list of :class:`Unit` s, one per training step that will really be trained: a shared
step 0 (``runner._shared_step0``, joint training included) is one unit for all the runs that reuse it, since
it is trained once.
Their iterations come from the resolved schedules, so a 900-iteration step 0 weighs nine 100-iteration
increments and the ETA (elapsed / iterations done x iterations left) is not skewed by step counts.

What is done is read from the files the runs write anyway, which works the same for runs in this process,
in joblib workers and after a resume: a unit is done when its ``step_XX/DONE`` marker exists; a unit in
training reports its iteration through the trainer's ``step t: iteration i/n`` lines in the run's
``log.txt``. Evaluation time is not counted (the ETA is an iteration ETA, as the bar says).

Display: a tqdm bar when stderr is a terminal; otherwise (SLURM logs, ``> file``) a plain log line every
``interval`` seconds, with no carriage returns.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

# Attribute the trainer sets on its "step t: iteration i/n" log records: a console showing bars drops them
# (:func:`console_filter`), log.txt keeps them.
PROGRESS_RECORD = "progress_line"
# "step 1: iteration 40/100 ..." and "step 1: resuming from iteration 40/100 ..." (engine.trainer)
ITERATION_LINE = re.compile(r"step (\d+): (?:resuming from )?iteration (\d+)/(\d+)")
_TAIL_BYTES = 8192


def console_filter(record: logging.LogRecord) -> bool:
    """A logging filter for a terminal console: the iteration lines are shown by the bars instead."""
    return not getattr(record, PROGRESS_RECORD, False)


@dataclass(frozen=True)
class Unit:
    """One training step of the grid: its iterations, its DONE marker and the logs that report it."""

    step: int
    iterations: int
    done_file: Path
    logs: tuple[Path, ...]
    label: str


def plan_units(specs: Sequence) -> list[Unit]:
    """The grid's training steps; a shared step 0 counts once (the runner trains it once per key)."""
    from benchmark.runner import _step0_key, resolve, shares_step0

    units: list[Unit] = []
    shared: dict[tuple[str, str], int] = {}
    for spec in specs:
        r = resolve(spec)
        run_dir = spec.run_dir(r.protocol.name)
        for t, iterations in enumerate(r.step_iterations):
            label = f"{spec.method} seed {spec.seed} step {t}"
            if t == 0 and shares_step0(r):
                key = (str(spec.out), _step0_key(r))
                done = Path(spec.out) / "_step0" / key[1] / "step_00" / "DONE"
                if key in shared:          # another run of the grid may train it: any of their logs tells
                    i = shared[key]
                    units[i] = Unit(0, iterations, done, units[i].logs + (run_dir / "log.txt",), units[i].label)
                    continue
                shared[key] = len(units)
                # ECLIPSE's own step 0 is cached like the shared one but is a different model: name it
                what = ("joint" if r.method.joint else
                        f"{r.method.own_step0_recipe} step 0" if r.method.own_step0_recipe else "shared step 0")
                units.append(Unit(0, iterations, done, (run_dir / "log.txt",), f"{what} (seed {spec.seed})"))
            else:
                units.append(Unit(t, iterations, run_dir / f"step_{t:02d}" / "DONE", (run_dir / "log.txt",), label))
    return units


def _log_iteration(path: Path, step: int) -> int:
    """The last iteration of ``step`` reported in the tail of a log (0 if none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - _TAIL_BYTES))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return 0
    found = [int(i) for t, i, _ in ITERATION_LINE.findall(tail) if int(t) == step]
    return found[-1] if found else 0


@dataclass(frozen=True)
class Snapshot:
    done: int                     # iterations of finished steps + iterations reached in running steps
    total: int
    active: tuple[str, ...]       # "<label> i/n" of the units in training


def snapshot(units: Sequence[Unit]) -> Snapshot:
    done, active = 0, []
    for unit in units:
        if unit.done_file.exists():
            done += unit.iterations
            continue
        reached = min(unit.iterations, max((_log_iteration(p, unit.step) for p in unit.logs), default=0))
        if 0 < reached < unit.iterations:
            active.append(f"{unit.label} {reached}/{unit.iterations}")
        done += reached
    return Snapshot(done, sum(u.iterations for u in units), tuple(active))


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(snap: Snapshot, start_done: int, elapsed: float) -> str:
    """``progress: 1200/5100 iterations (23.5%), elapsed 3m12s, ETA 10m25s; <active units>``."""
    pct = 100.0 * snap.done / snap.total if snap.total else 100.0
    gained = snap.done - start_done
    eta = format_seconds(elapsed / gained * (snap.total - snap.done)) if gained > 0 else "unknown"
    text = f"progress: {snap.done}/{snap.total} iterations ({pct:.1f}%), elapsed {format_seconds(elapsed)}, ETA {eta}"
    return text + (f"; training: {', '.join(snap.active)}" if snap.active else "")


class GridProgress:
    """Follows a grid's units in a background thread while the runs go on (a context manager).

    ``extra`` is a callable returning a short text appended to the bar (e.g. "3/6 runs finished").
    """

    def __init__(self, units: Sequence[Unit], desc: str = "benchmark", interval: float = 30.0,
                 poll: float = 1.0, terminal: bool | None = None, extra=None):
        self.units = list(units)
        self.desc = desc
        self.interval = interval
        self.poll = poll
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.extra = extra
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def __enter__(self) -> "GridProgress":
        first = snapshot(self.units)
        self._start_done, self._t0 = first.done, time.perf_counter()
        if self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=first.total, initial=first.done, desc=self.desc, unit="it", position=0,
                             dynamic_ncols=True)
        else:
            log.info("%s: %d training iterations in %d steps, %d already done", self.desc, first.total,
                     len(self.units), first.done)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        last_line = time.perf_counter()
        while not self._stop.wait(self.poll):
            if self._bar is not None:
                self.update()
            elif time.perf_counter() - last_line >= self.interval:
                self.update()
                last_line = time.perf_counter()

    def update(self) -> Snapshot:
        snap = snapshot(self.units)
        extra = self.extra() if self.extra else ""
        if self._bar is not None:
            self._bar.update(snap.done - self._bar.n)
            self._bar.set_postfix_str("; ".join([*snap.active, extra] if extra else snap.active), refresh=True)
        else:
            line = progress_line(snap, self._start_done, time.perf_counter() - self._t0)
            log.info("%s%s", line, f" ({extra})" if extra else "")
        return snap

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.update()
        if self._bar is not None:
            self._bar.close()
