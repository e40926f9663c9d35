"""--track: TensorBoard event files written by a real run and read back with TensorBoard's own reader;
the W&B adapter against a recording stand-in for the wandb module (wandb is not a test dependency)."""

import sys
import types
from dataclasses import replace

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmark.errors import EnvironmentProblem
from benchmark.runner import run_one
from benchmark.tracking import make_tracker
from tests.test_runner import TINY, spec


def scalars(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_every_iteration_and_each_steps_metrics(tmp_path):
    run_dir = run_one(replace(spec("mib", tmp_path), track="tensorboard"), show_progress=False)
    found = scalars(run_dir / "tensorboard")
    step0, inc = int(TINY["step0"]["iterations"]), int(TINY["increment"]["iterations"])
    total = step0 + 2 * inc                                          # synth-10-5: steps 0, 1, 2
    # every iteration of every step, on one global x axis (step 0 shared: trained by this run here)
    assert [x for x, _ in found["train/loss"]] == list(range(1, total + 1))
    assert [v for _, v in found["train/continual_step"]] == [0] * step0 + [1] * inc + [2] * inc
    for tag in ("train/lr", "train/grad_norm", "train/ce", "train/mask", "train/dice"):
        assert len(found[tag]) == total, tag
    assert [x for x, _ in found["train/kd"]] == list(range(step0 + 1, total + 1))   # MiB's term, steps >= 1
    # loss = sum of the terms, per iteration
    terms = ("train/ce", "train/mask", "train/dice", "train/kd")
    for x, loss in found["train/loss"]:
        assert loss == pytest.approx(sum(dict(found[t]).get(x, 0.0) for t in terms), rel=1e-5)
    # each step's metrics, at the step's last iteration, equal the stored per-class rows' means
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert [x for x, _ in found["eval/seen/miou"]] == [step0, step0 + inc, total]
    for (x, value), step in zip(found["eval/new/miou"], (0, 1, 2)):
        new = rows[(rows.step == step) & (rows.class_step == step) & (rows.metric == "iou")]["value"]
        assert value == pytest.approx(new.mean(), abs=1e-4)


def test_wandb_adapter_initialises_logs_and_finishes(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = make_tracker("wandb", tmp_path, "synth-10-5/mib/seed0", {"a": 1})
    tracker.log({"train/loss": 2.0}, 7)
    tracker.close()
    init = calls[0][1]
    assert init["name"] == "synth-10-5/mib/seed0" and init["resume"] == "allow" and init["config"] == {"a": 1}
    # the same run folder resumes the same W&B run
    again = make_tracker("wandb", tmp_path, "x", {})
    assert calls[-1][1]["id"] == init["id"] and calls[1] == ("log", {"train/loss": 2.0}, 7)
    again.close()


def test_missing_tracker_package_is_an_installation_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # import fails as when not installed
    with pytest.raises(EnvironmentProblem, match="wandb") as err:
        make_tracker("wandb", tmp_path, "x", {})
    assert ".[track]" in err.value.hint
