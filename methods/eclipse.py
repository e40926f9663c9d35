"""ECLIPSE: visual prompt tuning with logit manipulation on a frozen base model.

Kim et al., "ECLIPSE: Efficient Continual Learning in Panoptic Segmentation with Visual Prompt Tuning",
CVPR 2024; code clovaai/ECLIPSE @9266720 (CC BY-NC 4.0: re-implemented, nothing copied). What the code does is
in ../shared/reference/eclipse-balconpas-original-code.md part A ("ref." below); where the code departs from the
paper the code is reproduced by default, since its numbers are the published ones.

Model (ref. A1; engine features of :mod:`benchmark.engine.model`, :meth:`ECLIPSE.model_options`):
* ``classifier="step_mlp"``: ``IncrementalClassifier`` with ``DEEP_CLS``: one 3-layer MLP block per step and a
  shared no-object MLP, all applied to every query; sigmoid class scores.
* Step t >= 1 adds a prompt group of ``N_p`` queries: content (``prompt_feat``), one positional embedding per
  decoder layer (``PROMPT_DEEP``), its own copy of the mask MLP (``PROMPT_MASK_MLP``), its class block.
* Inference: every group; self-attention inside each group only (block-diagonal, ref. A6).

Step 0 (ref. A2): ECLIPSE's own, not the shared one: the same model trained with the sigmoid focal class loss
(:func:`methods.losses.sigmoid_focal_class_loss`, class weight 2) on every prediction set, everything trainable.
The runner caches it per (seed, base split) like the shared step 0, under ECLIPSE's own recipe.

Steps t >= 1 (ref. A3-A5):
* New modules initialised as the original (``maskformer_model.py`` L694-748): every prompt row (content and every
  layer's position) = the mean of the base group's rows; the mask MLP = a copy of the base one; the new class block
  = a copy of the current no-object MLP with its output row replicated per new class.
* Trainable: the new class block, the shared no-object MLP (``cls[0]``, L629-631), the new prompts and their mask
  MLP. Everything else is frozen (``requires_grad`` False, bit-unchanged).
* Only the current prompt group is decoded while training (``forward_new_train``); targets are the step's ground
  truth (no pseudo-labels, no distillation); matching cost ``w_cls * (-softmax p[c]) + 5 BCE + 5 dice`` (the
  matcher uses softmax although the classifier is sigmoid: a quirk of the code, kept); class weight 10.
* Deep supervision: the released decoder appends its per-layer predictions after the loop (dec L618-619), so
  only the first and the last prediction sets are supervised at t >= 1 (``supervise_all_layers=False``, the
  code); ``supervise_all_layers=True`` is the paper's deep supervision.
* Logit manipulation at inference only (dec L785-817, ref. A6), per group n with its own step's classes C_n and
  delta d_n: d > 0 replaces the no-object probability by ``d * min(1, sum_{c not in C_n} sigmoid(z_c))``, d < 0
  scales it by |d|, both clipped to [0.001, 0.999]; then every class outside C_n gets logit -10. The shared
  inference then reads sigmoid scores with this explicit no-object (``class_scores``), with ECLIPSE's thresholds
  0.0 / 0.0 for panoptic (``eval_defaults``; the semantic "segments" inference already uses 0.0 / 0.0).

Per-setting values (:data:`SETTINGS`, ref. A8, from ``script/ade_ps``, ``script/ade_ss``, ``script/coco_ps``):
prompts per step and the evaluation deltas. The training deltas of the scripts only change the evaluations run
during training, never the loss (ref. A10.4), so they are not used here. Decisions where the original is silent:
* Protocols without a script (synthetic, VOC, ADE-instance, ADE semantic 50-x, ...): one prompt per new class
  (``prompts_per_class`` 1.0, the ratio of ADE-PS 100-10 / 50-10 / 50-20 / 50-50) and deltas (0.4, 0.5), the
  ADE-PS 100-10 / 50-x values.
* Frozen BatchNorm statistics at t >= 1 (``freeze_norm_statistics``): the original's panoptic R50 uses FrozenBN; its
  semantic R101 SyncBN keeps updating its running statistics (ref. A3, A10.9), which the tiny preset's trainable
  BatchNorm would turn into drift of the "frozen" base; the ResNet paper presets freeze them anyway.
* The trainer clips the full-model gradient norm with the run's ``train.clip_grad`` (ECLIPSE's 0.01 is the
  Mask2Former default the engine shares).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError
from methods.base import HParams, Method, StepContext
from methods.losses import sigmoid_focal_class_loss

if TYPE_CHECKING:  # pragma: no cover - typing only
    from benchmark.batch import Batch
    from benchmark.engine.outputs import ModelOutputs
    from protocols import Protocol

# Per setting (ref. A8 table): prompts per incremental step and the evaluation deltas (index 0 = base group,
# a shorter list is padded with its last value). Base queries: 100, 50 for the ADE-PS 50-x bases.
SETTINGS: dict[str, dict[str, Any]] = {
    "ade-pan-100-50": {"num_prompts": 50, "deltas": (-0.4, -0.6)},       # script/ade_ps/100_50.sh (train 0.6, -0.6)
    "ade-pan-100-10": {"num_prompts": 10, "deltas": (0.4, 0.5)},         # script/ade_ps/100_10.sh
    "ade-pan-100-5": {"num_prompts": 10, "deltas": (0.4, 0.6)},          # 100_5.sh: 10 prompts for 5 classes (train 0.5)
    "ade-pan-50-50": {"num_prompts": 50, "deltas": (0.5, -0.4, -0.4), "base_queries": 50},
    "ade-pan-50-20": {"num_prompts": 20, "deltas": (0.4, 0.5), "base_queries": 50},
    "ade-pan-50-10": {"num_prompts": 10, "deltas": (0.4, 0.5), "base_queries": 50},
    "ade-100-50": {"num_prompts": 50, "deltas": (0.0, -0.1)},            # script/ade_ss: "reproduce error" (README)
    "ade-100-10": {"num_prompts": 10, "deltas": (0.1, 0.7)},
    "ade-100-5": {"num_prompts": 5, "deltas": (0.1, 0.8)},
    "coco-pan-83-10": {"num_prompts": 10, "deltas": (0.5, 0.6)},         # script/coco_ps/83_10.sh
    "coco-pan-83-5": {"num_prompts": 10, "deltas": (0.5, 0.6)},
}


@dataclass(frozen=True)
class EclipseParams(HParams):
    """ECLIPSE's hyper-parameters (ref. A2-A8; per setting in :data:`SETTINGS`).

    num_prompts: prompts per incremental step (``CONT.NUM_PROMPTS``); 0 = ``prompts_per_class`` x new classes.
    prompts_per_class: used when ``num_prompts`` is 0 (decision for settings without a script, module doc).
    base_queries: queries of the base model; 0 = the preset's (100 for the paper presets; 50 for ADE-PS 50-x).
    deltas: evaluation logit-manipulation deltas per group (``CONT.LOGIT_MANI_DELTAS``), padded with the last.
    class_weight_base / class_weight_incremental: ``CLASS_WEIGHT`` 2 at step 0, 10 at t >= 1 (scripts).
    focal_alpha / focal_gamma / focal_scale: sigmoid focal class loss, 5 / 1 / 50 (ref. A5).
    supervise_all_layers: False = the released code (first and last prediction sets at t >= 1); True = paper.
    probability_clip: the no-object probability is clipped to [clip, 1 - clip] (0.001, dec L795-805).
    foreign_logit: logit given to classes outside a group's step (-10, dec L812).
    """

    num_prompts: int = 0
    prompts_per_class: float = 1.0
    base_queries: int = 0
    deltas: tuple[float, ...] = (0.4, 0.5)
    class_weight_base: float = 2.0
    class_weight_incremental: float = 10.0
    focal_alpha: float = 5.0
    focal_gamma: float = 1.0
    focal_scale: float = 50.0
    supervise_all_layers: bool = False
    probability_clip: float = 0.001
    foreign_logit: float = -10.0

    def __post_init__(self) -> None:
        def bad(key: str, problem: str, hint: str) -> None:
            raise ConfigError(f"eclipse: method.{key}={getattr(self, key)!r} {problem}", hint=hint)

        if self.num_prompts < 0:
            bad("num_prompts", "must be >= 0", "0 = prompts_per_class x new classes; ADE-PS 100-10 uses 10")
        if not self.prompts_per_class > 0:
            bad("prompts_per_class", "must be positive", "1 prompt per new class is the ADE-PS 100-10 ratio")
        if self.base_queries < 0:
            bad("base_queries", "must be >= 0", "0 = the preset's queries; ADE-PS 50-x uses 50")
        if not self.deltas or any(abs(d) > 1 for d in self.deltas):
            bad("deltas", "must be one or more numbers in [-1, 1]", "e.g. 0.4,0.5 (base, then every later step)")
        if not 0 < self.probability_clip < 0.5:
            bad("probability_clip", "must be in (0, 0.5)", "the original clips to [0.001, 0.999]")


def prompts_for(num_classes: int, hp: EclipseParams) -> int:
    """Prompts of a step with ``num_classes`` new classes."""
    if hp.num_prompts > 0:
        return hp.num_prompts
    return max(1, math.floor(hp.prompts_per_class * num_classes + 0.5))


def group_deltas(deltas: Sequence[float], num_groups: int) -> list[float]:
    """``LOGIT_MANI_DELTAS`` for ``num_groups`` groups: truncated, or padded with the last value (dec L350-360)."""
    values = list(deltas)[:num_groups]
    return values + [values[-1]] * (num_groups - len(values))


def manipulate_logits(logits: Tensor, own: slice, delta: float, clip: float = 0.001,
                      foreign_logit: float = -10.0) -> Tensor:
    """One group's logit manipulation (ref. A6): ``logits`` [..., K+1] (no-object last) -> a new tensor.

    delta > 0: no-object probability := ``delta * min(1, sum of sigmoid over the classes outside own)``;
    delta < 0: no-object probability := ``|delta| * sigmoid(z_no-object)``; both clipped to [clip, 1 - clip] and
    turned back into a logit; delta = 0 keeps it. Then every class outside ``own`` gets ``foreign_logit``.
    """
    z = logits.float().clone()
    num_classes = z.shape[-1] - 1
    foreign = torch.ones(num_classes, dtype=torch.bool, device=z.device)
    foreign[own] = False
    if delta > 0:
        others = z[..., :num_classes][..., foreign].sigmoid().sum(-1).clamp(max=1.0)
        z[..., num_classes] = torch.logit((delta * others).clamp(clip, 1 - clip))
    elif delta < 0:
        z[..., num_classes] = torch.logit((-delta * z[..., num_classes].sigmoid()).clamp(clip, 1 - clip))
    z[..., torch.nonzero(foreign).flatten()] = foreign_logit
    return z


def copy_no_object_head(block: nn.Module, no_object: nn.Module) -> None:
    """Initialise a new class block from the no-object MLP (``maskformer_model.py`` L734-748): hidden layers
    copied, the output row and bias replicated for every new class."""
    new_layers = [m for m in block.modules() if isinstance(m, nn.Linear)]
    src_layers = [m for m in no_object.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for new, src in zip(new_layers[:-1], src_layers[:-1]):
            new.weight.copy_(src.weight)
            new.bias.copy_(src.bias)
        new_layers[-1].weight.copy_(src_layers[-1].weight.expand_as(new_layers[-1].weight))
        new_layers[-1].bias.copy_(src_layers[-1].bias.expand_as(new_layers[-1].bias))


def trainable_modules(model, step: int) -> list[nn.Module]:
    """What ECLIPSE trains at ``step`` >= 1 (``freeze_for_prompt_tuning``, ref. A3)."""
    return [model.class_heads[step], model.no_object_head, model.content_embedding(step),
            *model.position_embeddings(step), model.mask_embedder(step)]


class ECLIPSE(Method):
    """ECLIPSE on the shared engine (see the module docstring for the behaviour and its sources)."""

    name = "eclipse"
    shares_standard_step0 = False
    own_step0_recipe = "eclipse"
    needs_old_model = False
    query_groups = True
    hparams: EclipseParams

    @classmethod
    def default_hparams(cls) -> EclipseParams:
        return EclipseParams()

    @classmethod
    def protocol_overrides(cls, protocol_name: str) -> dict[str, Any]:
        return dict(SETTINGS.get(protocol_name.split("@")[0].split("~")[0], {}))

    def step0_hparams(self) -> dict[str, Any]:
        """Step 0 depends on its loss only (the deltas, prompts and incremental weights do not touch it)."""
        hp = self.hparams
        return {"class_weight_base": hp.class_weight_base, "focal_alpha": hp.focal_alpha,
                "focal_gamma": hp.focal_gamma, "focal_scale": hp.focal_scale}

    def model_options(self):
        from benchmark.engine.model import ModelOptions

        return ModelOptions(group_attention_mask=True, layer_positions=True, group_mask_embedders=True,
                            classifier="step_mlp")

    def initial_layout(self, protocol: "Protocol", preset) -> list[tuple[int, int]]:
        return [(self.hparams.base_queries or preset.num_queries, len(protocol.steps[0]))]

    def configure_model(self, model, ctx: StepContext) -> None:
        """Add step t's prompt group initialised as the original, freeze everything else (t >= 1)."""
        t = ctx.step
        if t == 0:
            return
        if model.num_groups == t:
            base_content = model.content_embedding(0).weight.detach()
            base_position = model.position_embeddings(0)[0].weight.detach()
            model.add_group(prompts_for(len(ctx.protocol.steps[t]), self.hparams), len(ctx.protocol.steps[t]))
            with torch.no_grad():
                model.content_embedding(t).weight.copy_(base_content.mean(0).expand_as(model.content_embedding(t).weight))
                for embedding in model.position_embeddings(t):
                    embedding.weight.copy_(base_position.mean(0).expand_as(embedding.weight))
                model.mask_embedder(t).load_state_dict(model.mask_embedder(0).state_dict())
            copy_no_object_head(model.class_heads[t], model.no_object_head)
        elif model.num_groups != t + 1:
            raise ValueError(f"eclipse step {t}: the model has {model.num_groups} groups, expected {t} or {t + 1}")
        model.requires_grad_(False)
        for module in trainable_modules(model, t):
            module.requires_grad_(True)
        model.train_groups = (t,)
        model.freeze_norm_statistics = True

    def loss(self, batch: "Batch", outputs: "ModelOutputs", old_outputs: "ModelOutputs | None",
             ctx: StepContext) -> dict[str, Tensor]:
        hp, t = self.hparams, ctx.step
        weight = hp.class_weight_base if t == 0 else hp.class_weight_incremental
        criterion = dataclasses.replace(ctx.criterion, class_weight=weight)
        class_logits = outputs.layer_class_logits_of(t)
        masks = [layer[:, outputs.group_queries[t]] for layer in outputs.layer_mask_logits]
        if t > 0 and not hp.supervise_all_layers:
            class_logits, masks = [class_logits[0], class_logits[-1]], [masks[0], masks[-1]]

        def focal(logits: Tensor, target_classes: Tensor) -> Tensor:
            return sigmoid_focal_class_loss(logits, target_classes, hp.focal_alpha, hp.focal_gamma, hp.focal_scale)

        return criterion(class_logits, masks, batch.targets, class_loss=focal)

    def class_scores(self, outputs: "ModelOutputs"):
        """Sigmoid scores after the logit manipulation, with the explicit no-object score (ref. A6)."""
        hp = self.hparams
        deltas = group_deltas(hp.deltas, outputs.num_groups)
        num_queries = max(q.stop for q in outputs.group_queries)
        first = outputs.class_logits(0)
        probs = first.new_zeros(first.shape[0], num_queries, outputs.num_columns, dtype=torch.float32)
        no_object = first.new_zeros(first.shape[0], num_queries, dtype=torch.float32)
        for g, (queries, own) in enumerate(zip(outputs.group_queries, outputs.columns_owned())):
            z = manipulate_logits(outputs.class_logits(g), own, deltas[g], hp.probability_clip, hp.foreign_logit)
            probs[:, queries] = z[..., :-1].sigmoid()
            no_object[:, queries] = z[..., -1].sigmoid()
        return probs, no_object

    def eval_defaults(self, task: str) -> dict[str, Any]:
        """ECLIPSE's panoptic thresholds: ``OBJECT_MASK_THRESHOLD`` and ``OVERLAP_THRESHOLD`` 0.0 (ref. A6)."""
        if task == "panoptic":
            return {"object_mask_threshold": "0.0", "overlap_threshold": "0.0"}
        return {}
