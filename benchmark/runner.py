"""One run = every step of (method, protocol, seed), written into the results store.

Resumability (design.md): a step whose ``DONE`` marker exists is skipped (its weights are loaded when the
next step needs them); an interrupted step resumes from its in-step checkpoint (model, optimiser,
scheduler, RNG and loader position), so a SIGKILL at any moment followed by the same command ends with
exactly the metrics of an uninterrupted run. A run folder whose recorded configuration differs from the
command is refused unless ``--overwrite``.

Step 0 of the methods that share the standard engine and head layout (finetune, mib, plop, comformer)
is trained once per (protocol step 0, seed, engine, schedule, data settings) in a content-addressed cache
``<out>/_step0/<key>/`` and copied into each run (methods.md, schedules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from benchmark.config import apply_overrides, check_sections, to_jsonable
from benchmark.errors import ConfigError, UserError

log = logging.getLogger(__name__)

OVERRIDE_SECTIONS = ["step0", "increment", "joint", "model", "loss", "train", "data", "synth", "method", "eval"]


@dataclass(frozen=True)
class RunSpec:
    """What the command line asked for one run (hashable, picklable for joblib/submitit)."""

    method: str
    protocol: str
    seed: int = 0
    engine: str = "tiny"
    schedule: str = "cpu"
    data_root: str = "datasets"
    device: str = "cpu"
    out: str = "results"
    overrides: tuple = ()          # ((section, ((key, raw value), ...)), ...)
    backbone_weights: str | None = None
    overwrite: bool = False
    track: str = "none"            # benchmark.tracking: none | tensorboard | wandb (not part of the results)

    @property
    def override_dict(self) -> dict[str, dict[str, str]]:
        return {section: dict(kv) for section, kv in self.overrides}

    @staticmethod
    def freeze_overrides(overrides: dict[str, dict[str, str]]) -> tuple:
        """``parse_set_options``' dict as the hashable, order-independent ``overrides`` field."""
        return tuple(sorted((section, tuple(sorted(kv.items()))) for section, kv in overrides.items()))

    def run_dir(self, protocol_name: str | None = None) -> Path:
        return Path(self.out) / (protocol_name or self.protocol) / self.method / f"seed{self.seed}"


def resolve_device_name(name: str) -> str:
    from benchmark.engine.device import resolve_device

    return str(resolve_device(name).type)


# ---- resolved configuration ----------------------------------------------------------------------
@dataclass
class Resolved:
    """Everything a run uses, with the user's overrides applied; ``config`` goes into run.json."""

    spec: RunSpec
    protocol: Any
    train_protocol: Any
    method: Any
    schedule: Any
    preset: Any
    train: Any
    aug: Any
    loader: Any
    synth: Any
    criterion: Any
    config: dict = field(default_factory=dict)
    eval_options: Any = None      # the task's evaluation options (tasks: Task.eval_options), None if it has none

    @property
    def step_iterations(self) -> list[int]:
        """Planned training iterations of each step (the progress bar, dispatch order and tracker all use them)."""
        return [self.schedule.for_step(t, joint=self.method.joint).iterations
                for t in range(self.train_protocol.num_steps)]


