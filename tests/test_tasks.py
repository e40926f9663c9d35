"""The task registry: every protocol's task has one implementation; lookups and refusals are clear."""

from __future__ import annotations

import pytest

from benchmark.errors import ConfigError
from benchmark.runner import RunSpec, resolve
from benchmark.tasks import TASKS, get_task, task_for_metric
from benchmark.tasks.semantic import SemanticInference
from protocols import describe_protocols
from protocols.datasets import TASKS as PROTOCOL_TASKS


def test_every_protocol_task_is_implemented():
    assert set(PROTOCOL_TASKS) == set(TASKS)
    assert {p["task"] for p in describe_protocols()} <= set(TASKS)


def test_lookups():
    assert get_task("semantic").primary_metric == "iou"
    assert task_for_metric("ap50").name == "instance"
    assert task_for_metric("iou").name == "semantic"
    assert get_task("instance").instance_targets and not get_task("semantic").instance_targets
    with pytest.raises(ConfigError, match="unknown task 'depth'"):
        get_task("depth")
    with pytest.raises(ConfigError, match="no task reports"):
        task_for_metric("psnr")


def _spec(protocol: str, out, **eval_options) -> RunSpec:
    overrides = (("eval", tuple(sorted(eval_options.items()))),) if eval_options else ()
    return RunSpec(method="finetune", protocol=protocol, out=str(out), overrides=overrides)


def test_eval_options_belong_to_the_task(tmp_path):
    """``--set eval.*`` configures the semantic inference; an instance protocol has none and says so."""
    r = resolve(_spec("synth-10-5", tmp_path, mode="sum"))
    assert r.eval_options == SemanticInference(mode="sum") and r.config["eval"]["mode"] == "sum"
    assert "eval" not in resolve(_spec("synth-inst-10-5", tmp_path)).config
    with pytest.raises(ConfigError, match=r"synth-inst-10-5 \(instance task\) has no options"):
        resolve(_spec("synth-inst-10-5", tmp_path, mode="sum"))


def test_panoptic_class_kinds_become_things_and_stuff_groups():
    """CoMFormer's PQ^th / PQ^st: the report's extra groups are the means over the seen things / stuff."""
    import numpy as np
    import pandas as pd

    from benchmark.report.summary import prepare, protocol_layouts, run_scores
    from benchmark.tasks import TASKS
    from protocols import get_protocol

    kinds = TASKS["panoptic"].class_kinds("synth-pan-10-5")
    assert kinds["stuff"] == frozenset({5, 10, 15, 20}) and len(kinds["things"]) == 16
    assert TASKS["semantic"].class_kinds("synth-10-5") == {} and TASKS["panoptic"].class_kinds("no-such") == {}
    protocol = get_protocol("synth-pan-10-5")
    rows = [{"method": "finetune", "protocol": protocol.name, "seed": 0, "step": 0, "class_id": c,
             "class_name": str(c), "class_step": protocol.step_of(c), "metric": "pq",
             "value": (50.0 if c in kinds["stuff"] else 10.0) + c, "support": 1}
            for c in protocol.class_order]
    scores = run_scores(prepare(pd.DataFrame(rows))).set_index("group")["value"]
    seen0 = [c for c in protocol.steps[0]]
    assert scores["stuff"] == pytest.approx(np.mean([50.0 + c for c in seen0 if c in kinds["stuff"]]))
    assert scores["things"] == pytest.approx(np.mean([10.0 + c for c in seen0 if c in kinds["things"]]))
    assert protocol_layouts(pd.DataFrame(rows))[protocol.name].kinds == ("things", "stuff")
