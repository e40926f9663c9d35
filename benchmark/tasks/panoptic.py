"""Panoptic segmentation: things as instances, stuff as one segment per class; scored by PQ (panopticapi).

Training target at step t: each non-crowd thing segment of a class of C_t is one target mask, each stuff
class of C_t present is one target mask (the union of its segments; COCO and ADE panoptic have one per class
anyway); old and future classes and VOID are unlabelled, as for the other tasks (CoMFormer's and ECLIPSE's
panoptic mappers keep the step's segments only). Augmentation is the instance pipeline (masks resized,
cropped and flipped together; masks emptied by the crop dropped).

Evaluation: Mask2Former's panoptic inference (:func:`benchmark.engine.inference.panoptic_inference`) of the
seen columns with CoMFormer's and ECLIPSE's thresholds 0.0 / 0.0 (:class:`PanopticInference`), things decided
by the dataset's thing classes; per image and class panopticapi's sufficient statistics (``per_image.npz``: ``iou_sum``, ``tp``, ``fp``, ``fn``), whose sums give the ``pq``, ``sq``,
``rq`` rows. Predictions are data: ``step_XX/panoptic.json`` (COCO panoptic results: ``annotations`` with
``image_id``, ``file_name``, ``segments_info`` of ``id`` and native ``category_id``) and
``step_XX/panoptic/<file_name>`` PNGs, so any PQ tool can recompute the numbers against the ground truth
that run.json names (``val_panoptic_json``, ``val_panoptic_root``). ``eval.keep_predictions=last`` keeps
the PNGs of the final step only (the per-image statistics are always kept).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from benchmark.data.panoptic import PanopticTarget, id_to_rgb
from benchmark.data.transforms import augment_instance
from benchmark.engine.inference import panoptic_inference
from benchmark.errors import ConfigError, DataError
from benchmark.metrics.per_image import PerImageStats
from benchmark.metrics.pq import PANOPTIC_STATS, Segment, image_pq_stats
from benchmark.metrics.rows import panoptic_rows

from .base import EvalResult, Evaluator, Task

KEEP_PREDICTIONS = ("all", "last")


@dataclass(frozen=True)
class PanopticInference:
    """``--set eval.KEY=VALUE`` of panoptic protocols.

    object_mask_threshold / overlap_threshold: the OBJECT_MASK_THRESHOLD and OVERLAP_THRESHOLD of Mask2Former's
    panoptic inference (engine.inference), 0.0 and 0.0 as in the continual panoptic code that defines these
    protocols and their published numbers: CoMFormer's ADE20K panoptic config (fcdl94/CoMFormer
    ``configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml`` L44-45, the config of
    ``scripts/adps*.sh``; its ``mask2former/config.py`` L68-69 defaults are 0.0 too) and ECLIPSE's
    (clovaai/ECLIPSE, the same ADE yaml L44-45, ``configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml``
    L46 for COCO). Stock Mask2Former's panoptic configs and BalConpas's (jinpeng0528/BalConpas
    ``configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml`` L43-44) use 0.8 / 0.8:
    ``--set eval.object_mask_threshold=0.8 eval.overlap_threshold=0.8``. One value for every method keeps the
    methods comparable. Measured on the embedded benchmark (synth-pan-10-5, seeds 0-2, fine-tuning and joint,
    the same stored weights re-evaluated, 2026-12-05): with 0.8 / 0.8 a class whose queries are not yet
    0.8-confident after a 300-iteration increment scores PQ 0 (fine-tuning's worst PQ on a step's classes right
    after the step 46.7 against joint's 76.3, ratio 0.61: seeds 0 and 1 lose class 14, seed 0 classes 18 and
    19); with 0.0 / 0.0 the worst ratio is 0.96 (joint's final PQ 72.7 against 75.6).
    keep_predictions: "all" steps' PNGs (default) or the "last" step's only (large real validation sets).
    """

    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.0
    keep_predictions: str = "all"

    def __post_init__(self) -> None:
        for name in ("object_mask_threshold", "overlap_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"eval.{name}={getattr(self, name)!r} must be in [0, 1]")
        if self.keep_predictions not in KEEP_PREDICTIONS:
            raise ConfigError(f"eval.keep_predictions={self.keep_predictions!r} is not one of "
                              f"{', '.join(KEEP_PREDICTIONS)}")


def training_targets(target: PanopticTarget, columns, thing_ids) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [n, H, W] bool, labels [n] class columns)`` of one image for the classes in ``columns``
    (native id -> column), ordered by column then segment id (module doc)."""
    chosen: dict[tuple[int, int], np.ndarray] = {}
    for seg in sorted(target.segments, key=lambda s: s.id):
        if seg.iscrowd or seg.category_id not in columns:
            continue
        mask = target.ids == seg.id
        if seg.category_id in thing_ids:
            chosen[(columns[seg.category_id], seg.id)] = mask
        else:   # one target per stuff class: its segments united, keyed by the first
            key = next((k for k in chosen if k[0] == columns[seg.category_id]), (columns[seg.category_id], seg.id))
            chosen[key] = chosen.get(key, np.zeros_like(mask)) | mask
    keys = sorted(chosen)
    masks = np.stack([chosen[k] for k in keys]) if keys else np.zeros((0, *target.ids.shape), bool)
    return masks, np.asarray([k[0] for k in keys], dtype=np.int64)


class PanopticTask(Task):
    name = "panoptic"
    metrics = ("pq", "sq", "rq")
    summary_metrics = {"pq": "pq", "sq": "sq", "rq": "rq"}
    metric_labels = {"pq": "PQ", "sq": "SQ", "rq": "RQ"}
    per_class_label = "PQ"
    instance_targets = True
    eval_options = PanopticInference

    def class_kinds(self, protocol_name):
        """``{"things": ..., "stuff": ...}``: the protocol's classes split by its dataset's thing classes (the
        registry's protocol of that name; a name the registry does not know gets no such columns)."""
        from benchmark.errors import UserError
        from protocols import get_protocol
        from protocols.datasets import dataset_spec

        try:
            protocol = get_protocol(protocol_name)
        except UserError:
            return {}
        things = dataset_spec(protocol.dataset, protocol.num_dataset_classes).thing_ids
        classes = frozenset(protocol.all_classes)
        return {"things": classes & things, "stuff": classes - things}

    def train_sample(self, ds, i, columns, aug, rng):
        image, target = ds.load(i)
        masks, labels = training_targets(target, columns, ds.thing_ids)
        image, masks, keep = augment_instance(image, masks, aug, rng)
        return image, masks, labels[keep]

    def gt_objects(self, target: PanopticTarget):
        """Every non-crowd segment (a thing instance, or a stuff class's region): what PQ matches."""
        return [(seg.category_id, target.ids == seg.id) for seg in target.segments if not seg.iscrowd]

    def evaluator(self, protocol, step, device, *, options, mask_mode, top_k, score_threshold):
        return PanopticEvaluator(protocol, step, options or PanopticInference(), mask_mode)

    def run_header(self, val_ds):
        return {"val_panoptic_json": str(val_ds.json_path), "val_panoptic_root": str(val_ds.png_dir)}

    def stored_result(self, store, step):
        """The per-image statistics, ``panoptic.json`` and the prediction PNGs (when kept) of a done step."""
        folder = store.step_dir(step)
        per_image = store.read_per_image(step)
        try:
            document = json.loads((folder / "panoptic.json").read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {folder / 'panoptic.json'}: {err}",
                            hint="delete the step's DONE marker and run the step again") from None
        pngs = folder / "panoptic"
        predictions = ([(a["file_name"], (pngs / a["file_name"]).read_bytes()) for a in document["annotations"]]
                       if pngs.is_dir() else None)
        return EvalResult("panoptic", step, tuple(int(c) for c in per_image.class_ids), len(per_image.image_ids),
                          per_image=per_image, extra={"panoptic_json": document, "predictions": predictions})

    def store_step(self, store, step, result, *, val_ds, ident, weights_path, extra):
        stats = result.per_image
        rows = panoptic_rows(stats={n: stats.arrays[n].sum(0) for n in PANOPTIC_STATS}, class_ids=result.class_ids,
                             step=step, **ident)
        predictions = result.extra.get("predictions")
        files = {"panoptic.json": _json_writer(result.extra["panoptic_json"])}
        folders = {"panoptic": _png_writer(predictions)} if predictions is not None else {}
        store.write_step(step, files=files, folders=folders, per_image=stats, weights_path=weights_path,
                         metrics_rows=rows, extra=extra)


def _json_writer(document: dict):
    text = json.dumps(document, separators=(",", ":"))
    return lambda f: f.write(text.encode("utf-8"))


def _png_writer(predictions: list[tuple[str, bytes]]):
    def fill(folder: Path) -> None:
        for name, data in predictions:
            (folder / name).write_bytes(data)
    return fill


class PanopticEvaluator(Evaluator):
    """Per-image PQ statistics and the COCO-panoptic predictions of every image (module doc)."""

    def __init__(self, protocol, step: int, options: PanopticInference, mask_mode: str):
        from protocols.datasets import dataset_spec

        self.step, self.options, self.mask_mode = step, options, mask_mode
        self.seen_ids = [int(c) for c in protocol.class_order[:len(protocol.seen(step))]]
        things = dataset_spec(protocol.dataset, protocol.num_dataset_classes).thing_ids
        self.thing_columns = [k for k, c in enumerate(self.seen_ids) if c in things]
        self.class_ids = tuple(protocol.all_classes)
        self.keep_pngs = options.keep_predictions == "all" or step == protocol.num_steps - 1
        self.parts: list[tuple[int, object, np.ndarray, dict, tuple[str, bytes] | None]] = []

    def add(self, sample, class_probs, mask_logits, *, input_size, padded_size, out_size, position, no_object=None):
        pred = panoptic_inference(class_probs, mask_logits, input_size, out_size, thing_columns=self.thing_columns,
                                  object_mask_threshold=self.options.object_mask_threshold,
                                  overlap_threshold=self.options.overlap_threshold, padded_size=padded_size,
                                  mask_mode=self.mask_mode, no_object=no_object)
        ids = pred.segment_ids.cpu().numpy().astype(np.int64)
        segments = [Segment(i, self.seen_ids[column]) for i, column, _ in pred.segments]
        gt: PanopticTarget = sample.target
        stats = image_pq_stats(gt.ids, gt.segments, ids, segments, self.class_ids)
        image_id = sample.image_id.item() if hasattr(sample.image_id, "item") else sample.image_id
        file_name = f"{image_id}.png"
        annotation = {"image_id": image_id, "file_name": file_name,
                      "segments_info": [{"id": s.id, "category_id": s.category_id} for s in segments]}
        png = None
        if self.keep_pngs:
            buffer = io.BytesIO()
            from PIL import Image

            Image.fromarray(id_to_rgb(ids), mode="RGB").save(buffer, format="PNG")
            png = (file_name, buffer.getvalue())
        self.parts.append((position, image_id, stats, annotation, png))

    def result(self, num_images, rank, world):
        parts = self.parts
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(parts, gathered, dst=0)
            if rank != 0:
                return EvalResult("panoptic", self.step, self.class_ids, num_images)
            parts = [p for part in gathered for p in part]
        parts = sorted(parts, key=lambda p: p[0])
        k = len(self.class_ids)
        stacked = np.stack([p[2] for p in parts]) if parts else np.zeros((0, 4, k))
        arrays = {name: (stacked[:, j] if name == "iou_sum" else np.rint(stacked[:, j]).astype(np.int64))
                  for j, name in enumerate(PANOPTIC_STATS)}
        per_image = PerImageStats(np.asarray([p[1] for p in parts]) if parts else np.zeros(0, np.int64),
                                  self.class_ids, arrays)
        document = {"annotations": [p[3] for p in parts]}
        extra = {"panoptic_json": document,
                 "predictions": [p[4] for p in parts] if self.keep_pngs else None}
        return EvalResult("panoptic", self.step, self.class_ids, num_images, per_image=per_image, extra=extra)
