"""Atomic checkpoints: the resumable in-step checkpoint and a step's final weights.

In-step checkpoint (one file per step, overwritten every ``checkpoint_every`` iterations): model
state and layout, optimizer, LR scheduler, GradScaler, every rank's RNG states (python, numpy, torch
CPU, CUDA) and loader position, the iteration, ``method.state_dict()``, the trainer's loss log and the
settings that determine the result with their hash. Restoring all of it makes the continued run
bit-identical on the CPU to one that was never interrupted (same thread count; CUDA kernels are not
bit-reproducible in general).

Files are written to a temporary file in the same folder, fsynced, then renamed over the old one
(``os.replace``), so a kill or a failing save never leaves a truncated file: the previous checkpoint
stays intact. In-step checkpoints are pickles (``torch.load(weights_only=False)``) because they hold
RNG states and the loader's state; resume only files this tool wrote. Weights files load with
``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmark.errors import ConfigError, DataError

CHECKPOINT_FORMAT = 1
STEP_CHECKPOINT = "step-checkpoint"
WEIGHTS = "weights"


# --- hashing of the settings a checkpoint depends on ---------------------------------------------

def canonical(obj: Any) -> Any:
    """A JSON-able, order-independent form of configs and value objects (dataclasses, dicts, enums...)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, slice):
        return [obj.start, obj.stop, obj.step]
    return str(obj)


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of ``config``."""
    text = json.dumps(canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]


# --- atomic files ----------------------------------------------------------------------------------

def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _load(path: Path, what: str, *, weights_only: bool = False) -> dict:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist",
                        hint="check the path; a step's weights are written when the step completes")
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise DataError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc})",
                        hint="the file is damaged or not written by this tool; delete it to recompute it") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not a checkpoint of this tool (format {CHECKPOINT_FORMAT})",
                        hint="delete it to recompute it, or point to a file written by this version")
    return state


# --- RNG and per-rank state ------------------------------------------------------------------------

def capture_rng_state(device: torch.device | None = None) -> dict:
    """The random states a training iteration consumes (dropout, point sampling, augmentation)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def capture_rank_state(loader: Any, device: torch.device | None = None, extra: dict | None = None) -> dict:
    """What differs between DDP ranks: RNG states, the loader position and rank-local ``extra`` (logs)."""
    return {"rng": capture_rng_state(device), "loader": loader.state_dict(), "extra": extra or {}}


# --- the in-step checkpoint ------------------------------------------------------------------------

@dataclass
class Resumed:
    """What a restored checkpoint hands back: where to continue, and the checkpoint's ``extra`` merged
    with this rank's own (the trainer's loss log)."""

    iteration: int
    extra: dict


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, method: Any, iteration: int, config: Any,
                    rank_states: list[dict], extra: dict | None = None) -> None:
    """Write the resumable state of a step after ``iteration`` completed iterations.

    ``model`` is the bare model (not the DDP wrapper); ``rank_states`` has one
    :func:`capture_rank_state` entry per rank, in rank order; ``config`` holds the settings the
    trained weights depend on (stored readable, with their hash).
    """
    atomic_save({
        "format": CHECKPOINT_FORMAT,
        "kind": STEP_CHECKPOINT,
        "iteration": int(iteration),
        "config": canonical(config),
        "config_hash": config_hash(config),
        "layout": getattr(model, "layout", None),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "method": method.state_dict(),
        "ranks": rank_states,
        "extra": extra or {},
    }, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The raw content of a checkpoint file (on the CPU), or a :class:`DataError` naming the file."""
    return _load(Path(path), "checkpoint")


def restore_checkpoint(state: Mapping[str, Any], *, path: str | os.PathLike, model: nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, loader: Any, method: Any,
                       config: Any, rank: int = 0, device: torch.device | None = None) -> Resumed:
    """Put every piece of a loaded step checkpoint back; the settings must match the ones that wrote it."""
    if state.get("kind") != STEP_CHECKPOINT:
        raise DataError(f"{path} holds final weights, not a resumable in-step checkpoint",
                        hint="pass the step's checkpoint file, or delete it to restart the step")
    if state["config_hash"] != config_hash(config):
        changed = _differences(state["config"], canonical(config)) or ["(settings not recorded)"]
        raise ConfigError(
            f"the in-step checkpoint {path} was written by a different configuration; changed: "
            + "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else ""),
            hint="rerun with the configuration that wrote it to resume, or delete the file to restart the step "
                 "from its first iteration",
        )
    layout = getattr(model, "layout", None)
    if state["layout"] != layout:
        raise ConfigError(f"the checkpoint {path} holds a model of layout {state['layout']!r}, "
                          f"but the model being trained has layout {layout!r}",
                          hint="delete the checkpoint to restart the step")
    ranks = state["ranks"]
    if not 0 <= rank < len(ranks):
        raise ConfigError(f"the checkpoint {path} was written by {len(ranks)} process(es); rank {rank} has no state",
                          hint="resume with the same number of processes, or delete the file to restart the step")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    method.load_state_dict(state["method"])
    loader.load_state_dict(ranks[rank]["loader"])
    restore_rng_state(ranks[rank]["rng"], device)
    return Resumed(iteration=int(state["iteration"]), extra={**state["extra"], **ranks[rank].get("extra", {})})


def resume(path: str | os.PathLike | None, **objects: Any) -> Resumed | None:
    """Restore the in-step checkpoint at ``path`` if there is one (see :func:`restore_checkpoint` for the
    keyword arguments); None when there is nothing to resume."""
    if path is None or not Path(path).is_file():
        return None
    return restore_checkpoint(load_checkpoint(path), path=path, **objects)


# --- a step's final weights ------------------------------------------------------------------------

def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Atomically write the model's layout and state dict (the bare model, not a DDP wrapper)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    atomic_save({"format": CHECKPOINT_FORMAT, "kind": WEIGHTS, "layout": getattr(model, "layout", None),
                 "state": model.state_dict()}, path)


def load_weights(path: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(layout, state_dict)`` of a weights file written by :func:`save_weights`, on the CPU.

    Read with ``weights_only=True``: weights files hold only tensors and the layout (nested tuples of
    ints), so step weights shared between users (the step-0 cache) cannot run code when loaded.
    """
    state = _load(Path(path), "weights file", weights_only=True)
    if state.get("kind") != WEIGHTS:
        raise DataError(f"{path} is not a weights file (kind {state.get('kind')!r})",
                        hint="pass a step's final weights, written by save_weights")
    return state["layout"], state["state"]
