"""How a run's queries answer on the base-class objects, step by step (``python -m benchmark.diagnose``).

Why a method keeps or loses its base classes is a question about its queries: the semantic segment rule
(README, Conventions) keeps a pixel only where a query's own mask is >= 0.5 and its most likely answer is a
class, and panoptic inference and PQ need a query whose mask matches a segment. For every ground-truth object
of a base class in the validation images, this finds the query whose binarised mask (probability >= 0.5)
overlaps it with the highest IoU, and records that IoU and the query's most likely answer: the right class,
another old class (at step 0: another base class), a new class of the step, or no-object (the no-object
probability ``1 - sum`` of the class probabilities, or the method's own no-object score). What an object is
belongs to the task (``Task.gt_objects``): semantic, a class's pixels in one image taken together (a label map
does not separate instances; a synthetic image holds few things); instance, each annotated instance;
panoptic, each non-crowd segment (a thing instance or a stuff class's region).

The summary per stored step: how many objects, the mean best-query IoU, how many objects have a query of
IoU > 0.5, and the counts of the four answers. Measured on MiB (README, calibration section): its masks on
old objects drift after step 0 (mean IoU 0.93 -> 0.05, fine-tuning's level; PLOP 0.71, CoMFormer 0.89 after
step 1), which is why its base classes vanish under the segment rule while the arg-max over summed soft masks
still reads them; on synth-pan-10-5's base segments likewise (0.88 -> 0.16 -> 0.04 on seed 0; PLOP 0.86, 0.85).

The run is rebuilt from the same arguments as ``run_benchmark.py`` (``--protocol``, ``--method``, ``--seed``,
``--set``), and its recorded configuration must match them (the runner's own check), so the weights are read
with the model they were trained with.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tabulate import tabulate

from benchmark.errors import ConfigError, DataError, UserError

ANSWERS = ("right", "old", "new", "no-object")
MASK_THRESHOLD = 0.5          # the segment rule's own-mask threshold (CoMFormer maskformer_model.py L83)


@dataclass(frozen=True)
class ObjectAnswer:
    """The best-overlapping query on one ground-truth object of a base class."""

    class_id: int
    iou: float                # IoU of that query's binarised mask with the object
    answer: str               # one of ANSWERS


def answers_on_objects(class_probs: torch.Tensor, masks: torch.Tensor,
                       objects: Sequence[tuple[int, np.ndarray]], columns: Sequence[int], num_old: int,
                       classes: Sequence[int], no_object: torch.Tensor | None = None) -> list[ObjectAnswer]:
    """Per object of ``classes`` among ``objects``: the best query's mask IoU and its answer.

    ``class_probs`` [Q, K]: per query, the probabilities of the K seen columns; ``no_object`` [Q]: the
    no-object score where the method gives one (ECLIPSE's sigmoid classifier), else ``1 - sum``;
    ``masks`` [Q, H, W]: mask probabilities at the target's size; ``objects``: ``[(native class id, [H, W]
    bool mask)]`` (``Task.gt_objects``); ``columns``: the native id of each column; ``num_old``: columns
    before the step's new ones.
    """
    probs = class_probs.float()
    no_object = 1.0 - probs.sum(dim=1) if no_object is None else no_object.float()
    top, label = probs.max(dim=1)
    binary = masks >= MASK_THRESHOLD
    wanted = set(classes)
    out = []
    for class_id, mask in objects:
        gt = torch.as_tensor(np.asarray(mask, bool))
        if class_id not in wanted or not gt.any():
            continue
        inter = (binary & gt).flatten(1).sum(1).float()
        union = (binary | gt).flatten(1).sum(1).float()
        iou = inter / union.clamp(min=1)
        q = int(iou.argmax())
        column = int(label[q])
        if no_object[q] > top[q]:
            answer = "no-object"
        elif columns[column] == class_id:
            answer = "right"
        else:
            answer = "old" if column < num_old else "new"
        out.append(ObjectAnswer(int(class_id), float(iou[q]), answer))
    return out


def summarise(step: int, answers: Sequence[ObjectAnswer]) -> dict:
    counts = Counter(a.answer for a in answers)
    return {"step": step, "objects": len(answers),
            "mean best IoU": float(np.mean([a.iou for a in answers])) if answers else float("nan"),
            "IoU > 0.5": sum(a.iou > 0.5 for a in answers), **{name: counts.get(name, 0) for name in ANSWERS}}


def diagnose_run(spec, steps: Sequence[int] | None = None) -> list[dict]:
    """One summary per stored step of ``spec``'s run (``steps``: only these)."""
    from benchmark.data import EvalView, eval_loader
    from benchmark.engine.evaluate import pad_for_inference, softmax_class_scores
    from benchmark.engine.inference import mask_probs, resize_mask_logits
    from benchmark.runner import StepRunner, _check_recorded_config, resolve
    from benchmark.store import RunStore
    from benchmark.tasks import get_task

    r = resolve(spec)
    task = get_task(r.protocol.task)
    run_dir = spec.run_dir(r.protocol.name)
    if not (run_dir / "run.json").is_file():
        raise DataError(f"no run in {run_dir}", hint="check --out, --protocol, --method and --seed")
    try:
        _check_recorded_config(RunStore(run_dir), r)
    except ConfigError as err:
        raise ConfigError(err.message, hint="pass the options the run was made with (--engine, --schedule, --set; "
                                            f"its run.json has them under 'config')") from None
    runner = StepRunner(r, show_progress=False)
    proto = r.train_protocol
    base = proto.seen(0)
    unknown = sorted(set(steps or ()) - set(range(proto.num_steps)))
    if unknown:
        raise ConfigError(f"--step {' '.join(map(str, unknown))}: {proto.name} has steps 0-{proto.num_steps - 1}",
                          hint="leave --step out to read every stored step")
    summaries = []
    for t in range(proto.num_steps) if steps is None else steps:
        weights = run_dir / f"step_{t:02d}" / "weights.pt"
        if not weights.is_file():
            continue
        model = runner.load_model(weights).eval()
        columns = proto.seen(t)
        num_old = len(columns) - len(proto.new(t)) if t else len(columns)
        eval_size = r.schedule.for_step(t, joint=r.method.joint).eval_size
        answers = []
        with torch.inference_mode():
            for sample in eval_loader(EvalView(runner.val_ds, eval_size), workers=0):
                pixels, size, padded = pad_for_inference(sample.pixel_values)
                outputs = model(pixels[None])
                probs, no_object = (r.method.class_scores or softmax_class_scores)(outputs)
                masks = mask_probs(resize_mask_logits(outputs.mask_logits()[0], size, size, padded),
                                    r.criterion.mask_mode)
                masks = torch.nn.functional.interpolate(masks[None], size=tuple(sample.orig_size), mode="bilinear",
                                                        align_corners=False)[0]
                answers += answers_on_objects(probs[0], masks, task.gt_objects(sample.target), columns, num_old, base,
                                              None if no_object is None else no_object[0])
        summaries.append(summarise(t, answers))
    if not summaries:
        raise DataError(f"no stored step weights in {run_dir}", hint="the run has not finished a step yet")
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    from benchmark.config import parse_set_options
    from benchmark.runner import RunSpec

    parser = argparse.ArgumentParser(prog="python -m benchmark.diagnose", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results folder (the --out of run_benchmark.py)")
    parser.add_argument("--protocol", default="synth-10-5")
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, nargs="*", help="only these steps (default: every stored one)")
    parser.add_argument("--engine", default="tiny")
    parser.add_argument("--schedule", default="cpu")
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="the --set options the run was made with")
    args = parser.parse_args(argv)
    try:
        spec = RunSpec(method=args.method, protocol=args.protocol, seed=args.seed, engine=args.engine,
                       schedule=args.schedule, data_root=args.data_root, out=str(Path(args.results)),
                       overrides=RunSpec.freeze_overrides(parse_set_options(args.set)))
        rows = diagnose_run(spec, args.step)
    except UserError as err:
        return err.report()
    print(f"{args.method} seed {args.seed} on {args.protocol}: the best-overlapping query on each base-class object")
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
