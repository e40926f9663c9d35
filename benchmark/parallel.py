"""Running the grid (methods x protocols x seeds): sequentially, in joblib processes, or on SLURM.

One run on several GPUs is torchrun's job: ``torchrun --nproc_per_node K run_benchmark.py ...`` starts K
copies of the same command; each rank runs the same specs, the trainer wraps the model in DDP, and only
rank 0 writes the results store (benchmark.engine.device.DistributedContext).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from benchmark.errors import ConfigError, EnvironmentProblem, UserError

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


def _run_quiet(spec, preemption=None) -> str:
    """Worker entry (joblib / submitit): one run, its path as a string (picklable). A CPU run uses one torch
    thread (runner.CPU_THREADS), so parallel runs share the cores instead of oversubscribing them."""
    from benchmark.runner import run_one

    return str(run_one(spec, show_progress=False, preemption=preemption))


def default_jobs(specs: Sequence) -> int:
    """``--jobs auto``: how many runs go side by side on this machine.

    CPU runs: one per core, one torch thread each. The tiny preset's training step takes 0.21 s on one
    thread and 0.19 s on two (2-core machine, batch 8, 64 px: intra-op parallelism hardly helps a model
    this small), so two runs side by side nearly double the throughput. CUDA runs: one per GPU. Under
    torchrun every rank runs the whole grid itself: 1.
    """
    if not specs or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    if any(s.device.startswith("cuda") for s in specs):
        return max(1, min(len(specs), _cuda_count()))
    return max(1, min(len(specs), os.cpu_count() or 1))


def dispatch_order(specs: Sequence) -> list:
    """The grid reordered so that parallel workers do not queue on a shared step-0 lock, longest first.

    Runs whose step 0 is shared (the standard step 0, and joint training across splits with the same
    classes: runner.shares_step0) reuse it from a cache, trained once under a file lock. Dispatched in the
    CLI's order, a second worker would start, say, MiB and wait while fine-tune trains that step 0. So: the
    first run of each shared step 0 goes first, then every other run (own step 0 or a reused one). Within
    each of the two groups, runs go by their planned training iterations, most first (a reused step 0 does not
    count; ties keep the CLI's order): the short runs dispatched last fill the gaps at the end. Measured on the
    panoptic default (2 workers, 2026-12-06): the CLI's producer order (fine-tune, ECLIPSE, joint) left one
    worker idle for the last 57 s of a 10 min 37 s run; joint (2000 iterations) first shortens the tail.
    """
    from benchmark.runner import _step0_key, resolve, shares_step0

    producers, rest, seen = [], [], set()
    for spec in specs:
        r = resolve(spec)
        steps = r.step_iterations
        if not shares_step0(r):
            rest.append((sum(steps), spec))
            continue
        key = (spec.out, _step0_key(r))
        if key in seen:
            rest.append((sum(steps[1:]), spec))          # its step 0 is reused, not trained
        else:
            producers.append((sum(steps), spec))
        seen.add(key)
    return _most_iterations_first(producers) + _most_iterations_first(rest)


def _most_iterations_first(group: list) -> list:
    """The specs of ``(iterations, spec)`` pairs, most iterations first; Python's sort is stable (ties keep order)."""
    return [spec for _, spec in sorted(group, key=lambda item: -item[0])]


def prepare_synthetic(specs: Sequence) -> None:
    """Generate the synthetic datasets of the grid here, with a progress bar, before the workers start
    (they would otherwise wait on the generation lock, silently)."""
    from benchmark.data import ensure_synth
    from benchmark.runner import resolve

    for synth in {r.synth for r in map(resolve, specs) if r.protocol.dataset.startswith("synth")}:
        # A bar on a terminal; in a log file (SLURM, ``> file``) one plain line instead of carriage returns.
        terminal = sys.stderr.isatty()
        if not terminal:
            log.info("synthetic dataset (%d classes, %d images): generating unless cached", synth.num_classes,
                     synth.train_images + synth.val_images)
        folder = ensure_synth(synth, progress=terminal)
        if not terminal:
            log.info("synthetic dataset ready: %s", folder)


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

    from benchmark.progress import GridProgress, plan_units

    prepare_synthetic(specs)
    specs = _assign_gpus(dispatch_order(specs), jobs)
    out: list[Path] = []
    # The workers' progress is read from the results store (DONE markers, the iteration lines of log.txt).
    with GridProgress(plan_units(specs), desc=f"benchmark ({jobs} runs at a time)",
                      extra=lambda: f"{len(out)}/{len(specs)} runs finished"):
        # return_as="generator_unordered" streams results as runs finish.
        results = Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered")(
            delayed(_run_quiet)(s) for s in specs)
        for path in results:
            out.append(Path(path))
    return sorted(out)


