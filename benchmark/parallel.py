"""Running the grid (methods x protocols x seeds): sequentially, in joblib processes, or on SLURM.

One run on several GPUs is torchrun's job: ``torchrun --nproc_per_node K run_benchmark.py ...`` starts K
copies of the same command; each rank runs the same specs, the trainer wraps the model in DDP, and only
rank 0 writes the results store (benchmark.engine.device.DistributedContext).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from benchmark.errors import ConfigError, UserError

log = logging.getLogger(__name__)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _assign_gpus(specs: Sequence, jobs: int) -> list:
    """One GPU per parallel process: spec i of the grid gets cuda:(i mod #GPUs)."""
    n = _cuda_count()
    if n <= 1 or jobs <= 1:
        return list(specs)
    return [replace(s, device=f"cuda:{i % n}") if s.device.startswith("cuda") else s for i, s in enumerate(specs)]


def _run_quiet(spec) -> str:
    """Worker entry (joblib / submitit): one run, its path as a string (picklable)."""
    from benchmark.runner import run_one

    return str(run_one(spec, show_progress=False))


def run_grid(specs: Sequence, jobs: int = 1, launcher: str = "local", slurm: dict | None = None) -> list[Path]:
    """Run every spec; returns the run folders. User errors of any run are raised as they are."""
    if not specs:
        return []
    if launcher == "slurm":
        return submit_grid(specs, executor=make_slurm_executor(**(slurm or {})))
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(specs) == 1:
        from benchmark.runner import run_sequence

        return run_sequence(specs)
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    specs = _assign_gpus(specs, jobs)
    out: list[Path] = []
    with tqdm(total=len(specs), desc="runs", unit="run") as bar:
        # return_as="generator" streams results as runs finish, so the bar moves.
        results = Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered")(
            delayed(_run_quiet)(s) for s in specs)
        for path in results:
            out.append(Path(path))
            bar.update(1)
    return sorted(out)


def make_slurm_executor(partition: str | None = None, time: int = 24 * 60, gpus: int = 1,
                        folder: str = "results/slurm", cpus_per_task: int = 8, mem_gb: int = 64):
    """A submitit executor for SLURM: one job per run, ``gpus`` GPUs each (torchrun-style tasks)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = dict(timeout_min=time, gpus_per_node=gpus, tasks_per_node=max(gpus, 1),
                  cpus_per_task=cpus_per_task, mem_gb=mem_gb, name="cisdq-bench")
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor


def submit_grid(specs: Sequence, executor) -> list[Path]:
    """Submit one job per run with a submitit executor and wait for all of them.

    Works with any submitit executor (SLURM, or ``submitit.LocalExecutor`` in tests). A failing job's
    error is re-raised here with the job's log folder so the user can read it.
    """
    jobs = [executor.submit(_run_quiet, s) for s in specs]
    log.info("submitted %d job(s): %s", len(jobs), ", ".join(str(j.job_id) for j in jobs))
    out = []
    for spec, job in zip(specs, jobs):
        try:
            out.append(Path(job.result()))
        except UserError:
            raise
        except Exception as err:  # submitit wraps the worker's exception
            raise UserError(f"run {spec.method}/{spec.protocol}/seed{spec.seed} failed in job {job.job_id}: "
                            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}",
                            hint=f"see the job's logs under {getattr(job, 'paths', None) and job.paths.folder}")
    return out


def torchrun_env() -> dict[str, int]:
    """Rank facts from torchrun's environment (WORLD_SIZE 1 when not launched by torchrun)."""
    return {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))}
