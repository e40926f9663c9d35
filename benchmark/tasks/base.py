"""The interface every task implements (:class:`Task`) and the value objects it shares with the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from benchmark.metrics.per_image import PerImageStats


@dataclass
class EvalResult:
    """The raw evaluation output of one step (what the task's evaluator returns and its ``store_step`` stores).

    semantic: ``matrix`` [N, N] int64 (rows = ground truth, columns = prediction, both indexed like
    ``class_ids``: the arrays of ``step_XX/confusion.npz``; the last id is the semantic task's UNASSIGNED_ID,
    whose column holds the pixels left without a class and whose row is empty) and ``per_image``
    (``step_XX/per_image.npz``, with the same class ids); instance: ``detections`` (COCO results format,
    native category ids, RLE masks), no per-image statistics. ``extra`` holds what further tasks produce.
    """

    task: str
    step: int
    class_ids: tuple[int, ...]
    num_images: int
    matrix: np.ndarray | None = None
    detections: list[dict] = field(default_factory=list)
    per_image: PerImageStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def per_class_ap(self, gt_json_path) -> dict[int, dict[str, float]]:
        """Mask AP per class of the protocol (``benchmark.metrics.mask_ap``) against the validation json."""
        from benchmark.metrics import mask_ap

        if self.task != "instance":
            raise ValueError("per-class AP needs an instance evaluation")
        return mask_ap(gt_json_path, self.detections, self.class_ids)


class Evaluator(ABC):
    """Accumulates one step's evaluation image by image (created by :meth:`Task.evaluator`)."""

    @abstractmethod
    def add(self, sample, class_probs: Tensor, mask_logits: Tensor, *, input_size: tuple[int, int],
            padded_size: tuple[int, int], out_size: tuple[int, int], position: int,
            no_object: Tensor | None = None) -> None:
        """One image: ``class_probs`` [Q, K_seen], ``mask_logits`` [Q, h, w] (see engine.inference);
        ``position`` is the image's index in the evaluation order (over all ranks); ``no_object`` [Q] the
        queries' no-object probabilities when they are not ``1 - sum(class_probs)`` (sigmoid classifiers)."""

    @abstractmethod
    def result(self, num_images: int, rank: int, world: int) -> EvalResult:
        """The step's result; under torch.distributed (``world`` > 1) every rank calls it (collectives) and
        rank 0 gets the gathered result."""


class Task(ABC):
    """One segmentation task. Subclasses set the class attributes and implement the hooks.

    name: the protocols' and datasets' ``task`` string.
    metrics: the long-table metrics its rows carry, the primary one (tables, curves) first.
    instance_targets: training targets are individual instances (several masks of one class per image),
        not one mask per class; methods that build pseudo-labels choose their form by it (PLOP: "mask").
    eval_options: the dataclass of its ``--set eval.KEY=VALUE`` options (recorded in run.json's config
        "eval"), or None when it has none.
    summary_metrics: long-table metric -> the name of its class mean in the report (IoU -> "miou").
    metric_labels: summary metric -> its label in tables and plots; per_class_label: the per-class score's.
    """

    name: str = ""
    metrics: tuple[str, ...] = ()
    summary_metrics: Mapping[str, str] = {}
    metric_labels: Mapping[str, str] = {}
    per_class_label: str = ""
    instance_targets: bool = False
    eval_options: type | None = None

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def class_kinds(self, protocol_name: str) -> Mapping[str, frozenset[int]]:
        """Named partitions of a protocol's classes that the report scores as extra columns of the final
        table (panoptic: "things" and "stuff", CoMFormer's PQ^th / PQ^st); none by default."""
        return {}

    # ---- data -----------------------------------------------------------------------------------
    def prepare_dataset(self, ds) -> None:
        """Called once by each view over ``ds`` before it loads a sample (e.g. index annotations)."""

    @abstractmethod
    def train_sample(self, ds, i: int, columns: Mapping[int, int], aug, rng: np.random.Generator):
        """``(image HxWx3 uint8, masks [n, h, w] bool, labels [n] class columns)`` of training image ``i``,
        augmented with ``aug`` and ``rng``; targets only for the classes in ``columns`` (native id -> column,
        the step's classes ordered by column)."""

    def eval_target(self, target):
        """The ground truth the evaluator receives (EvalSample.target), from the reader's ``load``."""
        return target

    @abstractmethod
    def gt_objects(self, target) -> list[tuple[int, np.ndarray]]:
        """``[(native class id, [H, W] bool mask)]``: the objects of an evaluation target (EvalSample.target)
        as this task counts them; ``python -m benchmark.diagnose`` matches queries to them."""

    # ---- evaluation ------------------------------------------------------------------------------
    def resolve_eval_options(self, overrides: Mapping[str, Any]):
        """The task's evaluation options with ``--set eval.*`` applied (None when the task has none)."""
        from benchmark.config import apply_overrides

        if self.eval_options is None:
            return None
        return apply_overrides(self.eval_options(), overrides, "eval")

    @abstractmethod
    def evaluator(self, protocol, step: int, device: torch.device, *, options, mask_mode: str, top_k: int,
                  score_threshold: float) -> Evaluator:
        """A fresh evaluator of ``step`` of ``protocol`` (the model predicts the step's seen columns)."""

    # ---- results ---------------------------------------------------------------------------------
    def run_header(self, val_ds) -> dict[str, Any]:
        """run.json entries naming the ground truth the metrics were computed against."""
        return {}

    def stored_result(self, store, step: int):
        """The raw result of a done step read back from ``store`` (what :meth:`store_step` takes), e.g. to
        record a shared step 0 in each run that reuses it."""
        return store.step_result(step)

    @abstractmethod
    def store_step(self, store, step: int, result: EvalResult, *, val_ds, ident: Mapping[str, Any],
                   weights_path, extra: Mapping[str, Any]) -> None:
        """Compute the long-table rows of ``result`` and store them with its artefacts (RunStore.write_step)."""
