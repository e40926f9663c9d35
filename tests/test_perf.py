"""The performance harness on tiny settings: it runs end to end, the JSON has exactly its keys, the stock
comparison is the same computation, a memory subprocess reports. No timing assertions."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmark.engine.presets import get_preset
from benchmark.perf import PerfSettings, run_perf
from benchmark.perf.__main__ import main
from benchmark.perf.cases import CaseBuilder, all_cases
from benchmark.perf.memory import measure
from benchmark.perf.profiling import write_profiles
from benchmark.perf.report import JSON_KEYS, markdown, to_json, write_json
from benchmark.perf.steps import StockStep
from benchmark.perf.suite import METHODS
from benchmark.perf.timing import interleaved, steady_iteration_seconds

TINY_RUN = (
    ("model", (("encoder_layers", "1"), ("decoder_layers", "2"), ("train_num_points", "64"))),
    ("synth", (("train_images", "40"), ("val_images", "4"), ("min_size", "32"), ("max_size", "48"))),
    ("step0", (("iterations", "2"), ("batch_size", "2"), ("crop_size", "32"))),
    ("increment", (("batch_size", "2"), ("crop_size", "32"))),
)


@pytest.fixture(scope="module")
def tiny_settings() -> PerfSettings:
    return PerfSettings(overrides=TINY_RUN, repeats=5, warmup=0, step_iterations=3, plop_batches=1,
                        confusion_maps=2, confusion_size=64, confusion_classes=12, loader_batches=1,
                        threads=1, memory=False, memory_iterations=1, bootstrap_images=100, bootstrap_classes=10,
                        bootstrap_resamples=50)


def test_run_writes_exactly_the_json_keys_and_a_markdown_table(tiny_settings, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = run_perf(tiny_settings, tmp_path / "work")
        assert torch.get_num_threads() == 3     # the perf run's 1 thread does not leak into the caller
    finally:
        torch.set_num_threads(threads)
    data = to_json(result)
    assert tuple(data) == JSON_KEYS
    assert all(set(value) == {"cpu"} for value in data.values())
    for key in ("engine_step_ratio_vs_transformers", "confusion_speedup_vs_torchmetrics", "loader_to_train_throughput"):
        assert data[key]["cpu"] > 0 and math.isfinite(data[key]["cpu"])
    assert set(data["method_step_ratio_vs_finetune"]["cpu"]) == {"mib", "plop", "comformer", "cisdq"}
    assert all(v > 0 for v in data["method_step_ratio_vs_finetune"]["cpu"].values())
    # memory was skipped: every case is listed, with no value
    assert data["peak_memory_mib"]["cpu"] == {name: None for name in all_cases(METHODS)}
    # the step-0 models were trained once and kept, keyed by configuration, for later runs and subprocesses
    kept = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "work" / "cpu").iterdir())
    assert kept == ["step0_finetune"]      # CisDQ's group 0 is the tiny preset's model: the same step 0

    def no_training(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr("benchmark.perf.cases.train_step0", no_training)
    again = CaseBuilder(tiny_settings, "cpu", tmp_path / "work" / "cpu").step0_model("mib")
    assert again.layout == ((get_preset("tiny").num_queries, 10),)
    with pytest.raises(AssertionError, match="trained again"):    # another configuration, another key
        CaseBuilder(replace(tiny_settings, seed=1), "cpu", tmp_path / "work" / "cpu").step0_model("mib")

    path = tmp_path / "out" / "perf.json"
    write_json(result, path)
    assert json.loads(path.read_text()) == data
    table = markdown(result)
    assert "| engine step / transformers step" in table and "cisdq step / finetune step" in table
    assert "1 torch thread(s), freed CPU memory retained" in table and "batch 2, crop 32, 64 loss points" in table
    assert "rounds (min - max)" in table and "Machine load" in table
    assert len(result.devices[0].round_ratios["plop"]) == tiny_settings.repeats
    assert "| bootstrap: 100 images x 10 classes x 50 resamples" in table and len(result.bootstrap.rounds) == 5


def test_bootstrap_case_alone(capsys):
    from benchmark.perf.bootstrap import compare_pair, per_image_counts
    from benchmark.report.bootstrap import BootstrapConfig

    stats = per_image_counts(30, 8)
    intervals = compare_pair(stats, stats, np.zeros(8, int), 0, BootstrapConfig(resamples=50))
    assert intervals["seen"][2] == (0.0, 0.0)          # a method against itself: a zero difference
    assert main(["--bootstrap-only", "--repeats", "5"]) == 0
    out = capsys.readouterr().out
    assert "bootstrap: 2000 images x 150 classes x 1000 resamples, 2 methods paired (s)" in out and "<= 10" in out


def test_stock_step_computes_what_the_engine_step_computes(tiny_settings, tmp_path):
    """Same weights, batch, seed and loss settings: one iteration of each moves the weights alike."""
    builder = CaseBuilder(tiny_settings, "cpu", tmp_path)
    engine = builder.engine_case()
    stock = StockStep(engine)
    assert stock.stock.config.train_num_points == engine.ctx.criterion.num_points
    torch.manual_seed(3)
    engine.run(1)
    torch.manual_seed(3)
    stock.run(1)
    ours = dict(engine.model.named_parameters())
    theirs = dict(stock.stock.named_parameters())
    moved = 0
    for name, value in ours.items():
        other = theirs[name.replace("class_heads.0.", "class_predictor.")]
        assert torch.allclose(value, other, atol=1e-6), name
        moved += not torch.equal(value, engine.initial_state[name])
    assert moved > len(ours) // 2


def test_profile_tables_name_the_engine_code(tiny_settings, tmp_path):
    engine = CaseBuilder(tiny_settings, "cpu", tmp_path / "work").engine_case()
    (path,) = write_profiles({"engine_step": lambda: engine.run(3)}, "cpu", tmp_path / "profiles")
    assert path == tmp_path / "profiles" / "cpu" / "engine_step.txt"
    text = path.read_text()
    assert "aten::" in text and "benchmark/engine/criterion.py" in text and "train_step_loop" in text


def test_memory_subprocess_reports_a_peak(tiny_settings, tmp_path):
    result = measure(tiny_settings, "cpu", "confusion", tmp_path)
    assert result.peak > 50 and 0 <= result.above_setup <= result.peak


def test_interleaving_rotates_order_and_pairs_rounds():
    calls = []
    values = {"a": iter([9.0, 2.0, 4.0, 6.0]), "b": iter([9.0, 1.0, 1.0, 2.0])}

    def case(name):
        def run():
            calls.append(name)
            return next(values[name])
        return run

    m = interleaved({"a": case("a"), "b": case("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert m.samples == {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 2.0]}
    assert m.ratio("a", "b") == 3.0 and m.median("a") == 4.0
    assert steady_iteration_seconds([0.0, 5.0, 6.0, 8.0]) == 1.5
    with pytest.raises(ValueError):
        steady_iteration_seconds([0.0, 1.0])


def test_settings_round_trip_and_refusals(tiny_settings, capsys):
    from benchmark.perf.__main__ import build_parser, settings_from_args

    assert settings_from_args(build_parser().parse_args([])).heap_retention
    assert not settings_from_args(build_parser().parse_args(["--no-heap-retention"])).heap_retention
    assert PerfSettings.from_dict(json.loads(json.dumps(tiny_settings.to_dict()))) == tiny_settings
    merged = dict(PerfSettings(step0_iterations=7, workers=1).run_overrides())
    assert dict(merged["step0"]) == {"iterations": "7"} and dict(merged["data"]) == {"workers": "1"}
    explicit = dict(replace(tiny_settings, step0_iterations=7).run_overrides())   # --set step0.iterations wins
    assert dict(explicit["step0"])["iterations"] == "2"
    runner_log = logging.getLogger("benchmark.runner")
    level = runner_log.level
    assert main(["--repeats", "3", "--no-memory"]) == 2
    assert runner_log.level == level        # the runner's log.txt still gets its INFO lines afterwards
    assert "repeats must be at least 5" in capsys.readouterr().err
