"""The runner end to end on a tiny synthetic protocol: results store, resume after a kill, the grid.

Every run here trains the tiny preset for a handful of iterations on 32-px synthetic images: the
numbers are meaningless, the behaviour (what is written, what is skipped, what is identical) is not.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.config import parse_set_options
from benchmark.errors import ConfigError
from benchmark.runner import RunSpec, run_one

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "synth-10-5"

TINY = {
    "synth": {"train_images": "30", "val_images": "6", "min_size": "32", "max_size": "40"},
    "step0": {"iterations": "4", "batch_size": "2", "crop_size": "32", "eval_size": "32"},
    "increment": {"iterations": "3", "batch_size": "2", "crop_size": "32", "eval_size": "32"},
    "joint": {"iterations": "4", "batch_size": "2", "crop_size": "32", "eval_size": "32"},
    "train": {"checkpoint_every": "1"},
}


def tiny_args(extra=()):
    args = []
    for section, kv in TINY.items():
        for k, v in kv.items():
            args += ["--set", f"{section}.{k}={v}"]
    return args + list(extra)


def spec(method, out, extra=(), **kw):
    frozen = RunSpec.freeze_overrides(parse_set_options(tiny_args(extra)[1::2]))
    return RunSpec(method=method, protocol=PROTOCOL, seed=0, device="cpu", out=str(out), overrides=frozen, **kw)


def cli(*args, env=None, check=True):
    out = subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), *args], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(run_dir):
    return pd.read_csv(Path(run_dir) / "metrics.csv").sort_values(["step", "class_id", "metric"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """finetune and joint, run once through the command line (with the report)."""
    out = tmp_path_factory.mktemp("results")
    res = cli("--methods", "finetune", "joint", "--protocol", PROTOCOL, "--device", "cpu", "--out", str(out),
              *tiny_args())
    return out, res


def test_end_to_end_writes_the_store_and_the_report(finished):
    out, res = finished
    run = out / PROTOCOL / "finetune" / "seed0"
    info = json.loads((run / "run.json").read_text())
    assert list(info)[:3] == ["method", "protocol", "seed"]
    assert info["protocol_fingerprint"] and info["config"]["schedule"]["step0"]["iterations"] == 4
    for t in range(3):
        step = run / f"step_{t:02d}"
        assert (step / "DONE").is_file() and (step / "weights.pt").is_file()
        with np.load(step / "confusion.npz") as z:
            assert z["matrix"].dtype == np.int64 and list(z["class_ids"]) == list(range(1, 21)) + [255]   # + unassigned
            matrix = z["matrix"]
        # per-image statistics: one row per validation image, sums = the confusion matrix = metrics.csv
        with np.load(step / "per_image.npz") as p:
            assert len(p["image_ids"]) == 6 and list(p["class_ids"]) == list(range(1, 21)) + [255]
            tp, fp, fn = p["tp"], p["fp"], p["fn"]
        assert tp.dtype == np.int64 and tp.shape == (6, 21)
        diag = np.diag(matrix)
        assert np.array_equal(tp.sum(0), diag) and np.array_equal(fp.sum(0), matrix.sum(0) - diag)
        assert np.array_equal(fn.sum(0), matrix.sum(1) - diag)
        iou = pd.read_csv(step / "metrics.csv").set_index("class_id")["value"]
        has_gt = (tp + fn).sum(0) > 0
        expected = 100 * tp.sum(0)[has_gt] / (tp + fp + fn).sum(0)[has_gt]
        np.testing.assert_allclose(iou.loc[np.array(list(range(1, 21)) + [255])[has_gt]].to_numpy(), expected)
    assert not list(run.glob("*.inprogress.pt"))
    for t in (1, 2):          # cost of the steps trained in this run (step 0 is the shared one's, in its cache)
        cost = json.loads((run / f"step_{t:02d}" / "DONE").read_text())["cost"]
        assert cost["wall_time_s"] > 0 and cost["images_per_s"] > 0 and cost["peak_memory_mib"] > 50
        assert cost["peak_memory_kind"] == "process_peak_rss" and cost["devices"] == 1
        assert 0 < cost["trainable_params"] <= cost["total_params"]
        assert cost["device_hours"] == pytest.approx(cost["wall_time_s"] / 3600, abs=1e-6)
        assert json.loads((run / "run.json").read_text())["costs"][f"step_{t:02d}"] == cost
    assert "parameters trained; mean loss" in (run / "log.txt").read_text()
    costs = pd.read_csv(out / "report" / "cost.csv")
    mine = costs[costs["method"] == "finetune"].set_index("step")
    assert sorted(mine.index) == [0, 1, 2] and (mine["wall_time_s"] > 0).all()
    assert mine.loc[1, "images_per_s"] == pytest.approx(
        json.loads((run / "step_01" / "DONE").read_text())["cost"]["images_per_s"])
    assert "| finetune" in (out / "report" / "cost.md").read_text()
    rows = metrics(run)
    assert set(rows["step"]) == {0, 1, 2} and set(rows["metric"]) == {"iou"}
    assert len(rows) == 3 * 20 and not rows.duplicated(["step", "class_id", "metric"]).any()
    joint = out / PROTOCOL / "joint" / "seed0"
    assert (joint / "step_00" / "DONE").is_file() and not (joint / "step_01").exists()
    assert (out / "report" / "summary.csv").is_file() and (out / "report" / "tables.tex").is_file()
    summary = pd.read_csv(out / "report" / "summary.csv")
    assert (summary.loc[summary["metric"] == "miou", "ci_source"] == "images").all()
    assert (out / "report" / "significance.csv").is_file()
    assert (joint / "step_00" / "per_image.npz").is_file()
    assert "Fine-tuning" in res.stdout and "Joint" in res.stdout      # the final summary table
    assert (run / "log.txt").read_text().count("step 1: iteration 3/3") == 1
    # Not a terminal: the grid's progress comes as plain log lines, counted in iterations (4 + 3 + 3 + 4).
    assert "\r" not in res.stderr
    assert "progress: 14/14 iterations (100.0%)" in res.stderr


def test_backbone_norm_may_freeze_from_step_1(tmp_path):
    """A from-scratch preset trains its BatchNorm in step 0 and may keep it as FrozenBN afterwards."""
    from benchmark.engine.checkpoint import load_weights

    run = run_one(spec("finetune", tmp_path, extra=["--set", "model.freeze_backbone_norm_after_step0=true"]),
                  show_progress=False)
    (_, w0), (_, w1), (_, w2) = (load_weights(run / f"step_{t:02d}" / "weights.pt") for t in range(3))
    norm = [k for k in w0 if ".encoder." in k and ".normalization." in k and not k.endswith("num_batches_tracked")]
    assert norm and any(k.endswith("running_mean") for k in norm) and any(k.endswith(".weight") for k in norm)
    for key in norm:
        torch.testing.assert_close(w1[key], w0[key], rtol=0, atol=0)
        torch.testing.assert_close(w2[key], w0[key], rtol=0, atol=0)
    convs = [k for k in w0 if ".encoder." in k and ".convolution." in k]
    assert convs and any(not torch.equal(w1[k], w0[k]) for k in convs)     # the rest of the backbone trains


def test_same_command_again_skips_finished_steps(finished):
    out, _ = finished
    run = out / PROTOCOL / "finetune" / "seed0"
    before = {p: p.stat().st_mtime_ns for p in run.glob("step_*/weights.pt")}
    run_one(spec("finetune", out), show_progress=False)      # what the same command does, in-process
    assert {p: p.stat().st_mtime_ns for p in run.glob("step_*/weights.pt")} == before
    assert "already done" in (run / "log.txt").read_text()


def test_changed_configuration_is_refused_unless_overwrite(finished):
    out, _ = finished
    res = cli("--methods", "finetune", "--protocol", PROTOCOL, "--device", "cpu", "--out", str(out), "--no-report",
              *tiny_args(["--set", "increment.lr=0.002"]), check=False)
    assert res.returncode == 2 and "different configuration" in res.stderr and "Traceback" not in res.stderr
    assert "--overwrite" in res.stderr


def test_shared_step0_is_reused_across_methods(tmp_path):
    a = run_one(spec("finetune", tmp_path), show_progress=False)
    caches = list((tmp_path / "_step0").iterdir())
    assert len(caches) == 1
    with np.load(a / "step_00" / "confusion.npz") as z, np.load(caches[0] / "step_00" / "confusion.npz") as c:
        assert np.array_equal(z["matrix"], c["matrix"])
    with np.load(a / "step_00" / "per_image.npz") as z, np.load(caches[0] / "step_00" / "per_image.npz") as c:
        assert np.array_equal(z["tp"], c["tp"])                  # the reused step 0 brings its per-image counts
    # CisDQ's group 0 (one query per base class) is the tiny preset's 10-query model: the same step 0
    b = run_one(spec("cisdq", tmp_path, extra=["--set", "increment.iterations=1"]), show_progress=False)
    assert "step 0 reused" in (b / "log.txt").read_text() and len(list((tmp_path / "_step0").iterdir())) == 1
    with np.load(a / "step_00" / "confusion.npz") as z, np.load(b / "step_00" / "confusion.npz") as c:
        assert np.array_equal(z["matrix"], c["matrix"])


def test_sigkill_mid_step_then_same_command_gives_identical_metrics(tmp_path):
    """A real SIGKILL in the middle of step 1, then the same command: metrics equal an uninterrupted run."""
    extra = ["--set", "increment.iterations=6"]
    clean = run_one(spec("finetune", tmp_path / "clean", extra=extra), show_progress=False)
    killed = tmp_path / "killed"
    args = ["--methods", "finetune", "--protocol", PROTOCOL, "--device", "cpu", "--no-report", "--out", str(killed),
            *tiny_args(extra)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_benchmark.py"), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = killed / PROTOCOL / "finetune" / "seed0"
    checkpoint = run_dir / "step_01.inprogress.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run finished before it could be killed mid-step"
    assert not (run_dir / "step_01" / "DONE").exists()
    cli(*args)
    assert "resuming from iteration" in (run_dir / "log.txt").read_text()
    pd.testing.assert_frame_equal(metrics(clean), metrics(run_dir))


def test_interrupted_step_resumes_without_recomputing_finished_steps(tmp_path, monkeypatch):
    """An exception in step 2 (a stand-in for a crash): steps 0-1 stay done, step 2 resumes mid-way."""
    from methods.finetune import Finetune

    s = spec("finetune", tmp_path)
    original = Finetune.loss
    calls = {"n": 0}

    def crashing(self, batch, outputs, old_outputs, ctx):
        if ctx.step == 2 and ctx.iteration == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, batch, outputs, old_outputs, ctx)

    monkeypatch.setattr(Finetune, "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_one(s, show_progress=False)
    run_dir = s.run_dir()
    assert (run_dir / "step_01" / "DONE").is_file() and not (run_dir / "step_02" / "DONE").exists()
    monkeypatch.setattr(Finetune, "loss", original)
    step1 = (run_dir / "step_01" / "weights.pt").stat().st_mtime_ns
    run_one(s, show_progress=False)
    assert (run_dir / "step_02" / "DONE").is_file()
    assert (run_dir / "step_01" / "weights.pt").stat().st_mtime_ns == step1


def test_unknown_set_key_is_an_error(tmp_path):
    ov = (("method", (("no_such_weight", "1"),)),)
    with pytest.raises(ConfigError, match="no_such_weight"):
        run_one(RunSpec(method="finetune", protocol=PROTOCOL, out=str(tmp_path), overrides=ov), show_progress=False)


def test_joblib_grid_and_submitit_local_executor(tmp_path):
    import submitit

    from benchmark.parallel import run_grid, submit_grid

    specs = [spec("finetune", tmp_path / "grid"), spec("joint", tmp_path / "grid")]
    dirs = run_grid(specs, jobs=2)
    assert sorted(d.parent.name for d in dirs) == ["finetune", "joint"]
    assert all((d / "metrics.csv").is_file() for d in dirs)
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    executor.update_parameters(timeout_min=10)
    [d] = submit_grid([spec("joint", tmp_path / "slurm")], executor=executor)
    assert (d / "step_00" / "DONE").is_file()
    pd.testing.assert_frame_equal(metrics(d), metrics(tmp_path / "grid" / PROTOCOL / "joint" / "seed0"))
    # one torch thread per CPU run however it is launched (runner.CPU_THREADS), and the caller's setting back
    import torch

    before = torch.get_num_threads()
    [alone] = run_grid([spec("joint", tmp_path / "alone")])
    assert torch.get_num_threads() == before
    for run_dir in [*dirs, d, alone]:
        assert json.loads((run_dir / "run.json").read_text())["torch_threads"] == 1


def _children(pid):
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_of_the_command_stops_its_parallel_workers(tmp_path):
    """``kill`` (SIGTERM to the parent alone) mid-training: exit 143, no traceback, and the loky workers end too.

    Before, the orphaned workers trained on (their runs' locks held, a core each) after the parent was gone."""
    long = ["--set", "step0.iterations=100000", "--set", "joint.iterations=100000"]
    args = ["--methods", "finetune", "joint", "--protocol", PROTOCOL, "--device", "cpu", "--no-report",
            "--jobs", "2", "--out", str(tmp_path / "out"), *tiny_args(long)]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run_benchmark.py"), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
    workers = []
    try:
        deadline = time.time() + 240
        while len(list((tmp_path / "out").rglob("*.inprogress.pt"))) < 2 and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        workers = [p for p in _children(proc.pid) if "LokyProcess" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2 and proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        deadline = time.time() + 30
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "a worker outlived the terminated command"
        stderr = (tmp_path / "stderr.txt").read_text()
        assert "terminated: finished steps are kept" in stderr and "Traceback" not in stderr
    finally:
        for p in [proc.pid, *workers]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_torchrun_two_gloo_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(ROOT / "run_benchmark.py"), "--methods", "joint",
                          "--protocol", PROTOCOL, "--device", "cpu", "--out", str(tmp_path), "--no-report",
                          # 2 images per rank: BatchNorm needs more than one value per channel
                          *tiny_args(["--set", "joint.batch_size=4"])], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / PROTOCOL / "joint" / "seed0"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    rows = metrics(run)
    assert len(rows) == 20 and not rows.duplicated(["step", "class_id"]).any()


def test_parallel_dispatch_puts_shared_step0_producers_first(tmp_path):
    from benchmark.parallel import dispatch_order

    names = ["finetune", "mib", "plop", "comformer", "cisdq", "joint"]
    order = [s.method for s in dispatch_order([spec(m, tmp_path) for m in names])]
    # fine-tune trains the shared step 0 while the second worker trains joint; the rest reuse that step 0
    # (CisDQ too: with the tiny preset's 10 queries its group 0 is the same model)
    assert order == ["finetune", "joint", "mib", "plop", "comformer", "cisdq"]
    wider = spec("cisdq", tmp_path, extra=["--set", "method.queries_per_class=2"])
    assert [s.method for s in dispatch_order([spec("finetune", tmp_path), spec("mib", tmp_path), wider])] == \
        ["finetune", "cisdq", "mib"]
    other_seed = RunSpec(method="mib", protocol=PROTOCOL, seed=1, device="cpu", out=str(tmp_path))
    # another seed's step 0: MiB trains it (a producer too), and its 1800 cpu-schedule iterations go first
    assert [s.method for s in dispatch_order([spec("finetune", tmp_path), other_seed])] == ["mib", "finetune"]
    # the cpu schedule: joint's 2000 iterations first, then the 1200 + 2 x 300 of the step-0 producers;
    # the sharers (2 x 300, their step 0 reused) last, in the CLI's order
    every = ["finetune", "mib", "plop", "comformer", "cisdq", "eclipse", "balconpas", "joint"]
    default = [RunSpec(method=m, protocol=PROTOCOL, seed=0, device="cpu", out=str(tmp_path)) for m in every]
    assert [s.method for s in dispatch_order(default)] == \
        ["joint", "finetune", "eclipse", "mib", "plop", "comformer", "cisdq", "balconpas"]


def test_default_jobs_one_per_core_and_one_under_torchrun(tmp_path, monkeypatch):
    from benchmark.parallel import default_jobs

    specs = [spec(m, tmp_path) for m in ("finetune", "mib", "joint")]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_jobs(specs) == 2 and default_jobs(specs[:1]) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert default_jobs(specs) == 1


def test_schedule_sets_the_augmentation_defaults_and_set_wins(tmp_path):
    from benchmark.data import AugConfig
    from benchmark.runner import resolve

    r = resolve(RunSpec(method="finetune", protocol=PROTOCOL, device="cpu", out=str(tmp_path)))
    assert not r.aug.color_jitter and r.aug.scale_range == (1.0, 1.0)
    assert r.config["schedule"]["augmentation"] == {"color_jitter": False, "scale_range": [1.0, 1.0]}
    ov = (("data", (("color_jitter", "true"),)),)
    r = resolve(RunSpec(method="finetune", protocol=PROTOCOL, device="cpu", out=str(tmp_path), overrides=ov))
    assert r.aug.color_jitter and r.aug.scale_range == (1.0, 1.0)
    real = resolve(RunSpec(method="finetune", protocol="ade-100-50", schedule="paper", engine="r50",
                           data_root=str(tmp_path), out=str(tmp_path),
                           overrides=(("model", (("from_scratch", "true"),)),)))
    assert real.aug == AugConfig(crop_size=real.aug.crop_size)     # Mask2Former's recipe


def test_joint_training_is_shared_by_splits_with_the_same_classes(tmp_path):
    from benchmark.parallel import dispatch_order

    a = run_one(spec("joint", tmp_path), show_progress=False)                               # synth-10-5
    b_spec = spec("joint", tmp_path)
    b_spec = RunSpec(**{**b_spec.__dict__, "protocol": "synth-10-2"})
    b = run_one(b_spec, show_progress=False)
    assert "reused from" in (b / "log.txt").read_text()
    ra, rb = metrics(a), metrics(b)
    assert set(ra["protocol"]) == {"synth-10-5"} and set(rb["protocol"]) == {"synth-10-2"}
    np.testing.assert_array_equal(ra["value"].to_numpy(), rb["value"].to_numpy())   # the same model and eval
    assert [s.protocol for s in dispatch_order([spec("joint", tmp_path), b_spec])] == ["synth-10-5", "synth-10-2"]


def test_splits_with_the_same_step0_share_it_in_overlap_mode_only(tmp_path):
    from benchmark.runner import _step0_key, resolve

    def key(protocol, method="finetune"):
        s = spec(method, tmp_path)
        return _step0_key(resolve(RunSpec(**{**s.__dict__, "protocol": protocol})))

    assert key("synth-10-5") == key("synth-10-2")                 # same step 0, same 20 classes
    assert key("synth-10-5") != key("synth-5-5")                  # another step 0
    assert key("synth-10-5-disjoint") != key("synth-10-2-disjoint")   # disjoint images depend on later steps
    assert key("synth-10-5", "joint") != key("synth-10-5")


def test_the_synthetic_generator_version_is_part_of_the_run_config_and_the_step0_key(tmp_path, monkeypatch):
    import benchmark.data.synth as synth
    from benchmark.runner import _step0_key, resolve

    s = spec("finetune", tmp_path)
    before = resolve(s)
    assert before.config["synth"]["generator_version"] == synth.GENERATOR_VERSION
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION + 1)
    after = resolve(s)
    assert after.config["synth"]["generator_version"] == synth.GENERATOR_VERSION
    assert _step0_key(after) != _step0_key(before)      # a new catalogue never reuses an old step 0