def resolve(spec: RunSpec) -> Resolved:
    from benchmark.data import AugConfig, LoaderConfig
    from benchmark.data.weights import resolve_backbone_weights
    from benchmark.engine.optim import TrainConfig
    from benchmark.engine.presets import get_preset
    from benchmark.schedules import get_schedule
    from methods import get_method
    from protocols import get_protocol

    ov = spec.override_dict
    check_sections(ov, OVERRIDE_SECTIONS)
    protocol = get_protocol(spec.protocol)
    method = get_method(spec.method, protocol.name)
    if ov.get("method"):
        method = type(method)(apply_overrides(method.hparams, ov["method"], "method"))
    schedule = get_schedule(spec.schedule, protocol)
    schedule = dataclasses.replace(
        schedule,
        step0=apply_overrides(schedule.step0, ov.get("step0", {}), "step0"),
        increment=apply_overrides(schedule.increment, ov.get("increment", {}), "increment"),
        joint=apply_overrides(schedule.joint, ov.get("joint", {}), "joint"),
    )
    preset = apply_overrides(get_preset(spec.engine), ov.get("model", {}), "model")
    backbone_weights = resolve_backbone_weights(spec.backbone_weights, preset.name)
    if preset.pretrained and backbone_weights is None and not preset.from_scratch:
        raise ConfigError(f"the {preset.name} preset starts from ImageNet weights in every paper, and none were "
                          f"given: trained from random weights its numbers mean nothing",
                          hint=f"run `python -m benchmark.data.prepare weights {preset.name}` once, then add "
                               f"--backbone-weights {preset.name}; to train from scratch on purpose add "
                               f"--set model.from_scratch=true")
    per_step = sorted(set(ov.get("train", {})) & {"iterations", "batch_size", "lr"})
    if per_step:
        raise ConfigError(f"train.{per_step[0]} is set per step by the schedule",
                          hint=f"use --set step0.{per_step[0]}=... and/or --set increment.{per_step[0]}=...")
    train = apply_overrides(TrainConfig(checkpoint_every=schedule.checkpoint_every,
                                        backbone_multiplier=schedule.backbone_multiplier), ov.get("train", {}), "train")
    aug = apply_overrides(AugConfig(**dict(schedule.augmentation)), ov.get("data", {}) and {k: v for k, v in ov["data"].items()
                                                              if k in AugConfig.__dataclass_fields__}, "data")
    loader = apply_overrides(LoaderConfig(), {k: v for k, v in ov.get("data", {}).items()
                                             if k not in AugConfig.__dataclass_fields__}, "data")
    synth = apply_overrides(synth_spec(protocol), ov.get("synth", {}), "synth")
    from benchmark.engine.criterion import SetCriterion

    criterion = apply_overrides(SetCriterion(num_points=preset.train_num_points), ov.get("loss", {}), "loss")
    from benchmark.tasks import get_task

    task = get_task(protocol.task)
    if ov.get("eval") and task.eval_options is None:
        raise ConfigError(f"--set eval.{next(iter(ov['eval']))}: the evaluation of {protocol.name} ({task.name} "
                          "task) has no options", hint="drop the eval.* overrides for this protocol")
    eval_options = task.resolve_eval_options({**method.eval_defaults(task.name), **ov.get("eval", {})})
    train_protocol = protocol.as_joint() if method.joint else protocol
    config = {"loss": to_jsonable(criterion),
        "engine": spec.engine, "schedule": schedule.to_dict(), "model": to_jsonable(preset),
        "train": to_jsonable(train), "data": {"aug": to_jsonable(aug), "loader": to_jsonable(loader)},
        "method_hparams": method.hparams.to_dict(), "backbone_weights": backbone_weights,
    }
    if eval_options is not None:
        config["eval"] = to_jsonable(eval_options)
    if protocol.dataset.startswith("synth"):
        from benchmark.data.synth import GENERATOR_VERSION

        # The generator's version names the dataset folder; in the config it also keys the shared step 0 and makes
        # an old results folder refuse to resume (unless --overwrite) once the images or the catalogue change.
        config["synth"] = to_jsonable(synth.to_config()) | {"generator_version": GENERATOR_VERSION}
    else:
        config["data_root"] = str(Path(spec.data_root).resolve())
    return Resolved(spec, protocol, train_protocol, method, schedule, preset, train, aug, loader, synth,
                    criterion, json.loads(json.dumps(config)), eval_options)


def step_train_config(train, sched):
    """The optimiser settings of one step: the run's ``TrainConfig`` with the step's iterations, batch and lr, and
    its backbone multiplier and warm-up where the step sets them (``--set increment.backbone_multiplier=0.1``:
    Mask2Former's 0.1 for the increments of a from-scratch CPU schedule, whose step 0 trains the backbone at 1.0;
    ``--set increment.warmup_iters=50 increment.warmup_factor=0.001``: a warm-up after each optimiser restart)."""
    own = {name: getattr(sched, name) for name in ("backbone_multiplier", "warmup_iters", "warmup_factor")
           if getattr(sched, name) is not None}
    return dataclasses.replace(train, iterations=sched.iterations, batch_size=sched.batch_size, lr=sched.lr, **own)


def synth_spec(protocol):
    """The synthetic dataset a protocol reads: K classes; synth-pan's K // 5 of them stuff."""
    from benchmark.data import SynthSpec
    from protocols.synthetic import default_stuff_classes

    if not protocol.dataset.startswith("synth"):
        return SynthSpec()
    k = protocol.num_dataset_classes
    return SynthSpec(num_classes=k, stuff_classes=default_stuff_classes(k) if protocol.dataset == "synth-pan" else 0)


