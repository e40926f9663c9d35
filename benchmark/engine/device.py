"""Devices, mixed precision, torchrun/DDP process groups, batch planning and seeding.

Everything here touches process-wide state (CUDA, the default process group, the global RNGs) on
purpose and only when called; nothing happens at import.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from benchmark.errors import ConfigError, EnvironmentProblem

DEVICE_CHOICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("auto", "on", "off")


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """Turn a device setting into a ``torch.device``.

    ``auto`` picks a GPU when CUDA is usable, else the CPU; ``cuda`` (or ``cuda:N``) fails with
    :class:`EnvironmentProblem` when CUDA is absent instead of silently training on the CPU. Without an
    explicit index a process takes GPU ``local_rank % visible GPUs``: under torchrun the GPU of its local
    rank, and under schedulers that show each process only its own GPU, that GPU.
    """
    name = str(requested).strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"device {requested!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})",
                hint="run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu "
                     "(or auto) to train on the CPU",
            )
        count = torch.cuda.device_count()
        index = local_rank % count
        if ":" in name:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"invalid device {requested!r}", hint="use cuda or cuda:<index>") from None
        if not 0 <= index < count:
            raise EnvironmentProblem(
                f"device {requested!r} (GPU index {index}) does not exist: {count} GPU(s) visible",
                hint="check CUDA_VISIBLE_DEVICES and the number of processes per node given to torchrun",
            )
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {requested!r}", hint=f"choose one of {', '.join(DEVICE_CHOICES)}")


def resolve_amp(setting: str, device: torch.device) -> bool:
    """Whether to train with automatic mixed precision: ``auto`` = on CUDA only (as the paper configs,
    ``SOLVER.AMP.ENABLED True``); ``on`` needs CUDA because the engine's AMP is CUDA fp16/bf16 + GradScaler.
    """
    if setting not in AMP_CHOICES:
        raise ConfigError(f"unknown amp setting {setting!r}", hint=f"choose one of {', '.join(AMP_CHOICES)}")
    if setting == "off":
        return False
    if device.type == "cuda":
        return True
    if setting == "on":
        raise ConfigError(
            f"amp=on needs a CUDA device, but training runs on {device}",
            hint="use amp=auto (AMP on CUDA only) or amp=off on the CPU",
        )
    return False


def check_torchvision() -> None:
    """Fail early, with the fix, when an installed torchvision cannot work with this torch.

    The PyPI torchvision wheel is a CUDA build; next to the CPU torch its import fails ("operator
    torchvision::nms does not exist") and, because transformers imports it whenever it is installed, it
    also breaks every transformers model import (engine.md). torchvision is optional: absent is fine.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
        # The import can succeed while the compiled ops are missing; the ops registry tells.
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup raises when the op is not registered
    except Exception as exc:  # any failure means the install is unusable; report it with the fix
        location = getattr(importlib.util.find_spec("torchvision"), "origin", None) or "site-packages"
        raise EnvironmentProblem(
            f"torchvision is installed ({location}) but does not work with torch {torch.__version__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
            hint="the PyPI torchvision wheel is a CUDA build that breaks the CPU torch and transformers' model "
                 "imports; this tool does not need it: remove it with `pip uninstall -y torchvision timm`, or on "
                 "a CUDA install use a torchvision built for this exact torch version",
        ) from exc


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device).

    CPU kernels are deterministic for a fixed thread count, so seeding alone makes CPU runs repeatable.
    ``deterministic=True`` also asks torch for deterministic CUDA kernels (slower; ops without a
    deterministic version only warn), for debugging GPU runs.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split over processes and gradient-accumulation micro-batches.

    Each optimisation step every rank runs ``accumulation`` micro-batches of ``micro_batch`` images, so
    ``micro_batch * accumulation * world_size == global_batch`` exactly: the configured global batch (the
    paper's ``IMS_PER_BATCH``) is kept whatever the hardware.
    """

    global_batch: int
    world_size: int
    per_rank: int
    micro_batch: int
    accumulation: int


def plan_batches(global_batch: int, world_size: int = 1, max_device_batch: int | None = None) -> BatchPlan:
    """Per-rank batch = global / world size; split it into equal micro-batches no larger than
    ``max_device_batch`` (the smallest number of accumulation steps that divides it evenly)."""
    if global_batch < 1 or world_size < 1:
        raise ConfigError(f"batch size {global_batch} and world size {world_size} must be positive")
    if global_batch % world_size:
        raise ConfigError(
            f"the global batch size {global_batch} is not divisible by the {world_size} training processes",
            hint="choose a batch size that is a multiple of the number of GPUs/processes, or change the number "
                 "of processes given to torchrun",
        )
    per_rank = global_batch // world_size
    if max_device_batch is None or per_rank <= max_device_batch:
        return BatchPlan(global_batch, world_size, per_rank, per_rank, 1)
    if max_device_batch < 1:
        raise ConfigError(f"max_device_batch must be at least 1, got {max_device_batch}")
    accumulation = math.ceil(per_rank / max_device_batch)
    while per_rank % accumulation:
        accumulation += 1
    return BatchPlan(global_batch, world_size, per_rank, per_rank // accumulation, accumulation)


@dataclass
class DistributedContext:
    """This process's place in a torchrun job (or a single process: rank 0 of 1).

    ``from_env`` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    and joins the default process group: NCCL on CUDA, gloo on the CPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_env(cls, device: str | torch.device = "auto") -> "DistributedContext":
        """Join the torchrun job described by the environment (a single process when WORLD_SIZE <= 1).

        ``device`` is the requested device kind; with CUDA each rank binds the GPU of its local rank
        (an explicit ``torch.device("cuda", 0)`` counts as "cuda": every rank on GPU 0 cannot work).
        Train on :meth:`device` afterwards.
        """
        env = os.environ
        world_size = int(env.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise EnvironmentProblem(
                f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not",
                hint="launch multi-process training with torchrun (it sets all of them), or unset WORLD_SIZE",
            )
        rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
        requested = device.type if isinstance(device, torch.device) else str(device)
        resolved = resolve_device(requested, local_rank)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0

    def device(self, requested: str | torch.device = "auto") -> torch.device:
        """The device this rank trains on: ``requested`` resolved for its local rank."""
        requested = requested.type if isinstance(requested, torch.device) and self.active else requested
        return resolve_device(str(requested), self.local_rank)

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def cleanup(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