def test_submitit_timeout_requeues_and_resumes(tmp_path):
    """A job that receives SLURM's timeout signal (USR2) requeues itself and resumes from its in-step
    checkpoint; its results equal an uninterrupted run's. submitit's local executor plays SLURM; with a
    limit this short (under 10 minutes) submitit counts every signal as a timeout."""
    import submitit

    from benchmark.parallel import RequeueableRun, run_grid

    long = ["--set", "joint.iterations=30"]
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"), max_num_timeout=2)
    executor.update_parameters(timeout_min=5, signal_delay_s=1)
    out = tmp_path / "slurm"
    job = executor.submit(RequeueableRun(), spec("joint", out, long))
    deadline = time.time() + 240
    while not list(out.glob("**/step_00.inprogress.pt")):
        assert time.time() < deadline and not job.done(), job.stdout()
        time.sleep(0.2)
    # the executor's process is a controller; the job itself is its child (as srun's task under SLURM)
    [task] = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == job._process.pid]
    os.kill(task, signal.SIGUSR2)
    run_dir = Path(job.result())
    assert (run_dir / "step_00" / "DONE").is_file()
    stdout = job.stdout() or ""
    assert "this job is timed-out" in stdout and "Requeued job" in stdout, stdout
    assert "stopped at iteration" in (job.stderr() or "") + stdout
    logs = "\n".join(p.read_text() for p in out.glob("**/log.txt"))
    assert "step 0: resuming from iteration" in logs, logs
    [reference] = run_grid([spec("joint", tmp_path / "ref", long)])
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference))


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