# ---- datasets -------------------------------------------------------------------------------------
def open_split(r: Resolved, split: str):
    from benchmark.data import open_dataset

    if r.protocol.dataset.startswith("synth"):
        return open_dataset(r.protocol.dataset, None, split, spec=r.synth, progress=False)
    return open_dataset(r.protocol.dataset, r.spec.data_root, split)


# ---- plan (dry run) -------------------------------------------------------------------------------
def describe_plan(specs: Sequence[RunSpec]) -> str:
    from benchmark.data import step_indices
    from tabulate import tabulate

    lines = []
    seen_protocols = {}
    for spec in specs:
        r = resolve(spec)
        lines.append(f"run {spec.run_dir(r.protocol.name)}  (engine {spec.engine}, schedule {spec.schedule}, "
                     f"device {spec.device})")
        key = (r.train_protocol.name, spec.data_root)
        if key in seen_protocols:
            continue
        try:
            train_ds = open_split(r, "train")
            counts = [len(step_indices(train_ds, r.train_protocol, t)) for t in range(r.train_protocol.num_steps)]
        except UserError as err:
            counts = [f"n/a ({err.message.splitlines()[0]})"] * r.train_protocol.num_steps
        rows = []
        for t, classes in enumerate(r.train_protocol.steps):
            sched = r.schedule.for_step(t, joint=r.method.joint)
            shown = ", ".join(map(str, classes)) if len(classes) <= 12 else \
                f"{', '.join(map(str, classes[:6]))}, ... ({len(classes)} classes)"
            rows.append((t, len(classes), shown, counts[t], sched.iterations, sched.batch_size, sched.lr))
        seen_protocols[key] = tabulate(rows, headers=["step", "#new", "classes", "train images", "iters",
                                                     "batch", "lr"])
        lines.append(f"\nprotocol {r.train_protocol.name} ({r.protocol.dataset}, {r.protocol.task}, "
                     f"{r.protocol.mode}):\n" + seen_protocols[key] + "\n")
    return "\n".join(lines)


# ---- one run ----------------------------------------------------------------------------------------
def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "numpy", "pycocotools", "cisdq-bench"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _check_recorded_config(store, r: Resolved) -> None:
    """Refuse to mix results of different configurations in one run folder."""
    recorded = store.read_run_json()
    if recorded is None:
        return
    same = (recorded.get("config") == r.config and recorded.get("protocol_fingerprint") == r.protocol.fingerprint)
    if same:
        return
    if not r.spec.overwrite:
        diff = sorted(k for k in set(recorded.get("config", {})) | set(r.config)
                      if recorded.get("config", {}).get(k) != r.config.get(k))
        raise ConfigError(
            f"{store.run_dir} holds a run with a different configuration (differs in: {', '.join(diff) or 'protocol'})",
            hint="use another --out folder, or --overwrite to delete that run and start again")
    log.warning("--overwrite: deleting %s (recorded configuration differs)", store.run_dir)
    shutil.rmtree(store.run_dir)


def shares_step0(r: Resolved) -> bool:
    """Whether step 0 of this run comes from the content-addressed cache ``<out>/_step0/<key>``.

    The standard step 0 of the methods that share it, and joint training: its single step is the same
    training for every protocol with the same classes, order and seed (``Protocol.as_joint`` gives
    synth-10-5 and synth-10-2 one fingerprint), so a grid over several splits trains it once. A method with its
    own step 0 (``Method.own_step0_recipe``, ECLIPSE's sigmoid classifier) is cached under its own key.
    """
    return r.method.joint or r.method.shares_standard_step0 or r.method.own_step0_recipe is not None


