"""Class id spaces of the datasets the protocols are defined on (protocols.md, "Class id spaces").

Native ids are used everywhere (protocols, targets, metrics, results). The tables below are data
taken from protocols.md, which cites the original repositories:

- ``voc``: Pascal VOC 2012, ids 0..20, 0 = background (a real class, always learned at step 0),
  255 = void.
- ``ade``: ADE20K / SceneParse150, ids 1..150 as in the raw annotation PNGs; 0 = 'other' is void.
- ``ade-inst``: the 100 ADE 'thing' classes of Mask2Former's instance split, as SceneParse150 ids
  (CisDQ ``register_ade20k_incremental_instance.py`` ``ids``, 0-based there, +1 here). Default order:
  ascending id.
- ``coco``: COCO 2017 instance, the 80 category ids (1..90 with gaps). Default order: the one CisDQ
  uses (``register_coco_incremental_instance.py`` ``ids``), which is not ascending.
- ``synth`` / ``synth-inst``: the embedded synthetic dataset with K classes, ids 1..K, names from
  :mod:`protocols.synthetic`.

``ignore_ids`` are the annotation values that are never a class: VOC's void 255; for every other
dataset 0 (ADE and synthetic 'void'; COCO has no category 0) and 255 (the padding / ignore value the
readers use).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from functools import lru_cache
from types import MappingProxyType

from benchmark.errors import ConfigError

from .synthetic import DEFAULT_CLASSES, MAX_CLASSES, default_stuff_classes, stuff_ids, stuff_look, synth_class

SEMANTIC = "semantic"
INSTANCE = "instance"
PANOPTIC = "panoptic"
TASKS = (SEMANTIC, INSTANCE, PANOPTIC)   # the tasks a protocol can have (each implemented in benchmark/tasks/)
SYNTHETIC_DATASETS = {"synth": SEMANTIC, "synth-inst": INSTANCE, "synth-pan": PANOPTIC}


class ClassNames(Mapping[int, str]):
    """Immutable, hashable ``native id -> name`` mapping (so a frozen Protocol stays hashable)."""

    __slots__ = ("_pairs", "_lookup")

    def __init__(self, pairs: Iterable[tuple[int, str]]):
        self._pairs = tuple(sorted((int(i), str(n)) for i, n in pairs))
        self._lookup = dict(self._pairs)
        if len(self._lookup) != len(self._pairs):
            raise ValueError("duplicate class ids in class names")

    def __getitem__(self, class_id: int) -> str:
        return self._lookup[class_id]

    def __iter__(self) -> Iterator[int]:
        return (i for i, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __hash__(self) -> int:
        return hash(self._pairs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClassNames):
            return self._pairs == other._pairs
        return Mapping.__eq__(self, other)

    def __repr__(self) -> str:
        return f"ClassNames({len(self)} classes: {self._pairs[0]} .. {self._pairs[-1]})" if self else "ClassNames()"

    def __reduce__(self):
        return ClassNames, (self._pairs,)

    def subset(self, class_ids: Iterable[int]) -> "ClassNames":
        return ClassNames((i, self._lookup[i]) for i in class_ids)


@dataclass(frozen=True)
class DatasetSpec:
    """What a protocol needs to know about a dataset: its classes, default order and label conventions.

    ``default_order`` lists the classes that protocols split into steps (VOC's background excluded:
    it is prepended to step 0 by the registry).
    """

    name: str
    task: str
    class_names: ClassNames
    default_order: tuple[int, ...]
    background: int | None
    ignore_ids: frozenset[int]
    thing_ids: frozenset[int] = frozenset()     # panoptic: the 'thing' classes (the others are 'stuff')

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Every class id of the dataset, ascending (background included)."""
        return tuple(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)



VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# SceneParse150 names, index i is id i + 1 (protocols.md).
ADE_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag',
)

ADE_THING_IDS = (
    8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43, 44, 45, 46,
    48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76, 77, 79, 81, 82, 83, 84, 86,
    87, 88, 89, 90, 91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109, 111, 112, 113, 116, 117, 119, 120, 121,
    122, 124, 125, 126, 127, 128, 130, 131, 133, 134, 135, 136, 137, 138, 139, 140, 143, 144, 145, 147, 148,
    149, 150,
)

