"""python -m benchmark.reevaluate: stored weights evaluated again under other evaluation settings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from benchmark.reevaluate import main
from benchmark.runner import run_one
from benchmark.store import RunStore
from tests.test_runner import metrics, spec, tiny_args

SETS = tiny_args()[1::2]           # the options the tiny run was trained with (synth.val_images=6 among them)


def run_folder(out):
    return out / "synth-10-5" / "finetune" / "seed0"


def test_reevaluation_reproduces_then_extends_a_run(tmp_path, capsys, monkeypatch):
    source = run_one(spec("finetune", tmp_path / "trained"), show_progress=False)

    # The same evaluation settings give back the stored numbers exactly: the weights and evaluation are the run's.
    same = tmp_path / "same"
    assert main([str(tmp_path / "trained"), "--out", str(same), "--eval-set", "synth.val_images=6", "--set", *SETS]) == 0
    pd.testing.assert_frame_equal(metrics(run_folder(same)), metrics(source))

    # Twice the validation images and the arg-max inference: a complete run folder with the new configuration.
    more = tmp_path / "more"
    assert main([str(tmp_path / "trained"), "--out", str(more), "--eval-set", "synth.val_images=12", "eval.mode=sum",
                 "--set", *SETS]) == 0
    assert "[1/1] synth-10-5 finetune seed 0" in capsys.readouterr().out
    new, old = RunStore(run_folder(more)), RunStore(source)
    record = new.read_run_json()
    assert record["config"]["synth"]["val_images"] == 12 and record["config"]["eval"]["mode"] == "sum"
    assert record["reevaluated_from"] == str(source.resolve())
    assert set(record["reevaluated_with"]) == {"git_revision", "versions"}
    assert record["config"]["schedule"] == old.read_run_json()["config"]["schedule"]
    for t in (0, 1, 2):
        assert new.is_done(t) and new.weights_path(t).read_bytes() == old.weights_path(t).read_bytes()
        assert new.done_record(t)["cost"] == old.done_record(t)["cost"]        # the training's cost, copied
        assert new.read_per_image(t).num_images == 12
    # The larger validation set starts with the default one's images: evaluated with the run's own inference
    # (segments), the first six images' per-image counts are the stored run's.
    both = tmp_path / "segments12"
    assert main([str(tmp_path / "trained"), "--out", str(both), "--eval-set", "synth.val_images=12", "--set", *SETS]) == 0
    stored, larger = old.read_per_image(2), RunStore(run_folder(both)).read_per_image(2)
    first = [list(larger.image_ids).index(i) for i in stored.image_ids]
    assert sorted(first) == list(range(6))
    for name, counts in stored.arrays.items():
        np.testing.assert_array_equal(larger.arrays[name][first], counts)

    # Resumable: a step already re-evaluated is skipped.
    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr("benchmark.runner.StepRunner.evaluate", no_evaluation)
    assert main([str(tmp_path / "trained"), "--out", str(more), "--eval-set", "synth.val_images=12", "eval.mode=sum",
                 "--set", *SETS]) == 0


def test_only_evaluation_settings_may_change(tmp_path, capsys):
    run_one(spec("finetune", tmp_path / "trained"), show_progress=False)
    args = [str(tmp_path / "trained"), "--out", str(tmp_path / "new")]
    assert main(args + ["--eval-set", "increment.iterations=9", "--set", *SETS]) == 2
    err = capsys.readouterr().err
    assert "not an evaluation setting" in err and "Traceback" not in err
    # without the run's training options the rebuilt run differs from the stored one: refused, nothing written
    assert main(args + ["--eval-set", "synth.val_images=12"]) == 2
    err = capsys.readouterr().err
    assert "trained with other options" in err and "schedule, synth.max_size" in err and "hint:" in err
    assert not (tmp_path / "new").exists()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "new"), "--eval-set", "eval.mode=sum"]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main(args + ["--eval-set", "synth.val_images=12", "--methods", "plop", "--set", *SETS]) == 2
    assert "no runs under" in capsys.readouterr().err
    # the source folder itself as --out: refused before anything is written
    assert main([str(tmp_path / "trained"), "--out", str(tmp_path / "trained"), "--eval-set", "eval.mode=sum",
                 "--set", *SETS]) == 2
    assert "overwrite the source run" in capsys.readouterr().err
    assert json.loads((run_folder(tmp_path / "trained") / "run.json").read_text())["config"]["eval"]["mode"] == "segments"


def test_panoptic_and_instance_runs_reevaluate_exactly(tmp_path):
    """Every task stores its own artefacts (panoptic: predictions in COCO panoptic format; instance:
    detections); with unchanged settings the re-evaluation reproduces the stored metrics exactly."""
    from benchmark.config import parse_set_options
    from benchmark.runner import RunSpec
    from tests.test_panoptic import TINY as PAN_TINY

    for protocol, tiny in (("synth-pan-10-5", PAN_TINY), ("synth-inst-10-5", None)):
        sets = ([f"{section}.{k}={v}" for section, kv in PAN_TINY.items() for k, v in kv.items()] if tiny
                else SETS)
        trained = tmp_path / protocol / "trained"
        source = run_one(RunSpec(method="finetune", protocol=protocol, out=str(trained),
                                 overrides=RunSpec.freeze_overrides(parse_set_options(sets))), show_progress=False)
        new = tmp_path / protocol / "new"
        assert main([str(trained), "--out", str(new), "--eval-set", "synth.val_images=6", "--set", *sets]) == 0
        copy = new / protocol / "finetune" / "seed0"
        pd.testing.assert_frame_equal(metrics(copy), metrics(source))
        record = RunStore(copy).read_run_json()
        if tiny:      # the ground truth it was scored against: the (re)generated validation set's
            assert record["val_panoptic_json"] == RunStore(source).read_run_json()["val_panoptic_json"]
            assert (copy / "step_02" / "panoptic.json").is_file()
