"""``--profile DIR``: where a step's time goes, per case, for the "profile first" part of tuning.

For every training-step case, one timed call of the case runs under ``torch.profiler`` (operator table by
self time, CPU and CUDA) and another under ``cProfile`` (functions by cumulative time, restricted to this
repository's ``benchmark/`` and ``methods/`` code and to transformers' Mask2Former, so that the table names
the file and function that dominate). Both go to ``DIR/<device>/<case>.txt``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

ROWS = 30
# Regular expression over "file:line(function)" for the cProfile table.
CODE_FILTER = r"benchmark/|methods/|mask2former|optim/adam|clip_grad"


def profile_run(run: Callable[[], object], device: str, title: str) -> str:
    """The two tables of ``run`` (one call under each profiler), as text."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    sort = "self_cuda_time_total" if ProfilerActivity.CUDA in activities else "self_cpu_time_total"
    operators = prof.key_averages().table(sort_by=sort, row_limit=ROWS)

    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(CODE_FILTER, ROWS)
    return (f"# {title}\n\n## torch.profiler operators (by {sort})\n\n{operators}\n\n"
            f"## cProfile, functions by cumulative time ({CODE_FILTER})\n\n{buffer.getvalue()}")


def write_profiles(runs: dict[str, Callable[[], object]], device: str, out_dir: Path) -> list[Path]:
    """One file per case under ``out_dir/<device>/``; returns the paths."""
    folder = Path(out_dir) / device
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, run in runs.items():
        path = folder / f"{name}.txt"
        path.write_text(profile_run(run, device, f"{name} on {device}"))
        paths.append(path)
    return paths
