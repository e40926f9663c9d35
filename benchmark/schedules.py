"""Training schedules as data, each number with its source (methods.md, reference section 4 / 7).

A schedule gives, per protocol, the settings of step 0 and of every later step. ``paper`` is the shared
schedule for the published protocols; ``cisdq-paper``, ``eclipse-paper`` and ``balconpas-paper`` are those
methods' own per-setting tables (their scripts' iterations and learning rates); ``cpu`` is the
embedded default (tiny model, small images) sized so that ``python run_benchmark.py`` finishes in minutes
on two CPU cores.

Decisions where the sources are silent:
  * ADE semantic increments follow CoMFormer's rate of 400 iterations per new class (100-50: 20k,
    100-10: 4k/step, 100-5: 2k/step), so 50-50 gets 20k, 50-20 8k and 50-10 4k per step.
  * A protocol with no published row (e.g. ``voc-12-2``) uses its dataset's default row below.
  * Joint training uses the dataset's published joint/offline row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmark.errors import ConfigError


@dataclass(frozen=True)
class StepSchedule:
    """Optimisation settings of one continual step."""

    iterations: int
    batch_size: int              # global batch (split over DDP ranks, accumulated if needed)
    lr: float
    crop_size: int               # training crop (square)
    eval_size: int               # test-time short side
    # This step's backbone lr multiplier; None = the schedule's (``Schedule.backbone_multiplier``).
    backbone_multiplier: float | None = None
    # This step's linear lr warm-up (detectron2's ``WARMUP_ITERS`` / ``WARMUP_FACTOR``); None = the run's
    # ``train.warmup_iters`` / ``train.warmup_factor`` (Mask2Former: none).
    warmup_iters: int | None = None
    warmup_factor: float | None = None


@dataclass(frozen=True)
class Schedule:
    name: str
    step0: StepSchedule
    increment: StepSchedule
    joint: StepSchedule
    source: str
    checkpoint_every: int = 1000      # in-step checkpoint period (iterations)
    # Backbone lr multiplier: Mask2Former's 0.1 assumes a pretrained backbone; the CPU schedule trains
    # the tiny backbone from scratch, so it gets the full learning rate.
    backbone_multiplier: float = 0.1
    # Training-augmentation defaults of this schedule (AugConfig fields; ``--set data.KEY=...`` still wins).
    # Empty = Mask2Former's recipe; the CPU schedule calibrates it for the synthetic data.
    augmentation: tuple[tuple[str, object], ...] = ()

    def for_step(self, step: int, joint: bool = False) -> StepSchedule:
        if joint:
            return self.joint
        return self.step0 if step == 0 else self.increment

    def to_dict(self) -> dict:
        return {"name": self.name, "step0": vars(self.step0), "increment": vars(self.increment),
                "joint": vars(self.joint), "source": self.source, "checkpoint_every": self.checkpoint_every,
                "backbone_multiplier": self.backbone_multiplier, "augmentation": dict(self.augmentation)}


SCHEDULE_NAMES = ("cpu", "paper", "cisdq-paper", "eclipse-paper", "balconpas-paper")

# ---- the embedded CPU schedule ------------------------------------------------------------------
# Calibrated on the 2-core machine (issues 9 and 13): tiny preset (from scratch), 64 px crops of the synthetic
# images, poly lr from 1e-3 (3e-4 learned nothing in 300 iterations; 2e-3 with a 100-iteration warm-up was
# worse), no scale or colour jitter (the synthetic classes are defined by colour and texture: joint mIoU at
# 900 iterations went 22.4 with Mask2Former's jitter -> 65.7 without).
# Issue 13 (python -m benchmark.calibrate on 3-seed runs; the README's calibration section has the table):
#   * step 0 1200 iterations: the step-0 model's base mIoU is 1.08x joint's (87.7 / 81.4 worst seed) once the
#     semantic inference may leave unknown objects unassigned (engine.inference "segments"); with 900 or 1500
#     the ratio was 1.03 / 1.08, the apparent non-convergence (0.62) was the arg-max inference;
#   * increments 300 iterations at the step-0 lr: fine-tune learns each step's classes as well as joint
#     (ratio 1.00; 100 iterations gave 0.38). A lower increment lr (the papers' 0.5x / 0.1x) kept MiB's base
#     classes (2e-4: MiB base 28.5 vs 2.8) but stopped fine-tune from learning (plasticity 0.71 at 5e-4, 0.19
#     at 2e-4), so the lr stays. Longer increments at the lower rates do not escape the trade (2026-12-07, 3 seeds:
#     5e-4 x 400 it: plasticity 0.81, MiB base 5.1; 3e-4 x 450: 0.62, 8.3; 3e-4 x 300: 0.48, 18.4): MiB's base and
#     fine-tune's learning both follow lr x iterations (README, calibration section);
#   * joint 2000 iterations (it learns twice the classes: 1200 gave 75 mIoU, 2000 gives 84).
#   * the backbone keeps lr x 1.0 in the increments. Mask2Former's 0.1 there (``--set increment.backbone_multiplier=0.1``,
#     synth-10-5, seeds 0-2, 2026-12-06, AMD EPYC AVX2) narrowed PLOP's base spread only (69.7 +- 5.1, novel
#     39.9 +- 5.6; CoMFormer 77.8 +- 2.8 / 40.7 +- 6.2), kept MiB's base at 3.7 and cost fine-tuning new-class
#     mIoU (novel 38.4 +- 1.6 against 42.4): not adopted.
#   * no warm-up in the increments: 50 iterations from 0.001 x lr (``--set increment.warmup_iters=50
#     increment.warmup_factor=0.001``, one shared step 0, seeds 0-2, 2026-12-06) gave CoMFormer 75.2 +- 2.4 / 30.7 +- 3.8
#     (novel 8.6 points lower) and PLOP 74.9 +- 3.5 / 48.8 +- 4.9: the spread moved between columns.
#   * 300 iterations per increment is the time target's choice, not convergence: 600 (batch 8; synth-10-5, seeds
#     0-2, 2026-12-07) raised the distilling methods' novel mIoU by 15-34 points and cut the final stds above 3 from
#     12 to 7 of 18 (1200: CoMFormer 85.8 +- 1.0 / 86.1 +- 3.5), but the default run would take ~13.5 min; 600 at
#     batch 4 (same cost as 300 at batch 8) did not help, nor did the cheaper ways to 600 x 8's samples or step
#     budget (grid loss, 480 validation images, 3 seeds: 300 x batch 16, 1.6x the cost, rms of the stds 3.06; 300 at
#     lr 2e-3, 4.14; 600 x 8: 2.22): the spread falls with the optimiser steps at this rate (README, calibration
#     section). With the grid loss and 480 validation images as well, the rms of the 24 final stds fell to 2.52
#     (4.46), but the default run took 724.6 s against 462.8 s (2026-12-07): the candidate once the CPU path is
#     ~25 % faster (a smaller decoder, -20 % per iteration, lost joint's level: 69.6 +- 5.6 all). Over 3 seeds it
#     brings synth-pan-10-5 to a largest std of 5.3 (7.7) but leaves synth-10-2 at 11.2 (13.2) and, with seeds 3-5,
#     synth-10-10 at 9.9 (README). Denser images (``SynthSpec.min_things``) narrowed the semantic spread at no cost
#     in time on synth-10-5 / 10-2 with seeds 0-2, not on synth-15-5 / 10-10 with seeds 3-5 (2026-12-08).
# One iteration takes ~0.08 s on one core (AMD EPYC, 1 thread), and the default run places one run per core
# (benchmark.parallel.default_jobs).
_CPU = StepSchedule(iterations=1200, batch_size=8, lr=1e-3, crop_size=64, eval_size=64)
CPU_SCHEDULE = dict(step0=_CPU, increment=replace(_CPU, iterations=300), joint=replace(_CPU, iterations=2000),
                    source="embedded CPU default, calibrated on 2 CPU cores (issues 9, 13)", checkpoint_every=50,
                    backbone_multiplier=1.0,
                    augmentation=(("color_jitter", False), ("scale_range", (1.0, 1.0))))

# ---- published rows ------------------------------------------------------------------------------
# ADE20K semantic: CoMFormer (CVPR 2023) configs/ade20k/semantic-segmentation/*.yaml and scripts/ade.sh:
# step 0 160k it, batch 16, lr 1e-4, crop 512; increments lr 5e-5 (AdamW, wd 0.05, backbone x0.1, poly).
_ADE0 = StepSchedule(160_000, 16, 1e-4, 512, 512)
_ADE_INC_PER_CLASS = 400          # CoMFormer: 100-50 -> 20k, 100-10 -> 4k/step, 100-5 -> 2k/step
_ADE_JOINT = StepSchedule(160_000, 16, 1e-4, 512, 512)
# VOC, ADE-instance, COCO: CisDQ (TCSVT 2023) configs, reference section 4.2.
_VOC = {  # protocol -> (step0, increment)
    "voc-15-5": (StepSchedule(10_000, 32, 1e-4, 512, 512), StepSchedule(5_000, 16, 1e-5, 512, 512)),
    "voc-15-1": (StepSchedule(80_000, 32, 1e-4, 512, 512), StepSchedule(2_000, 32, 1e-4, 512, 512)),
    "voc-19-1": (StepSchedule(40_000, 32, 1e-4, 512, 512), StepSchedule(10_000, 32, 1e-4, 512, 512)),
    "voc-10-1": (StepSchedule(40_000, 32, 1e-4, 512, 512), StepSchedule(1_000, 16, 1e-5, 512, 512)),
}
_VOC_DEFAULT = _VOC["voc-15-1"]
_VOC_JOINT = StepSchedule(400_000, 16, 1e-4, 512, 512)
_ADE_INST = {
    "ade-inst-50-50": (StepSchedule(40_000, 32, 1e-4, 640, 640), StepSchedule(10_000, 32, 1e-4, 640, 640)),
    "ade-inst-50-10": (StepSchedule(40_000, 32, 1e-4, 640, 640), StepSchedule(2_500, 32, 1e-4, 640, 640)),
    "ade-inst-50-5": (StepSchedule(40_000, 32, 1e-4, 640, 640), StepSchedule(2_500, 32, 1e-4, 640, 640)),
    "ade-inst-25-25": (StepSchedule(40_000, 32, 1e-4, 640, 640), StepSchedule(5_000, 32, 1e-4, 640, 640)),
}
_ADE_INST_JOINT = StepSchedule(160_000, 16, 1e-4, 640, 640)
# COCO: detectron2 defaults (short side 800, no crop): the crop of 1024 covers a 800x1333 resize.
_C0 = StepSchedule(368_750, 16, 1e-4, 1024, 800)
_COCO = {
    "coco-40-40": (_C0, replace(_C0, iterations=40_000)),
    "coco-40-20": (_C0, replace(_C0, iterations=40_000)),
    "coco-40-8": (_C0, replace(_C0, iterations=20_000)),
    "coco-40-4": (replace(_C0, batch_size=8), replace(_C0, iterations=10_000, batch_size=8)),
    "coco-60-20": (_C0, replace(_C0, iterations=180_000, batch_size=2)),
}
_COCO_JOINT = _C0
# ADE20K panoptic: CoMFormer (CVPR 2023) configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml
# and scripts/adps*.sh (reference baselines section 7): R50, step 0 160k it at lr 1e-4 with batch 8 (its
# offline run MxF_BS8), crop 640, test short side 640; increments at CoMFormer's semantic rate of 400 it per
# new class, lr 5e-5. ECLIPSE's and BalConpas's ADE-PS step 0 is the same 160k / 1e-4 / 8 / 640 (reference
# eclipse-balconpas A8, B9); their 50-x step 0 is 80k (ECLIPSE) -- the shared schedule keeps 160k for every
# base, as CoMFormer's configs do.
_ADE_PAN0 = StepSchedule(160_000, 8, 1e-4, 640, 640)
_ADE_PAN_JOINT = _ADE_PAN0
# COCO panoptic: only ECLIPSE publishes continual COCO panoptic (script/coco_ps/*.sh: step 0 240k it, lr 1e-4,
# batch 16, no crop -- detectron2's 800 x 1333 resize, for which the 1024 crop of the COCO rows stands in).
# Its increments (8k / 32k at lr 5e-4) train prompts only; a method that trains the whole model gets
# CoMFormer's 400 it per new class at lr 5e-5 instead (83-5: 2k, 83-10: 4k per step).
_COCO_PAN0 = StepSchedule(240_000, 16, 1e-4, 1024, 800)
_COCO_PAN_JOINT = _COCO_PAN0


# ECLIPSE (clovaai/ECLIPSE script/ade_ps, script/ade_ss, script/coco_ps; reference eclipse-balconpas A8): the
# increments train prompts only, at lr 5e-4 (ADE semantic 1e-3) for the scripts' iterations; ADE-PS 50-x bases
# train 80k. Batch 8 (ADE-PS) / 16 (ADE-SS, COCO). COCO's constant lr (multi-step milestones past the end) is
# replaced by the engine's poly decay: a known difference.
_E_ADE_PAN_INC = StepSchedule(0, 8, 5e-4, 640, 640)
_E_ADE_PAN50 = replace(_ADE_PAN0, iterations=80_000)
_E_ADE_INC = StepSchedule(0, 16, 1e-3, 512, 512)
_E_COCO_INC = StepSchedule(0, 16, 5e-4, 1024, 800)
_ECLIPSE = {
    "ade-pan-100-50": (_ADE_PAN0, replace(_E_ADE_PAN_INC, iterations=80_000)),
    "ade-pan-100-10": (_ADE_PAN0, replace(_E_ADE_PAN_INC, iterations=16_000)),
    "ade-pan-100-5": (_ADE_PAN0, replace(_E_ADE_PAN_INC, iterations=12_000)),
    "ade-pan-50-50": (_E_ADE_PAN50, replace(_E_ADE_PAN_INC, iterations=120_000)),
    "ade-pan-50-20": (_E_ADE_PAN50, replace(_E_ADE_PAN_INC, iterations=32_000)),
    "ade-pan-50-10": (_E_ADE_PAN50, replace(_E_ADE_PAN_INC, iterations=24_000)),
    "ade-100-50": (_ADE0, replace(_E_ADE_INC, iterations=120_000)),
    "ade-100-10": (_ADE0, replace(_E_ADE_INC, iterations=24_000)),
    "ade-100-5": (_ADE0, replace(_E_ADE_INC, iterations=12_000)),
    "coco-pan-83-10": (_COCO_PAN0, replace(_E_COCO_INC, iterations=32_000)),
    "coco-pan-83-5": (_COCO_PAN0, replace(_E_COCO_INC, iterations=8_000)),
}
# BalConpas (jinpeng0528/BalConpas scripts/*.sh; reference eclipse-balconpas B9): batch 8 everywhere, step 0
# 160k at 1e-4, increments at 5e-5 for 50k (x-50), 10k (x-10), 5k (x-5) iterations; crops 640 (panoptic,
# instance) and 512 (semantic). No ADE-PS 50-20 / 50-10 and no COCO in the release.
_B_PAN0, _B_SEM0, _B_INST0 = (StepSchedule(160_000, 8, 1e-4, c, c) for c in (640, 512, 640))
_BALCONPAS = {
    name: (base, replace(base, iterations=iterations, lr=5e-5))
    for prefix, base in (("ade-pan", _B_PAN0), ("ade", _B_SEM0))
    for name, iterations in ((f"{prefix}-100-50", 50_000), (f"{prefix}-100-10", 10_000),
                             (f"{prefix}-100-5", 5_000), (f"{prefix}-50-50", 50_000))
} | {
    f"ade-inst-50-{inc}": (_B_INST0, replace(_B_INST0, iterations=iterations, lr=5e-5))
    for inc, iterations in ((50, 50_000), (10, 10_000), (5, 5_000))
}
_METHOD_TABLES = {
    "eclipse-paper": (_ECLIPSE, "ECLIPSE scripts (reference eclipse-balconpas A8)"),
    "balconpas-paper": (_BALCONPAS, "BalConpas scripts (reference eclipse-balconpas B9)"),
}


def _base_name(protocol) -> str:
    """Published rows are keyed by the canonical split without order/mode suffixes."""
    return protocol.name.split("@")[0].replace("-disjoint", "").split("~")[0]


def _ade_semantic(protocol, lr_inc: float, step0: StepSchedule = _ADE0) -> tuple[StepSchedule, StepSchedule]:
    """Step 0 and increments at CoMFormer's 400 iterations per new class (``step0``'s batch and crop)."""
    inc_classes = len(protocol.steps[1]) if protocol.num_steps > 1 else 1
    inc = replace(step0, iterations=_ADE_INC_PER_CLASS * inc_classes, lr=lr_inc)
    return step0, inc


def get_schedule(name: str, protocol) -> Schedule:
    """The schedule ``name`` for ``protocol`` (a protocols.Protocol)."""
    if name == "cpu":
        return Schedule("cpu", **CPU_SCHEDULE)
    if name not in SCHEDULE_NAMES:
        raise ConfigError(f"unknown schedule {name!r}", hint=f"choose one of {', '.join(SCHEDULE_NAMES)}")
    dataset = protocol.dataset
    key = _base_name(protocol)
    if dataset.startswith("synth"):
        raise ConfigError(f"the {name!r} schedule is for real datasets; {protocol.name} is synthetic",
                          hint="use --schedule cpu (the default without CUDA)")
    if name in _METHOD_TABLES:
        table, source = _METHOD_TABLES[name]
        if key not in table:
            raise ConfigError(f"the {name!r} schedule has no row for {key}: the original scripts publish "
                              f"{', '.join(sorted(table))}", hint="use --schedule paper (the shared schedule)")
        step0, inc = table[key]
        joint = get_schedule("paper", protocol).joint
        return Schedule(name, step0, inc, joint, source)
    if dataset == "ade":
        if name == "cisdq-paper":
            step0, inc = StepSchedule(80_000, 32, 1e-4, 512, 512), StepSchedule(10_000, 32, 1e-4, 512, 512)
            inc_table = {"ade-100-10": 5_000, "ade-100-5": 2_500, "ade-100-50": 10_000, "ade-50-50": 10_000}
            inc = replace(inc, iterations=inc_table.get(key, inc.iterations))
            return Schedule(name, step0, inc, StepSchedule(160_000, 32, 1e-4, 512, 512),
                            "CisDQ configs/ade20k (reference cisdq section 4.2)")
        step0, inc = _ade_semantic(protocol, lr_inc=5e-5)
        return Schedule(name, step0, inc, _ADE_JOINT,
                        "CoMFormer ADE semantic (160k base; 400 it per new class; lr 5e-5)")
    if dataset in ("ade-pan", "coco-pan"):
        step0, joint, source = {
            "ade-pan": (_ADE_PAN0, _ADE_PAN_JOINT, "CoMFormer ADE panoptic (R50, 160k base, batch 8, crop 640; "
                                                  "400 it per new class; lr 5e-5)"),
            "coco-pan": (_COCO_PAN0, _COCO_PAN_JOINT, "ECLIPSE COCO panoptic base (240k, batch 16); CoMFormer's "
                                                      "400 it per new class, lr 5e-5"),
        }[dataset]
        step0, inc = _ade_semantic(protocol, lr_inc=5e-5, step0=step0)
        return Schedule(name, step0, inc, joint, source)
    table, joint, source = {
        "voc": (_VOC, _VOC_JOINT, "CisDQ configs/voc (reference cisdq section 4.2)"),
        "ade-inst": (_ADE_INST, _ADE_INST_JOINT, "CisDQ configs/ade20k-instance (reference cisdq 4.2)"),
        "coco": (_COCO, _COCO_JOINT, "CisDQ configs/coco (reference cisdq 4.2)"),
    }[dataset]
    default = {"voc": _VOC_DEFAULT, "ade-inst": _ADE_INST["ade-inst-50-10"], "coco": _COCO["coco-40-20"]}[dataset]
    step0, inc = table.get(key, default)
    return Schedule(name, step0, inc, joint, source if key in table else source + f"; {key} has no row: default row")
