"""The evaluation loop: a model over a validation loader -> the task's raw results (benchmark.tasks).

Every validation image is evaluated at every step (protocols.md). The loop pads each image, runs the model
and hands the class probabilities and mask logits of the seen columns to the task's evaluator, which applies
the shared inference of :mod:`benchmark.engine.inference` and accumulates what the task stores (semantic: a
confusion matrix and per-image counts; instance: COCO detections; see each task's module).

Under ``torch.distributed`` every rank evaluates every ``world_size``-th image (this function shards the
loader itself, so duplicates that a padding sampler would add cannot be counted); the evaluators combine
the ranks' results on rank 0 (other ranks get empty detections and no per-image statistics).
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

from benchmark.batch import EvalSample
from benchmark.data.loader import SIZE_DIVISIBILITY
from benchmark.engine.outputs import ModelOutputs
from benchmark.tasks import TASK_NAMES, get_task
from benchmark.tasks.base import EvalResult
from benchmark.tasks.semantic import UNASSIGNED_ID, SemanticInference

TASKS = TASK_NAMES
ClassScores = Callable[[ModelOutputs], tuple[torch.Tensor, Optional[torch.Tensor]]]


def softmax_class_scores(outputs: ModelOutputs) -> tuple[torch.Tensor, None]:
    """The shared scoring: ``outputs.class_probs()`` with the implicit no-object ``1 - sum``."""
    return outputs.class_probs(), None

__all__ = ["EvalResult", "SemanticInference", "TASKS", "UNASSIGNED_ID", "evaluate"]


def pad_for_inference(pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(padded pixels, input size, padded size): zero-padded (the mean colour) to a multiple of 32 as
    Mask2Former's ImageList.from_tensors (maskformer_model.py L195); the inference crops the padding off again."""
    input_size = tuple(pixel_values.shape[-2:])
    padded_size = tuple(-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in input_size)
    pad = (0, padded_size[1] - input_size[1], 0, padded_size[0] - input_size[0])
    return torch.nn.functional.pad(pixel_values, pad), input_size, padded_size


def evaluate(model: nn.Module, loader: Iterable[EvalSample], protocol, step: int, device: torch.device | str,
             task: str, *, top_k: int = 100, score_threshold: float = 0.0, mask_mode: str = "sigmoid",
             semantic: SemanticInference | None = None, options=None, progress: bool = True,
             class_scores: ClassScores | None = None) -> EvalResult:
    """Run ``model`` (a SegModel, possibly DDP-wrapped) on every EvalSample of ``loader``.

    ``top_k`` / ``score_threshold``: instance inference (Mask2Former keeps the top 100 pairs, no threshold).
    ``mask_mode``: "softmax" for models trained with CoMFormer's softmax-over-queries criterion.
    ``options``: the task's evaluation options (``Task.eval_options``; ``semantic`` is the same for the
    semantic task, default :class:`SemanticInference`, CoMFormer's segments).
    Semantic results: the confusion matrix's last row/column is UNASSIGNED_ID, the pixels the inference left
    without a class (counted as false negatives of their ground-truth class, never as a class).
    ``class_scores``: the post-logit hook, ``outputs -> (class probabilities [B, Q, K], no-object [B, Q] or
    None)``; default :func:`softmax_class_scores` (each query's softmax over its group's head, no-object
    ``1 - sum``). A method whose classifier or inference differs supplies its own (``Method.class_scores``:
    ECLIPSE's sigmoid scores after its logit manipulation).
    The model is put in eval mode for the loop and restored to its previous mode afterwards.
    """
    class_scores = class_scores or softmax_class_scores
    task_impl = get_task(task)
    device = torch.device(device)
    net = model.module if isinstance(model, DistributedDataParallel) else model
    num_seen = len(protocol.seen(step))
    rank, world = _rank_and_world()
    evaluator = task_impl.evaluator(protocol, step, device, options=options if options is not None else semantic,
                                    mask_mode=mask_mode, top_k=top_k, score_threshold=score_threshold)
    count = 0
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for sample in _progress(_shard(loader, rank, world), progress and rank == 0):
                pixels, input_size, padded_size = pad_for_inference(sample.pixel_values)
                outputs = net(pixels[None].to(device, non_blocking=True))
                if outputs.num_columns != num_seen:
                    raise ValueError(f"the model predicts {outputs.num_columns} class columns but step {step} of "
                                     f"{protocol.name} has {num_seen} seen classes")
                probs, no_object = class_scores(outputs)
                evaluator.add(sample, probs[0], outputs.mask_logits()[0], input_size=input_size,
                              padded_size=padded_size, out_size=tuple(int(s) for s in sample.orig_size),
                              position=rank + count * world, no_object=None if no_object is None else no_object[0])
                count += 1
    finally:
        net.train(was_training)

    if world > 1:
        count_tensor = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(count_tensor)
        count = int(count_tensor.item())
    return evaluator.result(count, rank, world)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(loader: Iterable[EvalSample], rank: int, world: int) -> Iterable[EvalSample]:
    """This rank's images: every ``world``-th one starting at ``rank``.

    A DataLoader over a map-style dataset is rebuilt over the rank's subset so that other ranks' images are
    never loaded; any other iterable is filtered.
    """
    if world == 1:
        return loader
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) \
            and hasattr(loader.dataset, "__len__"):
        subset = Subset(loader.dataset, range(rank, len(loader.dataset), world))
        return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    return (sample for i, sample in enumerate(loader) if i % world == rank)


def _progress(samples: Iterable[EvalSample], enabled: bool) -> Iterator[EvalSample]:
    total = len(samples) if hasattr(samples, "__len__") else None
    return iter(tqdm(samples, total=total, desc="eval", unit="img", leave=False,
                     disable=not (enabled and sys.stderr.isatty())))
