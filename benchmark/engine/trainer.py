"""The training loop of one continual step, shared by every method.

Per iteration: ``accumulation`` micro-batches, each ``outputs = model(pixel_values, pixel_mask)``, the
frozen old model once on the same batch (no grad) when the method needs it, ``method.loss`` (named,
already weighted terms), their sum back-propagated (GradScaler with fp16 AMP); then full-model L2
gradient clipping, the AdamW step and the poly LR step. Every ``checkpoint_every`` iterations and at the
end an atomic in-step checkpoint is written (rank 0 only) from which an interrupted step resumes
exactly. The loop reads loss values from the device only at log points: the per-iteration overhead is a
few tiny kernel launches.

The runner's part of a step: build the model, load the previous weights, build the old model with
:func:`freeze_old_model` (before the head grows), ``method.configure_model``, ``method.before_step``, then
:func:`train_step_loop`, then ``method.after_step``. On resume the trainer restores
``method.state_dict()`` after ``before_step`` ran again, so a resumed step continues with the saved state.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from benchmark.batch import Batch
from benchmark.engine.checkpoint import capture_rank_state, resume, save_checkpoint
from benchmark.engine.device import DistributedContext, plan_batches, resolve_amp
from benchmark.engine.optim import AMP_DTYPES, TrainConfig, build_optimizer, build_scheduler
from benchmark.engine.preemption import Preempted
from benchmark.errors import ConfigError, EnvironmentProblem, UserError
from benchmark.progress import PROGRESS_RECORD

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class StepLog:
    """What a step's training reports (into run.json).

    term_means: mean of every named loss term over the step's iterations (per micro-batch values);
    history: one row per log point with the window means of ``loss`` (sum of terms), every term, the
    learning rate of the head (the largest group lr) and, when clipping is on, the mean pre-clip
    ``grad_norm`` over finite norms and ``overflow_steps`` (iterations whose gradient overflowed, which
    the fp16 GradScaler skips). ``start_iteration`` is where this call started (> 0 after a resume);
    ``wall_time_s`` adds up every interrupted part.
    """

    step: int
    iterations: int
    start_iteration: int
    wall_time_s: float
    term_means: dict[str, float]
    loss_mean: float
    history: list[dict[str, float]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One readable log line: iterations, time, speed, mean loss and every term's mean (log.txt)."""
        done = self.iterations - self.start_iteration
        speed = f", {done / self.wall_time_s:.2f} it/s" if self.wall_time_s > 0 and done > 0 else ""
        resumed = f" (resumed at {self.start_iteration})" if self.start_iteration else ""
        terms = ", ".join(f"{k} {v:.4g}" for k, v in self.term_means.items())
        cost = self.cost
        memory = f", peak memory {cost['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in cost else ""
        params = (f", {cost['trainable_params']:,} of {cost['total_params']:,} parameters trained"
                  if "total_params" in cost else "")
        return (f"{self.iterations} iterations{resumed} in {self.wall_time_s:.1f} s{speed}{memory}{params}; "
                f"mean loss {self.loss_mean:.4g} ({terms})")