def make_slurm_executor(partition: str | None = None, time: int = 24 * 60, gpus: int = 1,
                        folder: str = "results/slurm", cpus_per_task: int = 8, mem_gb: int = 64,
                        max_timeouts: int = 3, signal_delay_s: int = 120):
    """A submitit executor for SLURM: one job per run, ``gpus`` GPUs each (torchrun-style tasks).

    Jobs requeue themselves on timeout or preemption (:class:`RequeueableRun`): SLURM signals them
    ``signal_delay_s`` before the limit; a job is requeued after at most ``max_timeouts`` timeouts
    (preemptions do not count), then fails with its log folder named.
    """
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeouts)
    except RuntimeError as err:     # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise EnvironmentProblem(f"--launcher slurm: {err}",
                                 hint="run the command on a SLURM login node, or use the local launcher") from None
    params = dict(timeout_min=time, gpus_per_node=gpus, tasks_per_node=max(gpus, 1),
                  cpus_per_task=cpus_per_task, mem_gb=mem_gb, name="cisdq-bench",
                  slurm_signal_delay_s=signal_delay_s)
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor


def submit_grid(specs: Sequence, executor) -> list[Path]:
    """Submit one job per run with a submitit executor and wait for all of them.

    Works with any submitit executor (SLURM, or ``submitit.LocalExecutor`` in tests). A failing job's
    error is re-raised here with the job's log folder so the user can read it.
    """
    jobs = [executor.submit(RequeueableRun(), s) for s in specs]
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


class RequeueableRun:
    """A submitit job's callable that SLURM may requeue: one run, resumed where it stopped.

    SLURM signals the job (USR2, ``signal_delay_s`` before the time limit, or on preemption). The run
    stops at its next safe point (benchmark.engine.preemption: after the current iteration, with the
    in-step checkpoint written), then submitit's handler calls ``checkpoint``, pickles what it returns and
    requeues the job (``submitit.helpers.Checkpointable``'s protocol; at most ``max_num_timeout``
    timeouts, 3 by default; preemptions do not count). The requeued job runs the same spec again and the
    runner resumes: finished steps are skipped (DONE markers), the interrupted step continues from its
    checkpoint, so no iteration is repeated. ``overwrite`` is dropped from the resubmitted spec: the
    requeued job must resume its own run, not wipe it.
    """

    def __call__(self, spec) -> str:
        from benchmark.engine.preemption import Preempted, PreemptionSignal

        with PreemptionSignal() as stop:
            try:
                return _run_quiet(spec, preemption=stop)
            except Preempted as reason:
                log.warning("run %s/%s/seed%s: %s", spec.method, spec.protocol, spec.seed, reason)
                stop.act()          # submitit: checkpoint() below, requeue, exit
                raise

    def checkpoint(self, spec):
        import submitit

        log.warning("run %s/%s/seed%s interrupted (timeout or preemption): requeued, it resumes from its "
                    "last checkpoint", spec.method, spec.protocol, spec.seed)
        return submitit.helpers.DelayedSubmission(RequeueableRun(), replace(spec, overwrite=False))


def torchrun_env() -> dict[str, int]:
    """Rank facts from torchrun's environment (WORLD_SIZE 1 when not launched by torchrun)."""
    return {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))}
