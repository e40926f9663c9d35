"""Training configuration, AdamW over the model's parameter groups, and the poly learning-rate schedule.

Defaults follow Mask2Former's solver (Cheng et al., CVPR 2022; facebookresearch/Mask2Former
``configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml`` and
``mask2former/config.py``), which CoMFormer and CisDQ inherit unchanged (reference/baselines-original-code.md
section 4, reference/cisdq-original-code.md section 4.1): AdamW, weight decay 0.05 (0 on embeddings,
``WEIGHT_DECAY_EMBED 0.0``, and norms, ``WEIGHT_DECAY_NORM 0.0``), backbone lr x 0.1
(``BACKBONE_MULTIPLIER``), ``WarmupPolyLR`` with power 0.9 and no warm-up (``WARMUP_FACTOR 1.0``,
``WARMUP_ITERS 0``), full-model L2 gradient clipping at 0.01 (``CLIP_TYPE full_model``, ``CLIP_VALUE 0.01``,
``NORM_TYPE 2.0``), AMP on. Iterations, batch size and learning rate come from the schedules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from benchmark.engine.device import AMP_CHOICES
from benchmark.errors import ConfigError

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that change what is computed; the rest (logging, checkpoint cadence) may change on resume.
_BOOKKEEPING_FIELDS = frozenset({"checkpoint_every", "log_every", "find_unused_parameters"})


@dataclass(frozen=True)
class TrainConfig:
    """How one continual step is optimised.

    iterations:          optimisation steps of the step (``SOLVER.MAX_ITER``).
    batch_size:          global batch over all processes (``SOLVER.IMS_PER_BATCH``).
    lr:                  base learning rate (``SOLVER.BASE_LR``); the backbone gets ``lr * backbone_multiplier``.
                         These three default to Mask2Former's ADE20K step-0 solver (160k, 16, 1e-4); the
                         schedules (benchmark/schedules.py) set them per protocol and step.
    weight_decay:        AdamW decay of weights (0.05); embeddings and norms get none (the model's groups).
    backbone_multiplier: 0.1, Mask2Former ``SOLVER.BACKBONE_MULTIPLIER``.
    poly_power:          0.9, detectron2 ``SOLVER.POLY_LR_POWER``: lr = base * (1 - it / iterations) ** 0.9.
    warmup_iters, warmup_factor: detectron2's linear warm-up; Mask2Former uses none (0 iterations, factor 1).
    grad_clip:           max L2 norm of the gradient of the whole model (0.01); 0 disables clipping.
    max_device_batch:    largest micro-batch one device may hold; a larger per-process batch is split and
                         the gradients accumulated, so the global batch never changes. None = no limit.
    amp:                 ``auto`` (on with CUDA, as the paper configs), ``on`` or ``off``.
    amp_dtype:           ``float16`` (detectron2's AMP, with a GradScaler) or ``bfloat16`` (no scaler needed).
    checkpoint_every:    write the resumable in-step checkpoint every this many iterations; 0 = only at the end.
    log_every:           iterations between loss log rows (and the only points where the loop synchronises
                         with the device to read the loss); detectron2 logs every 20.
    find_unused_parameters: DDP only. Off, as Mask2Former's ``create_ddp_model(model, broadcast_buffers=False)``:
                         every trainable parameter of the engine's model takes part in each forward, and the
                         per-iteration graph search the flag costs is saved. Turn it on for a model or method
                         whose forward leaves some trainable parameters unused (DDP's error says so).
    """

    iterations: int = 160_000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_multiplier: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    grad_clip: float = 0.01
    max_device_batch: int | None = None
    amp: str = "auto"
    amp_dtype: str = "float16"
    checkpoint_every: int = 1000
    log_every: int = 20
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.iterations < 1:
            problems.append(f"iterations must be at least 1, got {self.iterations}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        for name in ("weight_decay", "backbone_multiplier", "poly_power", "grad_clip"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.warmup_iters < 0 or not 0 < self.warmup_factor <= 1:
            problems.append(f"warm-up needs warmup_iters >= 0 and 0 < warmup_factor <= 1, "
                            f"got {self.warmup_iters} and {self.warmup_factor}")
        if self.max_device_batch is not None and self.max_device_batch < 1:
            problems.append(f"max_device_batch must be at least 1 (or None), got {self.max_device_batch}")
        if self.amp not in AMP_CHOICES:
            problems.append(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.amp_dtype not in AMP_DTYPES:
            problems.append(f"amp_dtype must be one of {tuple(AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            problems.append(f"checkpoint_every must be >= 0 and log_every >= 1, "
                            f"got {self.checkpoint_every} and {self.log_every}")
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems),
                              hint="fix the schedule or the --set overrides of the train.* keys")

    def result_settings(self) -> dict:
        """The settings that determine the trained weights (what a resume must match)."""
        return {k: v for k, v in asdict(self).items() if k not in _BOOKKEEPING_FIELDS}


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups(lr, weight_decay, backbone_multiplier)``.

    The model decides the groups (backbone lr multiplier, no decay on embeddings and norms); frozen
    parameters are left out. Every trainable parameter must be in exactly one group: a parameter the
    optimiser silently ignored would look trained and never move. ``fused`` (the trainer asks for it on
    CUDA) uses torch's single-kernel AdamW, numerically the same update up to rounding.

    Otherwise the multi-tensor (``foreach``) implementation, also on the CPU where torch would pick the
    per-tensor loop: that loop was 12 % of the tiny preset's training step in the perf profile (19.5 ms
    of AdamW per iteration over 146 tensors, 1 thread); foreach takes 9.3 ms. The fused CPU kernel
    (3.4 ms) was not taken: with it, a run killed mid-step and resumed no longer gave bit-identical
    metrics (tests/test_runner.py), which foreach keeps.
    """
    groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.backbone_multiplier)
    kept, seen = [], set()
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError("model.param_groups() lists a parameter in more than one group")
            seen.add(id(p))
        if params:
            kept.append({**group, "params": params})
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"model.param_groups() leaves trainable parameters out of the optimiser: {missing[:10]}")
    if not kept:
        raise ConfigError("the model has no trainable parameters",
                          hint="the method froze everything in configure_model; unfreeze at least the head")
    return torch.optim.AdamW(kept, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None,
                             foreach=None if fused else True)


@dataclass(frozen=True)
class PolySchedule:
    """detectron2's ``WarmupPolyLR`` factor: ``warmup(it) * (1 - it / iterations) ** power``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` stores it with the checkpoint.
    """

    iterations: int
    power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 1.0

    def __call__(self, iteration: int) -> float:
        warmup = 1.0
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            warmup = self.warmup_factor * (1 - alpha) + alpha
        return warmup * max(0.0, 1.0 - iteration / self.iterations) ** self.power


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly decay to 0 at ``cfg.iterations``, stepped once per iteration after the optimiser step, so
    iteration ``i`` (0-based) trains with ``lr * (1 - i / iterations) ** power`` in every group."""
    schedule = PolySchedule(cfg.iterations, cfg.poly_power, cfg.warmup_iters, cfg.warmup_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
