"""The Method interface: a small object with a few hooks on the shared engine (design.md).

A method never touches data loading, optimisers, devices or distributed code: the engine owns those
and hands the method a :class:`StepContext`. ``loss`` returns named, already weighted terms; the
engine sums them, logs each one and back-propagates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    from benchmark.batch import Batch
    from benchmark.engine.outputs import ModelOutputs
    from protocols import Protocol


@dataclass
class StepContext:
    """What the engine tells a method about the step being trained.

    Columns: global class columns (see benchmark/engine/outputs.py). At step t the model predicts
    ``num_seen`` columns; the first ``num_old`` are the classes of earlier steps.
    """

    protocol: "Protocol"
    step: int
    num_old: int
    num_seen: int
    task: str                                   # "semantic" | "instance"
    criterion: Any                              # benchmark.engine.criterion.SetCriterion
    device: Any = "cpu"
    old_model: Any = None                       # frozen previous-step model (eval, no grad) or None
    # One pass over the step's training images (no augmentation randomness beyond the loader's own),
    # for methods that need statistics of the old model before training (PLOP's thresholds).
    iterate_train: Callable[[], Iterable["Batch"]] | None = None
    iterations: int = 0                         # optimisation steps in this step
    iteration: int = 0                          # current iteration (updated by the trainer)
    extras: dict = field(default_factory=dict)  # method-owned scratch space for the step

    @property
    def num_new(self) -> int:
        return self.num_seen - self.num_old


@dataclass(frozen=True)
class HParams:
    """Base for method hyper-parameter dataclasses: typed overrides with unknown keys refused."""

    def with_overrides(self, overrides: Mapping[str, Any]) -> "HParams":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KeyError(f"unknown hyper-parameter(s) {unknown}; known: {sorted(known)}")
        return replace(self, **dict(overrides))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Method:
    """Base class: fine-tuning behaviour; subclasses override the hooks they need.

    Class attributes tell the runner how to schedule the method:
      * ``shares_standard_step0``: step 0 is the standard engine step (the set loss on the base classes)
        on the model of :meth:`initial_layout`, so the runner trains it once per layout and reuses it for
        every such method (methods.md, schedules; the cache key includes the layout).
      * ``own_step0_recipe``: a name for a method's own step 0 (its loss or model differs from the standard one):
        the runner caches it under a key that includes the name and :meth:`step0_hparams` (ECLIPSE).
      * ``needs_old_model``: the engine builds the frozen previous-step model for steps t > 0 and runs
        it once per batch (no grad), handing its outputs to ``loss``.
      * ``joint``: train one step on every class (the upper bound).
      * ``query_groups``: one query group per step (CisDQ) instead of one growing head.
    """

    name: str = "base"
    shares_standard_step0: bool = True
    own_step0_recipe: str | None = None
    needs_old_model: bool = False
    joint: bool = False
    query_groups: bool = False
    hparams: HParams

    def __init__(self, hparams: HParams | None = None):
        self.hparams = hparams if hparams is not None else self.default_hparams()

    # --- configuration -------------------------------------------------------------------------
    @classmethod
    def default_hparams(cls) -> HParams:
        return HParams()

    @classmethod
    def protocol_overrides(cls, protocol_name: str) -> dict[str, Any]:
        """Per-protocol hyper-parameter overrides, kept as data with their source."""
        return {}

    @classmethod
    def for_protocol(cls, protocol_name: str, overrides: Mapping[str, Any] | None = None) -> "Method":
        hp = cls.default_hparams().with_overrides(cls.protocol_overrides(protocol_name))
        return cls(hp.with_overrides(overrides or {}))

    # --- hooks ---------------------------------------------------------------------------------
    def initial_layout(self, protocol: "Protocol", preset) -> list[tuple[int, int]]:
        """Query groups of the step-0 model as (num_queries, num_columns): one standard group."""
        return [(preset.num_queries, len(protocol.steps[0]))]

    def step0_hparams(self) -> dict[str, Any]:
        """The hyper-parameters an own step 0 depends on (part of its cache key; see ``own_step0_recipe``)."""
        return self.hparams.to_dict()

    def model_options(self):
        """The structural options of every model this method builds (benchmark.engine.model.ModelOptions)."""
        from benchmark.engine.model import ModelOptions

        return ModelOptions()

    def configure_model(self, model, ctx: StepContext) -> None:
        """Grow the class head to the step's seen columns (default initialisation of new rows)."""
        model.grow_head(ctx.num_seen)

    def before_step(self, ctx: StepContext) -> None:
        """Called once before the first iteration of the step."""

    def loss(self, batch: "Batch", outputs: "ModelOutputs", old_outputs: "ModelOutputs | None",
             ctx: StepContext) -> dict[str, Tensor]:
        """The engine's set loss on the step's ground truth (every decoder layer)."""
        return ctx.criterion(outputs.layer_class_logits_of(0), outputs.layer_mask_logits, batch.targets)

    def replay_size(self) -> int:
        """Images of earlier steps the engine replays at every step t > 0 (benchmark.data.replay; 0 = none)."""
        return 0

    def class_scores(self, outputs: "ModelOutputs"):
        """Evaluation's post-logit hook: ``(class probabilities [B, Q, K], no-object [B, Q] or None)``.

        Default: the shared softmax reading (``outputs.class_probs()``, no-object = 1 - sum).
        """
        return outputs.class_probs(), None

    def eval_defaults(self, task: str) -> dict[str, Any]:
        """The method's defaults for the task's ``--set eval.*`` options (the user's overrides win)."""
        return {}

    def after_step(self, ctx: StepContext) -> None:
        """Called once after the last iteration of the step."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that must survive a resume (e.g. PLOP's thresholds)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