def _step0_key(r: Resolved) -> str:
    """Content key of a shared step 0: trained protocol, seed, configuration and the model's initial query layout.

    The layout is part of the key because a method that shares the standard step 0 may size its model
    itself (CisDQ: one query per base class): it shares the cached model only when that is the same model.
    Only the schedule row of step 0 (the joint row for joint training) is part of the key, and of an overlap
    split only its step 0 and its classes.
    """
    layout = [list(group) for group in r.method.initial_layout(r.train_protocol, r.preset)]
    schedule = vars(r.schedule.for_step(0, joint=r.method.joint))
    protocol = r.train_protocol
    split = protocol.fingerprint
    if not r.method.joint and protocol.mode == "overlap":
        # In overlap mode step 0 trains on the images of its own classes whatever comes later, and is
        # evaluated on every class: splits with the same step 0 (synth-10-5 and synth-10-2, ade-100-50/-10/-5)
        # share its model. Disjoint selection depends on the later steps, so there the whole split counts.
        split = {"dataset": protocol.dataset, "task": protocol.task, "mode": protocol.mode,
                 "step0": list(protocol.steps[0]), "classes": list(protocol.all_classes)}
    key = {"protocol": split, "joint": bool(r.method.joint), "seed": r.spec.seed,
           "config": {k: v for k, v in r.config.items() if k not in ("method_hparams",)}
           | {"schedule": schedule}, "dataset": r.protocol.dataset, "layout": layout}
    if not (r.method.joint or r.method.shares_standard_step0):
        # the recipe and its hyper-parameters decide this step 0 (absent from the standard keys, which stay as they were)
        key["recipe"] = [r.method.own_step0_recipe, r.method.step0_hparams()]
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _log_to(path: Path, enabled: bool):
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


