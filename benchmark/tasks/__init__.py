"""The segmentation tasks (semantic, instance, panoptic): one module per task behind :class:`Task`.

Everything that differs between tasks lives in the task's module: how a dataset is prepared, the
training target of an augmented image, the evaluation target, the evaluator that turns the model's outputs
into raw results (a confusion matrix, COCO detections, ...), the artefacts stored for a step, the metric rows
of the long table, the run.json entries and the evaluation options of ``--set eval.KEY=VALUE``. The engine,
the runner, the views and the reporter look the task up by name and call it; they hold no per-task branch.
A new task is one module and one entry of :data:`TASKS`.
"""

from __future__ import annotations

from typing import Mapping

from benchmark.errors import ConfigError

from .base import Evaluator, Task
from .instance import InstanceTask
from .panoptic import PanopticTask
from .semantic import SemanticTask

TASKS: Mapping[str, Task] = {task.name: task for task in (SemanticTask(), InstanceTask(), PanopticTask())}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task registered as ``name``; ConfigError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}", hint=f"use one of {', '.join(TASK_NAMES)}") from None


def task_for_metric(metric: str) -> Task:
    """The task whose long-table rows carry ``metric`` (e.g. "iou" -> semantic, "ap" -> instance)."""
    for task in TASKS.values():
        if metric in task.metrics:
            return task
    raise ConfigError(f"no task reports the metric {metric!r}",
                      hint=f"known metrics: {', '.join(m for t in TASKS.values() for m in t.metrics)}")


__all__ = ["Evaluator", "TASKS", "TASK_NAMES", "Task", "get_task", "task_for_metric"]
