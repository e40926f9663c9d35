"""The grid's progress in iterations, read from the results store (benchmark.progress)."""

from __future__ import annotations

import logging

from benchmark.progress import GridProgress, Snapshot, console_filter, plan_units, progress_line, snapshot
from tests.test_runner import spec


def _log(path, *lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"12:00:00 INFO benchmark.engine.trainer: {line}\n" for line in lines))


def test_units_weigh_steps_by_iterations_and_count_a_shared_step0_once(tmp_path):
    specs = [spec("finetune", tmp_path), spec("mib", tmp_path), spec("joint", tmp_path)]
    units = plan_units(specs)
    # shared step 0 (4 it), finetune and mib steps 1 and 2 (3 it each), joint's single step (4 it)
    assert [u.iterations for u in units] == [4, 3, 3, 3, 3, 4]
    assert units[0].done_file.parts[-4] == "_step0" and len(units[0].logs) == 2
    assert snapshot(units) == Snapshot(0, 20, ())


def test_an_own_step0_is_named_for_its_recipe(tmp_path):
    units = plan_units([spec("finetune", tmp_path), spec("eclipse", tmp_path)])
    assert [u.label for u in units if u.step == 0] == ["shared step 0 (seed 0)", "eclipse step 0 (seed 0)"]


def test_snapshot_reads_done_markers_and_the_iteration_lines_of_the_logs(tmp_path):
    specs = [spec("finetune", tmp_path), spec("mib", tmp_path)]
    units = plan_units(specs)
    _log(units[0].logs[1], "step 0: iteration 2/4 loss 3.0 lr 1e-03 eta 0:00:01")   # mib trains the shared step 0
    assert snapshot(units).done == 2 and snapshot(units).active == ("shared step 0 (seed 0) 2/4",)
    units[0].done_file.parent.mkdir(parents=True)
    units[0].done_file.touch()
    ft_log = units[1].logs[0]
    _log(ft_log, "step 0: iteration 4/4 loss 3.0 lr 1e-03 eta 0:00:00",
         "step 1: resuming from iteration 1/3 (checkpoint)", "step 1: iteration 2/3 loss 2.0 lr 1e-03 eta 0:00:01")
    snap = snapshot(units)
    assert snap.done == 4 + 2 and snap.total == 16 and snap.active == ("finetune seed 0 step 1 2/3",)


def test_progress_line_eta_counts_iterations():
    line = progress_line(Snapshot(300, 1000, ("mib seed 0 step 1 20/100",)), start_done=100, elapsed=20.0)
    # 200 iterations in 20 s -> 700 left take 70 s
    assert line == ("progress: 300/1000 iterations (30.0%), elapsed 0m20s, ETA 1m10s; "
                    "training: mib seed 0 step 1 20/100")
    assert "ETA unknown" in progress_line(Snapshot(0, 10, ()), start_done=0, elapsed=5.0)


def test_without_a_terminal_progress_is_plain_log_lines(tmp_path, caplog):
    units = plan_units([spec("finetune", tmp_path)])
    caplog.set_level(logging.INFO, logger="benchmark.progress")
    with GridProgress(units, terminal=False, interval=0.05, poll=0.01):
        for u in units:
            u.done_file.parent.mkdir(parents=True, exist_ok=True)
            u.done_file.touch()
    text = caplog.text
    assert "10 training iterations in 3 steps, 0 already done" in text
    assert "progress: 10/10 iterations (100.0%)" in text and "\r" not in text


def test_a_terminal_console_drops_the_iteration_records():
    record = logging.LogRecord("x", logging.INFO, "f", 1, "step 1: iteration 2/3", None, None)
    assert console_filter(record)
    record.progress_line = True
    assert not console_filter(record)


def test_synthetic_generation_off_a_terminal_logs_plain_lines(tmp_path, capfd, caplog):
    from benchmark.parallel import prepare_synthetic

    # A dataset seed no other test uses, so it is really generated here; pytest's stderr is not a terminal.
    with caplog.at_level(logging.INFO, logger="benchmark.parallel"):
        prepare_synthetic([spec("finetune", tmp_path, extra=["--set", "synth.seed=913"])])
    assert "\r" not in capfd.readouterr().err
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("synthetic dataset (20 classes, 36 images)") for m in messages)
    ready = next(m for m in messages if m.startswith("synthetic dataset ready: "))
    assert (tmp_path.parent / ready.split(": ", 1)[1]).resolve().is_dir()