class StepRunner:
    """Trains and evaluates the steps of one resolved run (the engine does the work)."""

    def __init__(self, r: Resolved, show_progress: bool = True, preemption=None):
        from benchmark.engine.device import DistributedContext

        self.r = r
        # a PreemptionSignal (SLURM jobs): training and writing results stop at safe points only
        self.preemption = preemption
        self.tracker = None              # benchmark.tracking (rank 0 only), set by run_one
        # under torchrun every rank binds its own GPU (local rank); without it this is resolve_device.
        self.dist = DistributedContext.from_env(r.spec.device)
        self.device = self.dist.device(r.spec.device)
        self.show_progress = show_progress and self.dist.is_main
        self._train_ds = None
        self._val_ds = None

    def iteration_offset(self, t: int) -> int:
        """Iterations of the steps before ``t``: the tracker's global x axis."""
        return sum(self.r.step_iterations[:t])

    def track_step_metrics(self, run_dir: Path, t: int) -> None:
        if self.tracker is not None:
            from benchmark.tracking import step_metric_values

            self.tracker.log(step_metric_values(run_dir, t), self.iteration_offset(t + 1))

    def safe_points(self):
        """A block in which a stop signal waits for the next safe point (training, writing results)."""
        return self.preemption.deferred() if self.preemption else contextlib.nullcontext()

    def stop_if_requested(self, where: str) -> None:
        from benchmark.engine.preemption import Preempted

        if self.preemption and self.preemption.requested:
            raise Preempted(f"stopped after {where}")

    # datasets are opened lazily: a resumed run whose steps are all done opens nothing.
    @property
    def train_ds(self):
        if self._train_ds is None:
            self._train_ds = open_split(self.r, "train")
        return self._train_ds

    @property
    def val_ds(self):
        if self._val_ds is None:
            self._val_ds = open_split(self.r, "val")
        return self._val_ds

    def initial_model(self):
        from benchmark.engine.model import build_model

        proto = self.r.train_protocol
        layout = self.r.method.initial_layout(proto, self.r.preset)
        model = build_model(self.r.preset, layout, options=self.r.method.model_options())
        weights = self.r.config["backbone_weights"]       # a path: names are resolved in resolve()
        if weights:
            from benchmark.engine.backbone_weights import load_backbone_weights

            load_backbone_weights(model, weights)
        return model

    def load_model(self, weights_path: Path):
        from benchmark.engine.checkpoint import load_weights
        from benchmark.engine.model import build_model

        layout, state = load_weights(weights_path)
        model = build_model(self.r.preset, layout, options=self.r.method.model_options())
        model.load_state_dict(state)
        return model

    def train_step(self, t: int, prev_weights: Path | None, work_dir: Path):
        """Train step t in ``work_dir`` (resuming its in-step checkpoint); returns the trained model."""
        from dataclasses import replace as dc_replace

        from benchmark.data import TrainLoader, TrainView, single_pass
        from benchmark.engine.device import plan_batches, seed_everything
        from benchmark.engine.trainer import train_step_loop
        from methods.base import StepContext

        r, proto = self.r, self.r.train_protocol
        sched = r.schedule.for_step(t, joint=r.method.joint)
        seed_everything(r.spec.seed * 1000 + t)
        model = self.initial_model() if prev_weights is None else self.load_model(prev_weights)
        model.to(self.device)
        old_model = None
        if t > 0 and r.method.needs_old_model:
            old_model = model.frozen_copy()
        criterion = r.criterion
        view = TrainView(self.train_ds, proto, t, dc_replace(r.aug, crop_size=sched.crop_size))
        if t > 0 and r.method.replay_size() > 0:
            from benchmark.data.views import ConcatView, ReplayView

            entries = self.replay_memory(t, r.method.replay_size(), work_dir)
            view = ConcatView(view, ReplayView(self.train_ds, proto, entries, view.aug))
        cfg = step_train_config(r.train, sched)
        per_rank = plan_batches(cfg.batch_size, self.dist.world_size, cfg.max_device_batch).micro_batch

        data_seed = r.spec.seed * 1000 + t

        def iterate_train():
            """One ordered pass over the step's training images (for old-model statistics)."""
            return single_pass(view, batch_size=per_rank, seed=data_seed, workers=r.loader.workers)

        ctx = StepContext(protocol=proto, step=t, num_old=len(proto.old(t)), num_seen=len(proto.seen(t)),
                          task=proto.task, criterion=criterion, device=self.device, old_model=old_model,
                          iterate_train=iterate_train, iterations=sched.iterations)
        r.method.configure_model(model, ctx)
        if t > 0 and r.preset.freeze_backbone_norm_after_step0 and not r.method.joint:
            model.freeze_backbone_norm()
        model.to(self.device)
        r.method.before_step(ctx)
        loader = TrainLoader(view, batch_size=per_rank, seed=data_seed, workers=r.loader.workers,
                             rank=self.dist.rank, world_size=self.dist.world_size)
        fingerprint = hashlib.sha256(json.dumps([r.config, r.protocol.fingerprint, r.spec.seed],
                                                sort_keys=True).encode()).hexdigest()
        with self.safe_points():
            stats = train_step_loop(model, r.method, ctx, loader, cfg,
                                    checkpoint_path=work_dir / f"step_{t:02d}.inprogress.pt",
                                    device=self.device, dist=self.dist, progress=self.show_progress,
                                    fingerprint=fingerprint, desc=f"{r.spec.method} step {t}/{proto.num_steps - 1}",
                                    stop=self.preemption and (lambda: self.preemption.requested),
                                    on_iteration=self._iteration_hook(t))
        loader.close()
        r.method.after_step(ctx)
        return model, stats

    def replay_memory(self, t: int, size: int, work_dir: Path) -> list[tuple[int, int]]:
        """Step t's replay memory (benchmark.data.replay): read back from ``replay_step_XX.json`` when a previous
        attempt wrote it (the memory is part of the run's resumable state), else selected and written there."""
        from benchmark.data.replay import class_proportional_memory
        from benchmark.store import atomic_write

        path = work_dir / f"replay_step_{t:02d}.json"
        if path.is_file():
            return [(int(i), int(s)) for i, s in json.loads(path.read_text())["entries"]]
        entries = class_proportional_memory(self.train_ds, self.r.train_protocol, t, size)
        if self.dist.is_main:
            record = {"step": t, "size": size, "entries": [list(e) for e in entries],
                      "image_ids": [str(self.train_ds.image_id(i)) for i, _ in entries]}
            atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
        log.info("step %d replays %d images (class-proportional memory of %d)", t, len(entries), size)
        return entries

    def _iteration_hook(self, t: int):
        if self.tracker is None:
            return None
        from benchmark.tracking import iteration_values

        offset = self.iteration_offset(t)
        return lambda done, row: self.tracker.log(iteration_values(row, t), offset + done)

    def evaluate(self, model, t: int):
        from benchmark.data import EvalView, eval_loader
        from benchmark.engine.evaluate import evaluate

        sched = self.r.schedule.for_step(t, joint=self.r.method.joint)
        # evaluate() shards the loader over DDP ranks itself.
        loader = eval_loader(EvalView(self.val_ds, sched.eval_size), workers=self.r.loader.evaluation_workers)
        return evaluate(model, loader, self.r.train_protocol, t, self.device, self.r.protocol.task,
                        mask_mode=self.r.criterion.mask_mode, options=self.r.eval_options, progress=self.show_progress,
                        score_threshold=getattr(self.r.method, "instance_score_threshold", 0.0),
                        class_scores=self.r.method.class_scores)

    def write_step(self, store, t: int, model, result, seconds: float, stats=None) -> None:
        """Store step ``t``; its DONE record holds the seconds (training + evaluation) and, for a step trained
        here, its cost (:func:`benchmark.engine.trainer.step_cost`; a shared step 0's is in the cache's run)."""
        from benchmark.engine.checkpoint import save_weights
        from benchmark.tasks import get_task

        r = self.r
        tmp = store.run_dir / f".weights_{t:02d}.pt"
        save_weights(model, tmp)
        get_task(r.protocol.task).store_step(store, t, result, val_ds=self.val_ds, weights_path=tmp,
                                             ident=dict(method=r.spec.method, protocol=r.protocol, seed=r.spec.seed),
                                             extra={"seconds": seconds, **_cost_record(stats)})