def freeze_old_model(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The previous step's model for distillation: a copy in eval mode with gradients off.

    Uses ``model.frozen_copy()`` when the model provides it (the engine's SegModel does), else a deep
    copy. Call it before the method grows the head, so that the copy predicts the old classes only.
    """
    old = model.frozen_copy() if hasattr(model, "frozen_copy") else copy.deepcopy(model)
    old.eval()
    old.requires_grad_(False)
    return old.to(device) if device is not None else old


def step_config(cfg: TrainConfig, method: Any, ctx: Any, *, layout: Any, world_size: int, amp: bool,
                fingerprint: str = "") -> dict[str, Any]:
    """The settings the trained weights depend on; the in-step checkpoint must match them to resume.

    ``fingerprint`` carries what the trainer cannot see (seed, data and engine settings): the runner
    passes the hash of its resolved run configuration.
    """
    protocol = getattr(ctx, "protocol", None)
    protocol_id = getattr(protocol, "fingerprint", None)
    protocol_id = protocol_id() if callable(protocol_id) else protocol_id
    hparams = getattr(method, "hparams", None)
    return {
        "train": cfg.result_settings(),
        "method": {"name": _method_name(method),
                   "hparams": hparams.to_dict() if hasattr(hparams, "to_dict") else hparams},
        "step": {"index": ctx.step, "num_old": ctx.num_old, "num_seen": ctx.num_seen, "task": ctx.task,
                 "protocol": protocol_id if protocol_id is not None else getattr(protocol, "name", None)},
        "layout": layout,
        "world_size": world_size,
        "amp": amp,
        "fingerprint": fingerprint,
    }


class _LossLog:
    """Running loss bookkeeping without device synchronisation between log points.

    Each micro-batch's terms are stacked into one detached vector and added to the window sum of its
    key set (methods may return different terms on different batches); log points read the window
    (one transfer per key set) into a history row and the step totals.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.window: dict[tuple[str, ...], list] = {}     # keys -> [sum vector (float32), count]
        self.grad_norm: list = [None, 0]                   # [sum tensor, count]
        self.totals: dict[str, list[float]] = {}           # name -> [sum, count]
        self.history: list[dict[str, float]] = []
        self.wall_time = 0.0

    def add(self, terms: Mapping[str, Tensor]) -> None:
        keys = tuple(terms)
        values = torch.stack([v.detach().float() for v in terms.values()])
        slot = self.window.get(keys)
        if slot is None:
            self.window[keys] = [values, 1]
        else:
            slot[0] = slot[0] + values
            slot[1] += 1

    def add_grad_norm(self, norm: Tensor) -> None:
        """Pre-clip total norm; non-finite norms (fp16 overflow: the GradScaler skips that step) are
        counted apart, on the device, so that they neither poison the mean nor force a sync."""
        norm = norm.detach().float()
        finite = torch.isfinite(norm)
        entry = torch.stack([torch.where(finite, norm, 0.0), finite.float(), (~finite).float()])
        self.grad_norm = [entry if self.grad_norm[0] is None else self.grad_norm[0] + entry, self.grad_norm[1] + 1]

    def flush(self, iteration: int, lr: float) -> dict[str, float]:
        row: dict[str, float] = {"iteration": iteration, "lr": lr}
        sums: dict[str, list[float]] = {}
        for keys, (vector, count) in self.window.items():
            for name, value in zip(keys, vector.tolist()):
                entry = sums.setdefault(name, [0.0, 0])
                entry[0] += value
                entry[1] += count
        row["loss"] = sum(s / n for s, n in sums.values())
        for name, (s, n) in sums.items():
            row[name] = s / n
            total = self.totals.setdefault(name, [0.0, 0])
            total[0] += s
            total[1] += n
        if self.grad_norm[1]:
            norm_sum, finite, overflow = self.grad_norm[0].tolist()
            row["grad_norm"] = norm_sum / finite if finite else math.nan
            row["overflow_steps"] = overflow
        self.window.clear()
        self.grad_norm = [None, 0]
        self.history.append(row)
        return row

    def state(self) -> dict[str, Any]:
        gn = self.grad_norm
        return {
            "window": [(list(k), v.tolist(), n) for k, (v, n) in self.window.items()],
            "grad_norm": [None if gn[0] is None else gn[0].tolist(), gn[1]],
            "totals": {k: list(v) for k, v in self.totals.items()},
            "history": [dict(r) for r in self.history],
            "wall_time": self.wall_time,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        as_tensor = lambda x: torch.tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        self.window = {tuple(k): [as_tensor(v), n] for k, v, n in state["window"]}
        gn = state["grad_norm"]
        self.grad_norm = [None if gn[0] is None else as_tensor(gn[0]), gn[1]]
        self.totals = {k: list(v) for k, v in state["totals"].items()}
        self.history = [dict(r) for r in state["history"]]
        self.wall_time = float(state["wall_time"])

    def result(self, step: int, iterations: int, start: int) -> StepLog:
        means = {k: s / n for k, (s, n) in self.totals.items()}
        return StepLog(step=step, iterations=iterations, start_iteration=start, wall_time_s=self.wall_time,
                       term_means=means, loss_mean=sum(means.values()), history=list(self.history))


def _method_name(method: Any) -> str:
    return getattr(method, "name", type(method).__name__)


def _total_loss(terms: Any, method: Any) -> Tensor:
    name = _method_name(method)
    if not isinstance(terms, Mapping) or not terms:
        raise TypeError(f"method {name!r}: loss() must return a non-empty dict of named scalar tensors, "
                        f"got {type(terms).__name__}")
    for key, value in terms.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"method {name!r}: loss term {key!r} must be a scalar tensor, got {shape}")
    total = sum(terms.values())
    if not total.requires_grad:
        raise RuntimeError(f"method {name!r}: no loss term depends on a trainable parameter "
                           f"(terms {sorted(terms)}); nothing can be trained")
    return total


def _all_finite(value: float, dist: DistributedContext, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together)."""
    finite = math.isfinite(value)
    if not dist.active:
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return bool(flag.item())


def _iteration_row(terms: list[Mapping[str, Tensor]], lr: float, grad_norm: Tensor | None) -> dict[str, float]:
    """One iteration's values: each term's mean over the micro-batches that have it, their sum, lr, norm."""
    sums: dict[str, list[float]] = {}
    for micro in terms:
        for name, value in micro.items():
            entry = sums.setdefault(name, [0.0, 0])
            entry[0] += float(value)
            entry[1] += 1
    means = {name: total / count for name, (total, count) in sums.items()}
    row = {"loss": sum(means.values()), **means, "lr": lr}
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    return row


def _any_rank(flag: bool, dist: DistributedContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on some rank (a signal may reach the ranks at different iterations)."""
    if not dist.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_step_loop(model: nn.Module, method: Any, ctx: Any, loader: Iterable, cfg: TrainConfig, *,
                    checkpoint_path: str | Path | None, device: torch.device | str,
                    dist: DistributedContext | None = None, progress: bool = True,
                    fingerprint: str = "", desc: str | None = None,
                    stop: Callable[[], bool] | None = None,
                    on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> StepLog:
    """Train ``model`` for ``cfg.iterations`` iterations of one continual step and return its log.

    model:      the bare model (already configured for the step); wrapped in DDP here when ``dist`` is active.
    method:     supplies ``loss(batch, outputs, old_outputs, ctx)``, ``needs_old_model`` and its state.
    ctx:        the StepContext; ``ctx.old_model`` (from :func:`freeze_old_model`) runs once per batch
                under ``torch.no_grad`` (not ``inference_mode``: inference tensors cannot be saved for
                backward, and distillation losses multiply them with student outputs).
                ``ctx.iteration`` is the 0-based iteration being computed.
    loader:     an infinite iterator of Batch of ``plan_batches(...).micro_batch`` images per process,
                with ``state_dict()`` / ``load_state_dict()`` (its randomness a function of its position).
    checkpoint_path: the step's in-step checkpoint; an existing one written by the same settings is
                resumed (a different configuration raises ConfigError); None disables checkpoints.
    fingerprint: the runner's hash of everything else the result depends on (see :func:`step_config`).
    stop:       polled after every iteration (on any rank: all ranks stop together); when it returns true
                the in-step checkpoint is written and :class:`~benchmark.engine.preemption.Preempted` is
                raised (a cluster's timeout / preemption signal, benchmark.engine.preemption).
    on_iteration: called on rank 0 after every iteration with (iterations done, {"loss", every term (means
                over the iteration's micro-batches), "lr", "grad_norm" (pre-clip, when clipping)}) for
                experiment tracking (benchmark.tracking); reading the values synchronises the device once
                per iteration, so it is only done when a callback is given.
    progress:   show a tqdm bar (loss, ETA) on rank 0 when stderr is a terminal. Rank 0 also logs a line
                per log point through ``logging`` (marked PROGRESS_RECORD, so that a console showing the bar
                can drop it; log.txt keeps it). ``desc`` labels the bar (default ``step <t>``).

    Under DDP (``broadcast_buffers=False`` as detectron2), every trainable parameter must receive a
    gradient from the loss each iteration, or be frozen; ``cfg.find_unused_parameters`` covers parameters
    a forward leaves unused. Only rank 0 writes the checkpoint and shows progress; each rank keeps its
    own RNG, loader position and loss log in the checkpoint and resumes from them.
    """
    dist = dist or DistributedContext()
    device = torch.device(device)
    if dist.active and device.type == "cuda" and device.index != torch.cuda.current_device():
        raise EnvironmentProblem(
            f"rank {dist.rank} was asked to train on {device}, but its process group is bound to "
            f"cuda:{torch.cuda.current_device()} (local rank {dist.local_rank})",
            hint="train every rank on its own GPU: device = dist.device(requested) after DistributedContext.from_env")
    plan = plan_batches(cfg.batch_size, dist.world_size, cfg.max_device_batch)
    amp = resolve_amp(cfg.amp, device)
    amp_dtype = AMP_DTYPES[cfg.amp_dtype]

    model.to(device)
    model.train()
    old_model = ctx.old_model if method.needs_old_model else None
    if old_model is not None:
        old_model.to(device).eval()
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    config = step_config(cfg, method, ctx, layout=getattr(model, "layout", None), world_size=dist.world_size,
                         amp=amp, fingerprint=fingerprint)

    log = _LossLog(device)
    resumed = resume(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                     loader=loader, method=method, config=config, rank=dist.rank, device=device)
    start = 0
    if resumed is not None:
        start = resumed.iteration
        log.load(resumed.extra["log"])
        if dist.is_main:
            logger.info("step %d: resuming from iteration %d/%d (%s)", ctx.step, start, cfg.iterations,
                        checkpoint_path)
    ctx.iterations = cfg.iterations
    if start >= cfg.iterations:
        ctx.iteration = cfg.iterations
        return log.result(ctx.step, cfg.iterations, start)

    net: nn.Module = model
    if dist.active:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False, find_unused_parameters=cfg.find_unused_parameters)
    clip_params = [p for group in optimizer.param_groups for p in group["params"]]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp)
    batches = iter(loader)
    show_bar = progress and dist.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc or f"step {ctx.step}", unit="it", dynamic_ncols=True,
               disable=not show_bar)
    segment_start = time.perf_counter()
    wall_before = log.wall_time

    def forward_backward(batch: Batch) -> dict[str, Tensor]:
        # A function, so that the outputs and the old model's outputs are freed before the next
        # forward allocates its own (otherwise two sets of activations coexist at the peak).
        with autocast:
            outputs = net(batch.pixel_values, batch.pixel_mask)
            old_outputs = None
            if old_model is not None:
                with torch.no_grad():
                    old_outputs = old_model(batch.pixel_values, batch.pixel_mask)
            terms = method.loss(batch, outputs, old_outputs, ctx)
        total = _total_loss(terms, method)
        if plan.accumulation > 1:
            total = total / plan.accumulation
        scaler.scale(total).backward()
        return {name: value.detach() for name, value in terms.items()}

    def save(done: int) -> None:
        log.wall_time = wall_before + time.perf_counter() - segment_start
        rank_states = dist.all_gather_object(capture_rank_state(loader, device, extra={"log": log.state()}))
        if dist.is_main:
            save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            method=method, iteration=done, config=config, rank_states=rank_states)

    try:
        for it in range(start, cfg.iterations):
            ctx.iteration = it
            optimizer.zero_grad(set_to_none=True)
            iteration_terms = []
            for micro in range(plan.accumulation):
                batch = next(batches)
                if len(batch) != plan.micro_batch:
                    raise ConfigError(
                        f"the loader yields batches of {len(batch)} images, but each process needs micro-batches "
                        f"of {plan.micro_batch} (global batch {plan.global_batch} over {plan.world_size} "
                        f"process(es), {plan.accumulation} accumulation step(s))",
                        hint="build the loader with plan_batches(batch_size, world_size, max_device_batch).micro_batch")
                sync = micro == plan.accumulation - 1 or not dist.active
                with nullcontext() if sync else net.no_sync():
                    terms = forward_backward(batch.to(device))
                    log.add(terms)
                    if on_iteration is not None:
                        iteration_terms.append(terms)
            scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip)
                log.add_grad_norm(grad_norm)
            scaler.step(optimizer)
            scaler.update()
            done = it + 1
            log_point = done % cfg.log_every == 0 or done == cfg.iterations
            lr = max(group["lr"] for group in optimizer.param_groups)   # the lr this iteration used
            if scaler.is_enabled():
                # A step the GradScaler skips (overflow) makes torch warn that the scheduler stepped
                # before the optimiser; the order is right, the schedule intentionally moves on.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                    scheduler.step()
            else:
                scheduler.step()
            bar.update(1)
            if on_iteration is not None and dist.is_main:
                on_iteration(done, _iteration_row(iteration_terms, lr, grad_norm))

            if log_point:
                row = log.flush(done, lr)
                if not scaler.is_enabled() and not _all_finite(row["loss"], dist, device):
                    bad = sorted(k for k, v in row.items() if not math.isfinite(v))
                    raise TrainingDiverged(
                        f"step {ctx.step}: the loss is not finite at iteration {done} (terms {bad})",
                        hint=f"lower the learning rate (now {cfg.lr}), keep gradient clipping on (now "
                             f"{cfg.grad_clip}) or check the listed loss terms of method {_method_name(method)!r}")
                if show_bar:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                if dist.is_main:
                    # Always written (log.txt, and the grid's progress reads it: benchmark.progress); a
                    # console that shows the bar drops it (PROGRESS_RECORD, benchmark.cli).
                    elapsed = time.perf_counter() - segment_start
                    eta = elapsed / (done - start) * (cfg.iterations - done)
                    logger.info("step %d: iteration %d/%d loss %.4f lr %.2e eta %s", ctx.step, done,
                                cfg.iterations, row["loss"], lr, _format_eta(eta), extra={PROGRESS_RECORD: True})
            saved = checkpoint_path is not None and (
                done == cfg.iterations or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0))
            if saved:
                save(done)
            if stop is not None and _any_rank(stop(), dist, device):
                if checkpoint_path is not None and not saved:
                    save(done)
                raise Preempted(f"step {ctx.step} stopped at iteration {done} of {cfg.iterations}"
                                + ("; its checkpoint is saved" if checkpoint_path is not None else ""))
    finally:
        bar.close()
    log.wall_time = wall_before + time.perf_counter() - segment_start
    ctx.iteration = cfg.iterations
    dist.barrier()
    return replace(log.result(ctx.step, cfg.iterations, start),
                   cost=step_cost(model, device, cfg.iterations * cfg.batch_size, log.wall_time, dist.world_size))


def step_cost(model: nn.Module, device: torch.device, images: int, wall_time_s: float, world_size: int) -> dict:
    """What a step cost (stored in its DONE record and the report's cost table).

    wall_time_s: training time of the step, every resumed part added; images_per_s: training images (all
    ranks) per second of it; device_hours: wall time x processes; peak_memory_mib: on CUDA the allocator's
    ``max_memory_allocated`` of this process, on the CPU the process's peak resident set (``ru_maxrss``,
    which also counts what the process held before the step); parameters: trainable (requires_grad) and
    total of the model being trained (the old model of distillation not included)."""
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    else:
        import resource

        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
    params = list(model.parameters())
    return {"wall_time_s": round(wall_time_s, 3),
            "images_per_s": round(images / wall_time_s, 3) if wall_time_s > 0 else None,
            "device_hours": round(wall_time_s * world_size / 3600, 6), "devices": world_size,
            "device_type": device.type, "peak_memory_mib": round(peak, 1), "peak_memory_kind": kind,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params)}
