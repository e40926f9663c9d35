"""Experiment tracking: ``--track tensorboard|wandb|none`` (default none).

What is written, for each run (one TensorBoard log dir / one W&B run per run folder):
* every training iteration: ``train/loss`` (the sum of the terms), ``train/<term>`` for each of the
  method's loss terms (means over the iteration's micro-batches), ``train/lr`` (the head's learning rate)
  and ``train/grad_norm`` (the pre-clip total norm, when clipping is on), plus ``train/continual_step``;
* after each evaluated step: ``eval/<group>/<metric>`` (e.g. ``eval/old/miou``, ``eval/new/pq``) from the
  stored metrics, the same numbers as the report.
The x axis is the run's global iteration: the iterations of all earlier steps plus the current one, so the
steps of a continual run follow one another on one curve, as detectron2-based repositories show one
TensorBoard run per step. A resumed run appends (TensorBoard: new event file in the same folder; W&B:
the same run id, derived from the run folder, with ``resume="allow"``).

Both back ends are optional dependencies (``pip install -e ".[track]"``); asking for one that is not
installed is an EnvironmentProblem naming that command. Only rank 0 writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

from benchmark.errors import ConfigError, EnvironmentProblem

TRACKERS = ("none", "tensorboard", "wandb")


class TensorBoardTracker:
    """Event files under ``<run dir>/tensorboard/`` (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise EnvironmentProblem(f"--track tensorboard needs the tensorboard package ({err})",
                                     hint='pip install -e ".[track]"  (or: pip install tensorboard)') from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("run", f"{name}\n\n```\n{_flat_text(config)}\n```", 0)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (project ``cisdq-bench``, name ``<protocol>/<method>/seed<s>``, files under
    ``<run dir>/wandb``); ``WANDB_MODE=offline`` works as usual."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise EnvironmentProblem(f"--track wandb needs the wandb package ({err})",
                                     hint='pip install -e ".[track]"  (or: pip install wandb)') from None
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project="cisdq-bench", name=name, id=run_id, resume="allow", dir=str(run_dir),
                              config=dict(config))

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_dir: Path, name: str, config: Mapping[str, Any]):
    """The tracker for ``--track kind``; None for ``none``."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, name, config)
    if kind == "wandb":
        return WandbTracker(run_dir, name, config)
    raise ConfigError(f"unknown tracker {kind!r}", hint=f"use one of {', '.join(TRACKERS)}")


def iteration_values(row: Mapping[str, float], continual_step: int) -> dict[str, float]:
    """The ``train/*`` scalars of one iteration's row (loss, terms, lr, grad_norm)."""
    return {"train/continual_step": continual_step, **{f"train/{k}": float(v) for k, v in row.items()}}


def step_metric_values(run_dir: Path, step: int) -> dict[str, float]:
    """``eval/<group>/<metric>`` of a stored step, computed as the report computes them."""
    from benchmark.report.summary import prepare, run_scores
    from benchmark.store import load_results

    scores = run_scores(prepare(load_results(run_dir)))
    rows = scores[scores["step"] == step]
    return {f"eval/{r.group}/{r.metric}": float(r.value) for r in rows.itertuples() if r.value == r.value}


def _flat_text(config: Mapping[str, Any], prefix: str = "") -> str:
    lines = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            lines.append(_flat_text(value, f"{prefix}{key}."))
        else:
            lines.append(f"{prefix}{key} = {value}")
    return "\n".join(line for line in lines if line)
