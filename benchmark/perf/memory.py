"""Peak memory of one case, measured in a fresh subprocess so that cases do not hide each other.

torch allocates outside Python's allocator, so ``tracemalloc`` sees little of it. On the CPU the
subprocess reads its resident-set high-water mark ``VmHWM`` from ``/proc/self/status`` (per address space,
so unlike ``getrusage().ru_maxrss``, which Linux carries over ``fork`` and ``exec``, it starts with the
subprocess), and resets it after the case's set-up (``/proc/self/clear_refs``, Linux >= 4.0); loader
worker processes, when the case starts some, add their proportional set size (``Pss``) at the end of the
work. On CUDA it reads ``torch.cuda.max_memory_allocated``. Two numbers per case: ``peak`` (on the CPU the
whole process, interpreter, torch and the case's data included; on CUDA every tensor on the device) and
``above_setup`` (how far the measured work rose above what was resident when it started: activations,
gradients, optimiser state, temporaries).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmark.perf.settings import PerfSettings

RESULT_PREFIX = "PERF_MEMORY "
MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryResult:
    peak: float          # MiB
    above_setup: float   # MiB

    def to_dict(self) -> dict[str, float]:
        return {"peak": round(self.peak, 1), "above_setup": round(self.above_setup, 1)}


def _status_bytes(field: str, pid: str = "self") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` in bytes, None where there is no procfs."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _children_pss() -> int:
    """Proportional set size of this process's children (loader workers), in bytes."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                pids = fh.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as fh:
                    total += sum(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))
            except OSError:
                continue
    return total


def _cpu_measure(work: Callable[[], object]) -> MemoryResult:
    setup_peak = _status_bytes("VmHWM")
    if setup_peak is None or not _reset_peak():
        # No procfs (macOS): ru_maxrss of this process (bytes there), a bound of the case's own peak.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        work()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024
        return MemoryResult(peak * scale / MIB, (peak - before) * scale / MIB)
    before = _status_bytes("VmRSS") or 0
    work()
    workers = _children_pss()
    work_peak = (_status_bytes("VmHWM") or 0) + workers
    return MemoryResult(max(setup_peak, work_peak) / MIB, max(0, work_peak - before) / MIB)


def measure_in_process(settings: PerfSettings, device: str, case: str, work_dir: Path) -> MemoryResult:
    """Build ``case``, run its workload once, and report the peak (call in a fresh process)."""
    from benchmark.perf.cases import CaseBuilder, memory_workload

    torch.set_num_threads(settings.threads)
    settings.apply_heap_setting()
    builder = CaseBuilder(settings, device, work_dir)
    work, cleanup = memory_workload(builder, case)
    gc.collect()
    try:
        if torch.device(device).type != "cuda":
            return _cpu_measure(work)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryResult(peak / MIB, (peak - before) / MIB)
    finally:
        cleanup()


def measure(settings: PerfSettings, device: str, case: str, work_dir: Path, timeout: float = 3600) -> MemoryResult:
    """Run :func:`measure_in_process` in a new interpreter (``python -m benchmark.perf --memory-case``)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmark.perf", "--memory-case", case, "--memory-device", device,
               "--memory-work-dir", str(work_dir), "--memory-settings", json.dumps(settings.to_dict())]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
        raise RuntimeError(f"the memory measurement of case {case!r} on {device} failed "
                           f"(exit code {done.returncode}):\n{tail}")
    data = json.loads(lines[-1][len(RESULT_PREFIX):])
    return MemoryResult(data["peak"], data["above_setup"])


def report_line(result: MemoryResult) -> str:
    """What the subprocess prints for :func:`measure` to read."""
    return RESULT_PREFIX + json.dumps({"peak": result.peak, "above_setup": result.above_setup})