COCO_NAMES = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'), (6, 'bus'), (7, 'train'),
    (8, 'truck'), (9, 'boat'), (10, 'traffic light'), (11, 'fire hydrant'), (13, 'stop sign'),
    (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'), (18, 'dog'), (19, 'horse'), (20, 'sheep'),
    (21, 'cow'), (22, 'elephant'), (23, 'bear'), (24, 'zebra'), (25, 'giraffe'), (27, 'backpack'),
    (28, 'umbrella'), (31, 'handbag'), (32, 'tie'), (33, 'suitcase'), (34, 'frisbee'), (35, 'skis'),
    (36, 'snowboard'), (37, 'sports ball'), (38, 'kite'), (39, 'baseball bat'), (40, 'baseball glove'),
    (41, 'skateboard'), (42, 'surfboard'), (43, 'tennis racket'), (44, 'bottle'), (46, 'wine glass'),
    (47, 'cup'), (48, 'fork'), (49, 'knife'), (50, 'spoon'), (51, 'bowl'), (52, 'banana'), (53, 'apple'),
    (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'), (57, 'carrot'), (58, 'hot dog'), (59, 'pizza'),
    (60, 'donut'), (61, 'cake'), (62, 'chair'), (63, 'couch'), (64, 'potted plant'), (65, 'bed'),
    (67, 'dining table'), (70, 'toilet'), (72, 'tv'), (73, 'laptop'), (74, 'mouse'), (75, 'remote'),
    (76, 'keyboard'), (77, 'cell phone'), (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'),
    (82, 'refrigerator'), (84, 'book'), (85, 'clock'), (86, 'vase'), (87, 'scissors'), (88, 'teddy bear'),
    (89, 'hair drier'), (90, 'toothbrush'),
)

COCO_CISDQ_ORDER = (
    1, 3, 62, 84, 44, 47, 67, 51, 10, 31, 28, 16, 9, 8, 15, 20, 52, 38, 4, 27, 64, 21, 46, 57, 49, 56, 60, 2,
    35, 86, 19, 32, 77, 55, 61, 37, 85, 33, 50, 42, 6, 53, 59, 72, 63, 75, 81, 41, 22, 18, 48, 24, 5, 25, 73,
    43, 88, 17, 7, 54, 65, 70, 40, 79, 39, 58, 76, 36, 34, 82, 74, 13, 90, 11, 78, 87, 23, 14, 80, 89,
)


@lru_cache(maxsize=1)
def _real_datasets() -> Mapping[str, DatasetSpec]:
    ade_names = ClassNames(enumerate(ADE_NAMES, start=1))
    return MappingProxyType({
        "voc": DatasetSpec("voc", SEMANTIC, ClassNames(enumerate(VOC_NAMES)), tuple(range(1, 21)), 0,
                           frozenset({255})),
        "ade": DatasetSpec("ade", SEMANTIC, ade_names, tuple(range(1, 151)), None, frozenset({0, 255})),
        "ade-inst": DatasetSpec("ade-inst", INSTANCE, ade_names.subset(ADE_THING_IDS), ADE_THING_IDS, None,
                                frozenset({0, 255})),
        "coco": DatasetSpec("coco", INSTANCE, ClassNames(COCO_NAMES), COCO_CISDQ_ORDER, None, frozenset({0, 255})),
        # ADE20K panoptic (Mask2Former's prepare_ade20k_pan_seg.py): the 150 SceneParse classes, the 100 of
        # ADE20K-instance are things; default order 1..150 (CoMFormer, ECLIPSE, BalConpas).
        "ade-pan": DatasetSpec("ade-pan", PANOPTIC, ade_names, tuple(range(1, 151)), None, frozenset({0}),
                               frozenset(ADE_THING_IDS)),
        # COCO panoptic: the 133 categories of panopticapi's panoptic_coco_categories.json (80 things, 53
        # stuff); default order ECLIPSE's order "c" (the only continual COCO panoptic protocol published).
        "coco-pan": DatasetSpec("coco-pan", PANOPTIC, ClassNames((c["id"], c["name"]) for c in coco_panoptic_categories()),
                                coco_panoptic_order(), None, frozenset({0}),
                                frozenset(c["id"] for c in coco_panoptic_categories() if c["isthing"])),
    })


@lru_cache(maxsize=1)
def coco_panoptic_categories() -> tuple[dict, ...]:
    """COCO 2017 panoptic categories (id, name, isthing) in panopticapi's order (80 things by id, then 53 stuff).

    Data copied from cocodataset/panopticapi ``panoptic_coco_categories.json`` (the ids and names of the
    COCO panoptic annotations) into ``protocols/coco_panoptic_categories.json``.
    """
    text = resources.files("protocols").joinpath("coco_panoptic_categories.json").read_text()
    return tuple(json.loads(text))


# ECLIPSE's COCO panoptic order "c" (clovaai/ECLIPSE configs/coco/panoptic-segmentation/continual_c.yaml,
# CONT.ORDER): value v = the v-th (1-based) category of coco_panoptic_categories(). 83-10 / 83-5 split it as
# 83 + 5 x 10 / 83 + 10 x 5. The literal code reads v as detectron2's 0-based contiguous id, which shifts
# every class by one and never trains 'person' (reference eclipse-balconpas A9): the harness uses the
# 1-based reading the authors intended (their config comment "NUM_CLASSES 134 # ADD BKG!").
ECLIPSE_COCO_ORDER_C = (
    1, 3, 10, 47, 58, 9, 88, 16, 126, 120, 17, 129, 35, 119, 59, 57, 54, 90, 75, 38, 80, 48, 131, 56, 95, 25, 43, 2,
    68, 110, 32, 14, 29, 11, 7, 52, 83, 102, 84, 73, 5, 45, 117, 93, 87, 46, 118, 34, 61, 19, 77, 111, 63, 98, 130,
    66, 79, 97, 33, 86, 127, 104, 64, 49, 36, 6, 91, 50, 112, 8, 65, 132, 92, 27, 122, 22, 51, 85, 115, 28, 89, 70,
    62, 12, 101, 108, 125, 123, 39, 81, 20, 40, 41, 114, 128, 74, 18, 99, 100, 60, 30, 124, 69, 37, 13, 23, 116,
    55, 26, 121, 71, 67, 106, 133, 42, 107, 105, 109, 82, 103, 76, 94, 24, 15, 78, 53, 21, 96, 72, 113, 44, 31, 4,
)


def coco_panoptic_order() -> tuple[int, ...]:
    """ECLIPSE's order "c" as native COCO category ids."""
    cats = coco_panoptic_categories()
    return tuple(int(cats[v - 1]["id"]) for v in ECLIPSE_COCO_ORDER_C)


REAL_DATASETS = ("voc", "ade", "ade-inst", "coco", "ade-pan", "coco-pan")
DATASETS = REAL_DATASETS + tuple(SYNTHETIC_DATASETS)


def synthetic_dataset(task: str = SEMANTIC, num_classes: int = DEFAULT_CLASSES) -> DatasetSpec:
    """The embedded synthetic dataset with ``num_classes`` classes (ids 1..K, 0 = void)."""
    by_task = {t: name for name, t in SYNTHETIC_DATASETS.items()}
    if task not in by_task:
        raise ConfigError(f"unknown task {task!r}", hint=f"use one of {', '.join(map(repr, by_task))}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"the synthetic dataset has 1..{MAX_CLASSES} classes, {num_classes} were asked for",
                          hint=f"choose a split with at most {MAX_CLASSES} classes in total")
    name = by_task[task]
    ids = tuple(range(1, num_classes + 1))
    if task == PANOPTIC:
        # synth-pan: one class in five is stuff (protocols.synthetic.stuff_ids), the rest things.
        stuff = stuff_ids(num_classes, default_stuff_classes(num_classes)) if num_classes > 1 else ()
        names = ClassNames((i, stuff_look(num_classes, len(stuff), i)[0] if i in stuff else synth_class(i).name)
                           for i in ids)
        return DatasetSpec(name, task, names, ids, None, frozenset({0}), frozenset(ids) - frozenset(stuff))
    names = ClassNames((i, synth_class(i).name) for i in ids)
    return DatasetSpec(name, task, names, ids, None, frozenset({0, 255}))


def dataset_spec(name: str, num_classes: int | None = None) -> DatasetSpec:
    """The spec of dataset ``name``; ``num_classes`` is K for the synthetic datasets (default 20)."""
    if name in SYNTHETIC_DATASETS:
        return synthetic_dataset(SYNTHETIC_DATASETS[name], DEFAULT_CLASSES if num_classes is None else num_classes)
    real = _real_datasets()
    if name not in real:
        raise ConfigError(f"unknown dataset {name!r}", hint=f"known datasets: {', '.join(DATASETS)}")
    spec = real[name]
    if num_classes is not None and num_classes != spec.num_classes:
        raise ConfigError(f"dataset {name!r} has {spec.num_classes} classes, not {num_classes}")
    return spec
