"""The Protocol value object: which native class ids are learned at each step, on which dataset, in which mode.

Column convention (benchmark/engine/outputs.py): the model's class column ``c`` is ``class_order[c]``,
the steps flattened in order, so the columns of step t's new classes follow the columns of every
earlier step. Every Protocol is validated when it is built (``__post_init__``), so code that receives
one can rely on: the steps are non-empty and disjoint, together they contain every class of the
dataset exactly once, and VOC's background 0 is a class of step 0.
"""

from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Mapping

from benchmark.errors import ConfigError

from .datasets import SYNTHETIC_DATASETS, TASKS, ClassNames, DatasetSpec, dataset_spec, synthetic_dataset

MODES = ("overlap", "disjoint")


@dataclass(frozen=True, repr=False)
class Protocol:
    """A continual segmentation protocol (protocols.md).

    ``steps[t]`` are the native class ids introduced at step t, in column order. ``class_names`` is an
    immutable ``id -> name`` mapping over every class of the protocol (use ``class_names[id]`` or
    :meth:`name_of`). ``num_dataset_classes`` is the number of classes of the dataset (21 for VOC,
    background included; K for the synthetic dataset, which tells its generator how many to draw).
    """

    name: str
    dataset: str
    task: str
    mode: str
    order: str
    steps: tuple[tuple[int, ...], ...]
    class_names: ClassNames
    num_dataset_classes: int

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store the hashable, immutable form.
        object.__setattr__(self, "steps", tuple(tuple(int(c) for c in step) for step in self.steps))
        if not isinstance(self.class_names, ClassNames):
            object.__setattr__(self, "class_names", ClassNames(dict(self.class_names).items()))
        _validate(self)

    # ----------------------------------------------------------------------------------------- structure
    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def step_sizes(self) -> tuple[int, ...]:
        return tuple(len(step) for step in self.steps)

    @cached_property
    def class_order(self) -> tuple[int, ...]:
        """The steps flattened: model column ``c`` predicts native class ``class_order[c]``."""
        return tuple(c for step in self.steps for c in step)

    @cached_property
    def all_classes(self) -> tuple[int, ...]:
        """Every class of the protocol, ascending native id (not column order)."""
        return tuple(sorted(self.class_order))

    @cached_property
    def _columns(self) -> Mapping[int, int]:
        return {c: i for i, c in enumerate(self.class_order)}

    @cached_property
    def _step_of(self) -> Mapping[int, int]:
        return {c: t for t, step in enumerate(self.steps) for c in step}

    def column(self, class_id: int) -> int:
        """The model column of native class ``class_id``."""
        return self._columns[self._known(class_id)]

    def step_of(self, class_id: int) -> int:
        """The step at which native class ``class_id`` is introduced."""
        return self._step_of[self._known(class_id)]

    def name_of(self, class_id: int) -> str:
        return self.class_names[self._known(class_id)]

    def new(self, t: int) -> tuple[int, ...]:
        """Classes introduced at step t (C_t)."""
        return self.steps[self._step(t)]

    def old(self, t: int) -> tuple[int, ...]:
        """Classes of the steps before t (O_t), in column order."""
        return self.class_order[: self._num_before(self._step(t))]

    def seen(self, t: int) -> tuple[int, ...]:
        """Classes learned up to and including step t, in column order."""
        return self.class_order[: self._num_before(self._step(t) + 1)]

    def step_columns(self, t: int) -> range:
        """The model columns of step t's new classes."""
        t = self._step(t)
        return range(self._num_before(t), self._num_before(t + 1))

    @property
    def base(self) -> tuple[int, ...]:
        """The step-0 classes (the papers' '1-100' / '0-15' column; VOC's background included)."""
        return self.steps[0]

    @property
    def novel(self) -> tuple[int, ...]:
        """The classes of steps >= 1 (the papers' '101-150' / '16-20' column)."""
        return self.class_order[len(self.steps[0]):]

    @property
    def background(self) -> int | None:
        """VOC's background class 0 (a real class, learned at step 0); None for every other dataset."""
        return self._dataset.background

    @property
    def ignore_ids(self) -> frozenset[int]:
        """Annotation values that are never a class (VOC {255}; ADE, COCO, synthetic {0, 255})."""
        return self._dataset.ignore_ids

    @property
    def is_synthetic(self) -> bool:
        return self.dataset in SYNTHETIC_DATASETS

    @cached_property
    def _dataset(self) -> DatasetSpec:
        return dataset_spec(self.dataset, self.num_dataset_classes)

    # ----------------------------------------------------------------------------------------- identity
    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of what defines the splits (dataset, task, mode, steps).

        The name and order label are left out on purpose: two spellings of the same split (an alias,
        ``voc-15-1~joint`` and ``voc-joint``) share results and cached step-0 models.
        """
        canonical = json.dumps(
            {"dataset": self.dataset, "task": self.task, "mode": self.mode, "steps": [list(s) for s in self.steps]},
            sort_keys=True, separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        sizes = "+".join(str(n) for n in self.step_sizes)
        return (f"Protocol({self.name!r}, dataset={self.dataset!r}, mode={self.mode!r}, order={self.order!r}, "
                f"steps={sizes}, fingerprint={self.fingerprint[:12]})")

    def __str__(self) -> str:
        return self.name

    # ----------------------------------------------------------------------------------------- derived
    def as_joint(self) -> "Protocol":
        """One step with every class in ``class_order`` (the joint-training upper bound), same dataset.

        The mode becomes 'overlap' because with a single step there is no future class, so both image
        filters select the same images; this keeps one fingerprint for one joint split. A protocol that
        already is a single overlap step is returned unchanged.
        """
        if self.num_steps == 1 and self.mode == "overlap":
            return self
        return replace(self, name=f"{self.name}~joint", mode="overlap", steps=(self.class_order,))

    def on_synthetic(self) -> "Protocol":
        """The same step structure on the embedded synthetic dataset.

        The i-th class of the ascending id list becomes synthetic class i + 1 (VOC's background 0 becomes
        an ordinary synthetic class, synthetic data have no background), so the synthetic dataset has as
        many classes as this protocol. A synthetic protocol is returned unchanged.
        """
        if self.is_synthetic:
            return self
        rank = {c: i + 1 for i, c in enumerate(self.all_classes)}
        spec = synthetic_dataset(self.task, len(rank))
        return Protocol(
            name=f"{self.name}~synth", dataset=spec.name, task=self.task, mode=self.mode, order=self.order,
            steps=tuple(tuple(rank[c] for c in step) for step in self.steps),
            class_names=spec.class_names, num_dataset_classes=spec.num_classes,
        )

    # ----------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for run.json (class names keyed by the id as a string, as JSON needs)."""
        return {
            "name": self.name, "dataset": self.dataset, "task": self.task, "mode": self.mode, "order": self.order,
            "steps": [list(s) for s in self.steps],
            "class_names": {str(i): n for i, n in self.class_names.items()},
            "num_dataset_classes": self.num_dataset_classes, "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Protocol":
        """Rebuild a protocol written by :meth:`to_dict`; a stored fingerprint must match the rebuilt one."""
        keys = ("name", "dataset", "task", "mode", "order", "steps", "class_names", "num_dataset_classes")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ConfigError(f"protocol description lacks {missing}", hint="it must be written by Protocol.to_dict()")
        protocol = cls(
            name=data["name"], dataset=data["dataset"], task=data["task"], mode=data["mode"], order=data["order"],
            steps=data["steps"], class_names=ClassNames((int(i), n) for i, n in data["class_names"].items()),
            num_dataset_classes=int(data["num_dataset_classes"]),
        )
        stored = data.get("fingerprint")
        if stored is not None and stored != protocol.fingerprint:
            raise ConfigError(f"protocol {protocol.name!r}: stored fingerprint {stored[:12]} does not match its steps "
                              f"({protocol.fingerprint[:12]})", hint="the description was edited or is corrupt")
        return protocol

    # ----------------------------------------------------------------------------------------- helpers
    def _known(self, class_id: int) -> int:
        if class_id not in self._step_of:
            first, last = self.all_classes[0], self.all_classes[-1]
            raise ConfigError(f"class {class_id!r} is not a class of protocol {self.name!r}",
                              hint=f"its classes are {self.dataset} ids between {first} and {last}, "
                                   "listed in protocol.all_classes")
        return class_id

    def _step(self, t: int) -> int:
        try:
            index = operator.index(t)
        except TypeError:
            index = -1
        if not 0 <= index < self.num_steps:
            raise ConfigError(f"protocol {self.name!r} has steps 0..{self.num_steps - 1}, step {t!r} does not exist")
        return index

    def _num_before(self, t: int) -> int:
        return sum(len(step) for step in self.steps[:t])


def _validate(p: Protocol) -> None:
    """Every invariant of a protocol, checked in one place; raises ConfigError naming the protocol."""
    def fail(problem: str, hint: str | None = None) -> None:
        raise ConfigError(f"invalid protocol {p.name!r}: {problem}", hint=hint)

    if not p.name or not isinstance(p.name, str):
        fail("the name must be a non-empty string")
    if p.mode not in MODES:
        fail(f"mode {p.mode!r} is not one of {MODES}")
    if p.task not in TASKS:
        fail(f"task {p.task!r} is not one of {', '.join(map(repr, TASKS))}")
    if not p.order or not isinstance(p.order, str):
        fail("the order label must be a non-empty string")
    spec = dataset_spec(p.dataset, p.num_dataset_classes)
    if spec.task != p.task:
        fail(f"dataset {p.dataset!r} is a {spec.task} dataset, the protocol says {p.task!r}")
    if not p.steps or any(len(step) == 0 for step in p.steps):
        fail(f"every step needs at least one class, got step sizes {[len(s) for s in p.steps]}")
    seen: dict[int, int] = {}
    for t, step in enumerate(p.steps):
        for c in step:
            if c not in spec.class_names:
                fail(f"step {t} has class id {c}, which is not a class of {p.dataset!r}",
                     hint=f"valid ids: {spec.class_ids[0]}..{spec.class_ids[-1]} (see protocols.md)")
            if c in seen:
                fail(f"class {c} appears in step {seen[c]} and again in step {t}", hint="steps must be disjoint")
            seen[c] = t
    missing = sorted(set(spec.class_ids) - set(seen))
    if missing:
        fail(f"classes {missing} of {p.dataset!r} are in no step", hint="every class must be learned exactly once")
    if spec.background is not None and seen[spec.background] != 0:
        fail(f"background {spec.background} must be a class of step 0, not step {seen[spec.background]}")
    if p.class_names != spec.class_names:
        fail(f"class names differ from the {p.dataset!r} class names", hint="build protocols with get_protocol()")
