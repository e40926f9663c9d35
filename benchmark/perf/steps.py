"""The training steps the benchmark times, built with the runner's own functions.

A :class:`StepCase` is one method at one continual step, set up as ``StepRunner.train_step`` sets it up
(resolved configuration, model at the previous step's weights, frozen old model, ``configure_model``,
``before_step``) and run through the engine's real training loop (:func:`train_step_loop`) on one
pre-built device batch. :class:`StockStep` is the same batch through transformers'
``Mask2FormerForUniversalSegmentation`` with its own loss, the same optimiser, clipping and AMP.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from benchmark.batch import Batch
from benchmark.errors import ConfigError
from benchmark.perf.settings import PerfSettings
from benchmark.perf.timing import RepeatLoader, synchronize

if TYPE_CHECKING:  # pragma: no cover - typing only
    from benchmark.engine.model import SegModel

STOCK_HEAD_PREFIX = "class_predictor."
ENGINE_HEAD_PREFIX = "class_heads.0."


def stock_name(engine_name: str) -> str:
    """The transformers name of an engine parameter (group 0's head is the stock ``class_predictor``)."""
    if engine_name.startswith(ENGINE_HEAD_PREFIX):
        return STOCK_HEAD_PREFIX + engine_name[len(ENGINE_HEAD_PREFIX):]
    return engine_name


def resolve_method(settings: PerfSettings, method: str, device: str):
    """The runner's resolved configuration of ``method`` under these settings (``runner.Resolved``)."""
    from benchmark.runner import RunSpec, resolve

    return resolve(RunSpec(method=method, protocol=settings.protocol, seed=settings.seed, engine=settings.engine,
                           schedule=settings.schedule, device=device, overrides=settings.run_overrides()))


def step_runner(resolved):
    """The runner of one resolved run, on the run's device, without progress bars."""
    from benchmark.runner import StepRunner

    return StepRunner(resolved, show_progress=False)


def train_step0(runner, work_dir: Path) -> SegModel:
    """Step 0 of the runner's method, trained as the benchmark trains it (the old model of step 1)."""
    model, _ = runner.train_step(0, None, work_dir)
    return model


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (``state_dict()`` aliases the live parameters)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@dataclass
class StepCase:
    """One method's training step at one continual step, ready to be timed through the trainer."""

    name: str
    model: SegModel
    method: Any
    ctx: Any
    cfg: Any
    batch: Batch
    device: torch.device
    initial_state: dict[str, torch.Tensor]

    @property
    def images(self) -> int:
        return len(self.batch)

    def run(self, iterations: int) -> list[float]:
        """``iterations`` trainer iterations from the initial weights; the clock stamps of each iteration."""
        from benchmark.engine.trainer import train_step_loop

        self.model.load_state_dict(self.initial_state)
        loader = RepeatLoader(self.batch, self.device)
        cfg = replace(self.cfg, iterations=iterations, log_every=iterations, checkpoint_every=0)
        train_step_loop(self.model, self.method, self.ctx, loader, cfg, checkpoint_path=None, device=self.device,
                        progress=False)
        return loader.stamps


@dataclass(frozen=True)
class StepData:
    """A step's training view and how the runner batches it (one process)."""

    view: Any
    micro_batch: int
    seed: int


def step_data(resolved, runner, step: int) -> StepData:
    """The step's ``TrainView``, micro-batch and data seed, as ``StepRunner.train_step`` builds them."""
    from benchmark.data import TrainView
    from benchmark.engine.device import plan_batches

    r = resolved
    sched = r.schedule.for_step(step, joint=r.method.joint)
    view = TrainView(runner.train_ds, r.train_protocol, step, replace(r.aug, crop_size=sched.crop_size))
    micro_batch = plan_batches(sched.batch_size, 1, r.train.max_device_batch).micro_batch
    return StepData(view, micro_batch, r.spec.seed * 1000 + step)


def build_step_case(name: str, resolved, runner, step: int, model: SegModel, *, plop_batches: int) -> StepCase:
    """``StepRunner.train_step``'s set-up of ``step`` from ``model`` (the previous step's weights, or the
    initial model at step 0), without training; the batch is the step's first training batch."""
    from benchmark.data import TrainLoader, single_pass
    from benchmark.engine.device import seed_everything
    from benchmark.engine.trainer import freeze_old_model
    from methods.base import StepContext

    r, proto, device = resolved, resolved.train_protocol, runner.device
    sched = r.schedule.for_step(step, joint=r.method.joint)
    seed_everything(r.spec.seed * 1000 + step)
    model = copy.deepcopy(model).to(device)
    old_model = freeze_old_model(model, device) if step > 0 and r.method.needs_old_model else None
    data = step_data(resolved, runner, step)
    view, micro_batch, data_seed = data.view, data.micro_batch, data.seed
    cfg = replace(r.train, iterations=sched.iterations, batch_size=sched.batch_size, lr=sched.lr)

    def iterate_train():
        """The first batches of the step's single pass (PLOP's thresholds; not timed)."""
        return itertools.islice(single_pass(view, batch_size=micro_batch, seed=data_seed, workers=0), plop_batches)

    ctx = StepContext(protocol=proto, step=step, num_old=len(proto.old(step)), num_seen=len(proto.seen(step)),
                      task=proto.task, criterion=r.criterion, device=device, old_model=old_model,
                      iterate_train=iterate_train, iterations=sched.iterations)
    r.method.configure_model(model, ctx)
    model.to(device)
    r.method.before_step(ctx)
    # The loader's batches do not depend on its workers: the in-process first batch is the trained one.
    batch = next(TrainLoader(view, batch_size=micro_batch, seed=data_seed, workers=0)).to(device)
    return StepCase(name, model, r.method, ctx, cfg, batch, device, copy_state(model))


class StockStep:
    """transformers' ``Mask2FormerForUniversalSegmentation`` training step on a :class:`StepCase`'s batch.

    Same weights (the engine model's, mapped back to the stock names), same loss settings (points,
    weights, no-object weight, importance sampling), same AdamW parameter groups, poly schedule,
    gradient clipping and AMP as the trainer; the loss is the stock model's own (``forward`` with
    ``mask_labels`` / ``class_labels``). Masks are handed over as float, as the stock API expects.
    """

    def __init__(self, case: StepCase):
        from transformers import Mask2FormerForUniversalSegmentation

        from benchmark.engine.presets import quiet_backbone_warning

        model, criterion = case.model, case.ctx.criterion
        if model.num_groups != 1:
            raise ConfigError("the transformers comparison needs a single-group model (the standard engine step)")
        if criterion.mask_mode != "sigmoid":
            raise ConfigError(f"the transformers comparison needs the standard loss, got loss.mask_mode="
                              f"{criterion.mask_mode}", hint="drop --set loss.mask_mode=... for the perf run")
        (num_queries, num_classes), = model.layout
        config = model.preset.mask2former_config(num_queries=num_queries, num_labels=num_classes)
        # The identical loss: the engine criterion's settings, the number of sampled points included.
        config.train_num_points = criterion.num_points
        config.oversample_ratio = criterion.oversample_ratio
        config.importance_sample_ratio = criterion.importance_sample_ratio
        config.no_object_weight = criterion.no_object_weight
        config.class_weight = criterion.class_weight
        config.mask_weight = criterion.mask_weight
        config.dice_weight = criterion.dice_weight
        with quiet_backbone_warning():
            self.stock = Mask2FormerForUniversalSegmentation(config)
        stock_state = {stock_name(key): value for key, value in case.initial_state.items()}
        missing, unexpected = self.stock.load_state_dict(stock_state, strict=False)
        if unexpected or any(not key.startswith("criterion.") for key in missing):
            raise RuntimeError(f"engine and stock weights do not correspond: missing {missing}, unexpected {unexpected}")
        self.stock.to(case.device).train()
        self.initial_state = copy_state(self.stock)
        self.cfg, self.batch, self.device = case.cfg, case.batch, case.device
        self.images = len(case.batch)
        self.mask_labels = [t.masks.float() for t in case.batch.targets]
        self.class_labels = [t.labels for t in case.batch.targets]
        # The engine model's AdamW groups (backbone lr multiplier, no decay on norms / embeddings), by name,
        # so that the engine model need not be kept alive.
        names = {id(p): stock_name(n) for n, p in model.named_parameters()}
        self.group_names = [({k: v for k, v in group.items() if k != "params"}, [names[id(p)] for p in group["params"]])
                            for group in model.param_groups(self.cfg.lr, self.cfg.weight_decay,
                                                            self.cfg.backbone_multiplier)]

    def _param_groups(self) -> list[dict]:
        stock = dict(self.stock.named_parameters())
        return [{**settings, "params": [stock[name] for name in names]} for settings, names in self.group_names]

    def run(self, iterations: int) -> list[float]:
        """The trainer's iteration (zero_grad, forward + loss, backward, unscale, clip, AdamW, poly step)."""
        from benchmark.engine.device import resolve_amp
        from benchmark.engine.optim import AMP_DTYPES, build_scheduler

        cfg, device = self.cfg, self.device
        self.stock.load_state_dict(self.initial_state)
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=(device.type == "cuda") or None,
                                      foreach=None if device.type == "cuda" else True)   # as build_optimizer
        scheduler = build_scheduler(optimizer, replace(cfg, iterations=iterations))
        amp = resolve_amp(cfg.amp, device)
        amp_dtype = AMP_DTYPES[cfg.amp_dtype]
        scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        batch = self.batch
        stamps = []
        for _ in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            stamps.append(time.perf_counter())
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out = self.stock(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask,
                                 mask_labels=self.mask_labels, class_labels=self.class_labels)
            scaler.scale(out.loss).backward()
            scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            del out
        return stamps