def _cost_record(stats) -> dict:
    if stats is None or not stats.cost:
        return {}
    reused = getattr(stats, "reused_from", None)
    return {"cost": dict(stats.cost, **({"reused_from": reused} if reused else {}))}


# A CPU run computes with one torch thread, however it is launched (alone, in a joblib grid, under submitit):
# floating-point reductions depend on the thread count, and before this rule the same run gave different
# numbers alone (torch's default, one thread per core) and in a grid (one per run): MiB synth-10-5 seed 0,
# step-0 base mIoU 92.86 alone against 93.25 in the grid, final base 4.9 against 2.0 (2026-12-07, AVX-512
# EPYC). A second thread speeds the tiny model up by about 10 % (benchmark.parallel.default_jobs); --jobs auto
# puts one run on every core instead.
CPU_THREADS = 1


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_one(spec: RunSpec, show_progress: bool = True, preemption=None) -> Path:
    """Run (or resume) every step of one (method, protocol, seed); returns the run folder.

    ``preemption``: a :class:`~benchmark.engine.preemption.PreemptionSignal` (SLURM jobs); its signal stops
    the run at the next safe point by raising ``Preempted`` (the job then requeues itself and resumes).
    ``spec.track``: the experiment tracker rank 0 writes to (benchmark.tracking).
    """
    from benchmark.store import RunStore

    r = resolve(spec)
    run_dir = spec.run_dir(r.protocol.name)
    store = RunStore(run_dir)
    runner = StepRunner(r, show_progress=show_progress, preemption=preemption)
    is_main = runner.dist.is_main
    with contextlib.ExitStack() as stack:
        if runner.device.type == "cpu":
            stack.enter_context(_torch_threads(CPU_THREADS))
            # Freed tensor memory stays in the process (same numbers, fewer page faults); process-wide and
            # one-way, so not undone after the run.
            from benchmark.engine.host_memory import retain_freed_memory

            retain_freed_memory()
        if is_main and spec.track != "none":
            from benchmark.tracking import make_tracker

            runner.tracker = make_tracker(spec.track, run_dir, f"{r.protocol.name}/{spec.method}/seed{spec.seed}",
                                          r.config)
            stack.callback(runner.tracker.close)
        return _run_steps(spec, r, run_dir, store, runner)


