"""python -m benchmark.diagnose: the best-overlapping query on each base-class object, per stored step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.config import parse_set_options
from benchmark.diagnose import answers_on_objects, main, summarise
from benchmark.metrics.pq import Segment
from benchmark.runner import RunSpec, run_one
from benchmark.tasks import get_task
from tests.test_runner import spec, tiny_args


def test_answers_on_constructed_objects():
    target = np.zeros((8, 8), np.int64)
    target[:4, :4] = 1                 # class 1: top-left quarter
    target[4:, 4:] = 2                 # class 2: bottom-right quarter
    target[:2, 6:] = 11                # a new class (not asked about)
    masks = torch.zeros(4, 8, 8)
    masks[0, :4, :4] = 0.9             # exactly class 1's object
    masks[1, 4:, 4:6] = 0.8            # half of class 2's object ...
    masks[1, :4, :4] = 0.4             # ... and below the 0.5 threshold elsewhere
    masks[2, 4:, 4:] = 0.3             # covers class 2 entirely, but never >= 0.5
    masks[3, :2, 6:] = 1.0
    columns = (1, 2, 11)               # old 1, 2; new 11
    probs = torch.tensor([[0.7, 0.1, 0.1],     # right class
                          [0.1, 0.1, 0.1],     # no-object 0.7 wins
                          [0.0, 0.9, 0.0],
                          [0.0, 0.0, 1.0]])
    objects = get_task("semantic").gt_objects(target)
    out = answers_on_objects(probs, masks, objects, columns, num_old=2, classes=(1, 2, 3))
    assert [(a.class_id, round(a.iou, 3), a.answer) for a in out] == [(1, 1.0, "right"), (2, 0.5, "no-object")]
    # the same query on class 1 answering a new class, then another old class
    for row, answer in (([0.1, 0.0, 0.8], "new"), ([0.1, 0.8, 0.0], "old")):
        probs[0] = torch.tensor(row)
        assert answers_on_objects(probs, masks, objects, columns, 2, (1,))[0].answer == answer
    # a method's own no-object score (ECLIPSE) replaces 1 - sum
    probs[0] = torch.tensor([0.7, 0.1, 0.1])
    scores = torch.tensor([0.9, 0.0, 0.0, 0.0])
    assert answers_on_objects(probs, masks, objects, columns, 2, (1,), no_object=scores)[0].answer == "no-object"
    summary = summarise(1, out)
    assert summary == {"step": 1, "objects": 2, "mean best IoU": 0.75, "IoU > 0.5": 1, "right": 1, "old": 0,
                       "new": 0, "no-object": 1}


def test_diagnose_reads_a_stored_run(tmp_path, capsys):
    run_one(spec("finetune", tmp_path), show_progress=False)
    sets = tiny_args()[1::2]
    assert main([str(tmp_path), "--method", "finetune", "--set", *sets]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("finetune seed 0 on synth-10-5")
    rows = [line.split() for line in lines[3:]]
    assert [int(r[0]) for r in rows] == [0, 1, 2]                  # every stored step
    objects = {int(r[1]) for r in rows}
    assert len(objects) == 1 and objects.pop() > 0                  # the same base objects at every step
    for r in rows:
        assert 0.0 <= float(r[2]) <= 1.0 and sum(map(int, r[4:])) == int(r[1])

    # another configuration than the run's: refused with the runner's message, no traceback
    assert main([str(tmp_path), "--method", "finetune"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "different configuration" in err and "made with" in err
    assert main([str(tmp_path), "--method", "plop", "--set", *sets]) != 0
    assert "no run in" in capsys.readouterr().err
    assert main([str(tmp_path), "--method", "finetune", "--step", "7", "--set", *sets]) != 0
    assert "has steps 0-2" in capsys.readouterr().err


def test_each_task_names_its_objects():
    from benchmark.data.panoptic import PanopticTarget

    label = np.full((4, 4), 255, np.int64)
    label[:2] = 3
    label[2:, :2] = 7
    objects = get_task("semantic").gt_objects(label)          # one per class present, void left out
    assert [(c, int(m.sum())) for c, m in objects] == [(3, 8), (7, 4)]

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0], b[1:, 1:] = True, True
    assert [(c, int(m.sum())) for c, m in get_task("instance").gt_objects([(5, a), (5, b)])] == [(5, 1), (5, 9)]

    ids = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [0, 0, 4, 4]])
    target = PanopticTarget(ids, (Segment(1, 5), Segment(2, 5), Segment(3, 9, iscrowd=True), Segment(4, 11)))
    # every non-crowd segment: two instances of one thing class, a stuff region; the crowd segment is left out
    assert [(c, int(m.sum())) for c, m in get_task("panoptic").gt_objects(target)] == [(5, 4), (5, 4), (11, 4)]


def test_diagnose_reads_a_panoptic_run(tmp_path, capsys):
    from tests.test_panoptic import TINY

    sets = [f"{section}.{k}={v}" for section, kv in TINY.items() for k, v in kv.items()]
    run_one(RunSpec(method="finetune", protocol="synth-pan-10-5", out=str(tmp_path),
                    overrides=RunSpec.freeze_overrides(parse_set_options(sets))), show_progress=False)
    assert main([str(tmp_path), "--method", "finetune", "--protocol", "synth-pan-10-5", "--set", *sets]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[3:]]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert len({int(r[1]) for r in rows}) == 1 and int(rows[0][1]) > 0     # the base segments, every step
    for r in rows:
        assert 0.0 <= float(r[2]) <= 1.0 and sum(map(int, r[4:])) == int(r[1])