def _run_steps(spec: RunSpec, r: Resolved, run_dir: Path, store, runner: "StepRunner") -> Path:
    import torch

    from benchmark.tasks import get_task

    is_main = runner.dist.is_main
    if is_main:
        _check_recorded_config(store, r)
    runner.dist.barrier()
    header = {
        "method": spec.method, "protocol": r.protocol.name, "seed": spec.seed, "config": r.config,
        "protocol_name": r.protocol.name, "protocol_fingerprint": r.protocol.fingerprint,
        "protocol_definition": r.protocol.to_dict(), "trained_protocol": r.train_protocol.name,
        "versions": _versions(), "git_revision": _git_revision(), "device": str(runner.device),
        "world_size": runner.dist.world_size, "host": socket.gethostname(), "torch_threads": torch.get_num_threads(),
    }
    recorded = store.read_run_json() or {}
    timings = dict(recorded.get("timings", {}))
    costs = dict(recorded.get("costs", {}))       # each step's cost record, as in its DONE marker
    with _log_to(run_dir / "log.txt", enabled=is_main):
        log.info("run %s: %s on %s, seed %d", run_dir, spec.method, r.protocol.name, spec.seed)
        prev_weights: Path | None = None
        for t in range(r.train_protocol.num_steps):
            if store.is_done(t):
                log.info("step %d already done: skipped", t)
                prev_weights = store.weights_path(t)
                continue
            if is_main:
                header.update(get_task(r.protocol.task).run_header(runner.val_ds))
            if is_main:
                store.write_run_json(header | {"timings": timings, "costs": costs})
            start = time.time()
            stats = None
            if t == 0 and shares_step0(r):
                model, result, stats = _shared_step0(runner)
            else:
                model, stats = runner.train_step(t, prev_weights, run_dir)
                log.info("step %d trained: %s", t, stats.summary())
                result = runner.evaluate(model, t)
            seconds = time.time() - start
            timings[f"step_{t:02d}"] = round(seconds, 2)
            if record := _cost_record(stats):
                costs[f"step_{t:02d}"] = record["cost"]
            if is_main:
                with runner.safe_points():
                    runner.write_step(store, t, model, result, seconds, stats)
                    store.write_run_json(header | {"timings": timings, "costs": costs})
                    (run_dir / f"step_{t:02d}.inprogress.pt").unlink(missing_ok=True)
                runner.track_step_metrics(run_dir, t)
            runner.dist.barrier()
            prev_weights = store.weights_path(t)
            runner.stop_if_requested(f"step {t}")
    return run_dir


def _shared_step0(runner: StepRunner):
    """Step 0 from the content-addressed cache, training it there first if needed."""
    from benchmark.tasks import get_task
    from benchmark.store import RunStore

    r = runner.r
    cache = RunStore(Path(r.spec.out) / "_step0" / _step0_key(r))
    # Under torchrun only rank 0 takes the file lock (the other ranks of the run wait for it in the collective
    # below, and train with it): a lock per rank would block rank 1 while rank 0 waits for it in DDP.
    lock = _file_lock(cache.run_dir / ".lock") if runner.dist.is_main else contextlib.nullcontext()
    with lock:
        if not runner.dist.all_gather_object(cache.is_done(0))[0]:       # rank 0 decides for the run
            log.info("training the shared step 0 in %s", cache.run_dir)
            if runner.dist.is_main:
                cache.write_run_json({"method": "joint-cache" if r.method.joint else
                                      "-".join(filter(None, [r.method.own_step0_recipe, "step0-cache"])),
                                      "protocol": r.protocol.name, "seed": r.spec.seed,
                                      "config": r.config})
            model, stats = runner.train_step(0, None, cache.run_dir)
            result = runner.evaluate(model, 0)
            if runner.dist.is_main:
                with runner.safe_points():
                    runner.write_step(cache, 0, model, result, 0.0, stats)
                    (cache.run_dir / "step_00.inprogress.pt").unlink(missing_ok=True)
            runner.dist.barrier()
            return model, result, _SharedCost(stats.cost, None)
        log.info("step 0 reused from %s", cache.run_dir)
        model = runner.load_model(cache.weights_path(0)).to(runner.device)
        result = get_task(r.protocol.task).stored_result(cache, 0)
        return model, result, _SharedCost(cache.done_record(0).get("cost", {}), str(cache.run_dir))


@dataclass(frozen=True)
class _SharedCost:
    """The shared step 0's cost, recorded in each run that uses it (``reused_from``: the cache folder when the
    run did not train it itself, so a cost table does not count the training twice)."""

    cost: dict
    reused_from: str | None


def run_sequence(specs: Sequence[RunSpec]) -> list[Path]:
    """Runs one after another, with the grid's progress in iterations (benchmark.progress)."""
    from benchmark.progress import GridProgress, plan_units

    if int(os.environ.get("RANK", "0")) != 0:      # torchrun: rank 0 shows the progress
        return [run_one(spec, show_progress=True) for spec in specs]
    out = []
    with GridProgress(plan_units(specs), extra=lambda: f"{len(out)}/{len(specs)} runs finished"):
        for spec in specs:
            out.append(run_one(spec, show_progress=True))
    return out


def print_final_summary(out: Path, specs: Sequence[RunSpec]) -> None:
    """The final-step base/novel/all table of the runs just made, in the terminal."""
    from benchmark.report import final_table

    print()
    print(final_table(out, protocols=sorted({get_protocol_name(s) for s in specs})))


def get_protocol_name(spec: RunSpec) -> str:
    from protocols import get_protocol

    return get_protocol(spec.protocol).name
