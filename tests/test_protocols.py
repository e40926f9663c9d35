"""The protocol registry against protocols.md and the original repositories' split definitions."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark.errors import ConfigError, UserError
from protocols import Protocol, available_protocols, describe_protocols, get_protocol
from protocols.datasets import ClassNames, dataset_spec
from protocols.synthetic import synth_class

NAMED_ORDERS = json.loads((Path(__file__).parents[1] / "protocols" / "named_orders.json").read_text())["splits"]

# protocols.md: the 100 ADE thing ids (SceneParse150 ids) and the CisDQ COCO order, copied literally.
ADE_THINGS = (8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43, 44, 45, 46,
              48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76, 77, 79, 81, 82, 83, 84,
              86, 87, 88, 89, 90, 91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109, 111, 112, 113, 116, 117, 119, 120,
              121, 122, 124, 125, 126, 127, 128, 130, 131, 133, 134, 135, 136, 137, 138, 139, 140, 143, 144, 145, 147,
              148, 149, 150)
COCO_ORDER = (1, 3, 62, 84, 44, 47, 67, 51, 10, 31, 28, 16, 9, 8, 15, 20, 52, 38, 4, 27, 64, 21, 46, 57, 49, 56, 60, 2,
              35, 86, 19, 32, 77, 55, 61, 37, 85, 33, 50, 42, 6, 53, 59, 72, 63, 75, 81, 41, 22, 18, 48, 24, 5, 25, 73,
              43, 88, 17, 7, 54, 65, 70, 40, 79, 39, 58, 76, 36, 34, 82, 74, 13, 90, 11, 78, 87, 23, 14, 80, 89)

# protocols.md table: name -> number of steps.
TABLE = {
    "voc-19-1": 2, "voc-15-5": 2, "voc-15-1": 6, "voc-10-1": 11, "voc-10-5-5": 3,
    "ade-100-50": 2, "ade-100-10": 6, "ade-100-5": 11, "ade-50-50": 3, "ade-50-10": 11, "ade-50-20": 6,
    "ade-inst-50-50": 2, "ade-inst-50-10": 6, "ade-inst-50-5": 11, "ade-inst-25-25": 4,
    "coco-40-40": 2, "coco-40-20": 3, "coco-40-8": 6, "coco-40-4": 11, "coco-60-20": 2,
}


def r(a: int, b: int) -> tuple[int, ...]:
    """Inclusive id range, as protocols.md writes them."""
    return tuple(range(a, b + 1))


def chunks(seq, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(tuple(seq[start:start + n]))
        start += n
    return tuple(out)


def raises_config(name: str) -> str:
    with pytest.raises(ConfigError) as info:
        get_protocol(name)
    assert isinstance(info.value, UserError)
    return str(info.value)


# ------------------------------------------------------------------------------------------- named protocols
@pytest.mark.parametrize("name,num_steps", TABLE.items())
def test_every_table_protocol_exists_with_its_step_count(name, num_steps):
    p = get_protocol(name)
    assert p.name == name and p.num_steps == num_steps and p.order == "default" and p.mode == "overlap"
    assert sorted(p.class_order) == list(dataset_spec(p.dataset).class_ids)


def test_voc_splits_match_mib_and_plop():
    assert get_protocol("voc-15-1").steps == (r(0, 15), (16,), (17,), (18,), (19,), (20,))
    assert get_protocol("voc-19-1").steps == (r(0, 19), (20,))
    assert get_protocol("voc-15-5").steps == (r(0, 15), r(16, 20))
    assert get_protocol("voc-10-1").steps == (r(0, 10),) + tuple((c,) for c in r(11, 20))
    assert get_protocol("voc-10-5-5").steps == (r(0, 10), r(11, 15), r(16, 20))
    assert get_protocol("voc-joint").steps == (r(0, 20),)


def test_ade_semantic_splits():
    assert get_protocol("ade-100-10").steps == (r(1, 100),) + tuple(r(a, a + 9) for a in range(101, 150, 10))
    assert get_protocol("ade-100-50").steps == (r(1, 100), r(101, 150))
    assert get_protocol("ade-50-50").steps == (r(1, 50), r(51, 100), r(101, 150))
    assert get_protocol("ade-100-5").steps[-1] == r(146, 150)
    assert get_protocol("ade-50-20").step_sizes == (50, 20, 20, 20, 20, 20)


def test_ade_instance_uses_the_thing_ids_in_ascending_order():
    p = get_protocol("ade-inst-50-10")
    assert p.task == "instance" and p.dataset == "ade-inst" and p.num_dataset_classes == 100
    assert p.steps == chunks(ADE_THINGS, (50, 10, 10, 10, 10, 10))
    assert (p.name_of(8), p.name_of(13), p.name_of(150)) == ("bed", "person", "flag")
    assert get_protocol("ade-inst-25-25").steps == chunks(ADE_THINGS, (25,) * 4)


def test_coco_uses_the_cisdq_order():
    p = get_protocol("coco-40-20")
    assert p.steps == chunks(COCO_ORDER, (40, 20, 20))
    assert p.class_order == COCO_ORDER
    assert (p.name_of(1), p.name_of(62), p.name_of(89)) == ("person", "chair", "hair drier")
    assert p.column(84) == 3            # book is the 4th class of CisDQ's order
    assert get_protocol("coco-40-4").steps[1] == (6, 53, 59, 72)


# ------------------------------------------------------------------------------------------- Protocol values
def test_derived_groups_of_voc_15_1():
    p = get_protocol("voc-15-1")
    assert p.new(0) == r(0, 15) and p.new(3) == (18,)
    assert p.old(0) == () and p.old(2) == r(0, 16)
    assert p.seen(2) == r(0, 17) and p.seen(5) == r(0, 20)
    assert p.base == r(0, 15) and p.novel == r(16, 20)
    assert p.step_of(0) == 0 and p.step_of(15) == 0 and p.step_of(19) == 4
    assert p.column(0) == 0 and p.column(17) == 17
    assert p.step_columns(0) == range(0, 16) and p.step_columns(4) == range(19, 20)
    assert p.background == 0 and p.ignore_ids == frozenset({255})
    assert p.name_of(0) == "background" and p.class_names[20] == "tvmonitor"
    assert p.all_classes == r(0, 20) and p.num_dataset_classes == 21


def test_class_order_defines_columns_in_a_named_order():
    p = get_protocol("voc-15-1@b")
    assert p.class_order[:4] == (0, 12, 9, 20)
    assert [p.column(c) for c in (0, 12, 17, 10)] == [0, 1, 16, 20]
    assert p.all_classes == r(0, 20)                      # ascending, unlike class_order
    assert p.step_of(10) == 5 and p.seen(1)[-1] == 17


def test_ade_has_no_background_and_ignores_0_and_255():
    p = get_protocol("ade-100-10")
    assert p.background is None and p.ignore_ids == frozenset({0, 255})
    assert p.old(1) == r(1, 100) and p.new(1) == r(101, 110) and p.seen(1) == r(1, 110)
    assert p.novel == r(101, 150) and p.name_of(150) == "flag" and p.name_of(1) == "wall"


def test_bad_step_or_class_is_a_config_error():
    p = get_protocol("voc-15-5")
    for bad in (2, -1, "1", 1.0):
        with pytest.raises(ConfigError, match="steps 0..1"):
            p.seen(bad)
    assert p.new(np.int64(1)) == r(16, 20)
    with pytest.raises(ConfigError, match="not a class of protocol 'voc-15-5'"):
        p.column(21)
    with pytest.raises(ConfigError):
        get_protocol("ade-100-50").step_of(0)      # ADE 0 is void, never a class


def test_protocols_are_frozen_hashable_and_picklable():
    p = get_protocol("ade-100-10")
    with pytest.raises(AttributeError):
        p.mode = "disjoint"
    q = pickle.loads(pickle.dumps(p))
    assert q == p and hash(q) == hash(p) and q.fingerprint == p.fingerprint
    assert len({p, q, get_protocol("ade-100-50")}) == 2
    assert isinstance(p.class_names, ClassNames) and p.class_names == {i: p.name_of(i) for i in r(1, 150)}


def test_to_dict_roundtrips_through_json():
    p = get_protocol("voc-15-1-disjoint@c")
    data = json.loads(json.dumps(p.to_dict()))
    assert data["steps"][0][0] == 0 and data["class_names"]["20"] == "tvmonitor" and data["mode"] == "disjoint"
    assert Protocol.from_dict(data) == p
    data["steps"][1], data["steps"][2] = data["steps"][2], data["steps"][1]
    with pytest.raises(ConfigError, match="fingerprint"):
        Protocol.from_dict(data)


@pytest.mark.parametrize("steps,problem", [
    ((r(0, 15), r(15, 20)), "class 15 appears in step 0 and again in step 1"),
    ((r(0, 15), r(16, 19)), r"classes \[20\] of 'voc' are in no step"),
    ((r(0, 15), r(16, 20), ()), "at least one class"),
    ((r(0, 15), r(16, 20) + (99,)), "class id 99, which is not a class of 'voc'"),
    ((r(1, 15), (0,) + r(16, 20)), "background 0 must be a class of step 0"),
])
def test_validation_rejects_bad_steps(steps, problem):
    with pytest.raises(ConfigError, match=problem):
        Protocol(name="bad", dataset="voc", task="semantic", mode="overlap", order="default", steps=steps,
                 class_names=dataset_spec("voc").class_names, num_dataset_classes=21)


def test_validation_rejects_bad_mode_task_and_names():
    ok = get_protocol("voc-15-5")
    fields = dict(name="x", dataset="voc", task="semantic", mode="overlap", order="default", steps=ok.steps,
                  class_names=ok.class_names, num_dataset_classes=21)
    for change, problem in (({"mode": "sequential"}, "mode"), ({"task": "instance"}, "semantic dataset"),
                            ({"class_names": dataset_spec("ade").class_names}, "class names differ")):
        with pytest.raises(ConfigError, match=problem):
            Protocol(**{**fields, **change})
    assert Protocol(**fields).fingerprint == ok.fingerprint


# ------------------------------------------------------------------------------------------- grammar and aliases
def test_any_dividing_combination_follows_the_grammar():
    p = get_protocol("ade-75-15")
    assert p.name == "ade-75-15" and p.steps == (r(1, 75),) + tuple(r(a, a + 14) for a in range(76, 151, 15))
    assert get_protocol("voc-12-2").steps == (r(0, 12), (13, 14), (15, 16), (17, 18), (19, 20))
    assert get_protocol("coco-20-30").steps == chunks(COCO_ORDER, (20, 30, 30))
    assert get_protocol("ade-inst-90-2").step_sizes == (90, 2, 2, 2, 2, 2)


def test_disjoint_sets_the_mode_only():
    overlap, disjoint = get_protocol("voc-15-1"), get_protocol("voc-15-1-disjoint")
    assert (overlap.mode, disjoint.mode) == ("overlap", "disjoint")
    assert disjoint.steps == overlap.steps and disjoint.name == "voc-15-1-disjoint"
    assert get_protocol("voc-15-1-overlap") == overlap
    assert get_protocol("coco-40-20-disjoint").mode == "disjoint"


def test_explicit_step_sizes_and_their_canonical_names():
    assert get_protocol("ade-100-30-20").steps == (r(1, 100), r(101, 130), r(131, 150))
    assert get_protocol("ade-100-10-10-10-10-10").name == "ade-100-10"
    assert get_protocol("voc-10-5-5-disjoint@rand2").name == "voc-10-5-5-disjoint@rand2"


@pytest.mark.parametrize("alias,canonical", [
    ("voc-15-5s", "voc-15-1"), ("voc-10-5", "voc-10-5-5"), ("ade-50", "ade-50-50"),
    ("voc-offline", "voc-joint"), ("coco-offline", "coco-joint"), ("synth-offline", "synth-joint"),
    ("voc-15-5s-disjoint@b", "voc-15-1-disjoint@b"), ("  VOC-15-1@B ", "voc-15-1@b"),
    ("ade-100-10@default", "ade-100-10"), ("voc-15-1@rand007", "voc-15-1@rand7"),
])
def test_aliases_return_the_canonical_protocol(alias, canonical):
    assert get_protocol(alias) == get_protocol(canonical)
    assert get_protocol(alias).name == canonical


# ------------------------------------------------------------------------------------------- orders
@pytest.mark.parametrize("name", sorted(NAMED_ORDERS))
def test_named_orders_are_the_json_lists_and_permutations(name):
    p = get_protocol(name)
    split, order = name.split("@")
    assert p.name == name and p.order == order
    assert p.steps == tuple(tuple(s) for s in NAMED_ORDERS[name])
    assert sorted(p.class_order) == list(dataset_spec(p.dataset).class_ids)
    assert p.step_sizes == get_protocol(split).step_sizes
    assert p.steps != get_protocol(split).steps


def test_named_order_spot_checks_against_the_original_task_files():
    # PLOP tasks.py 15-5s_b and MiB tasks.py 19-1b (baselines-original-code.md section 6.1).
    assert get_protocol("voc-15-1@b").steps == ((0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11),
                                                 (17,), (3,), (6,), (18,), (10,))
    assert get_protocol("voc-19-1@b").steps == ((0, 1, 2, 3, 4) + r(6, 20), (5,))
    b, c = get_protocol("ade-100-50@b"), get_protocol("ade-100-50@c")
    assert b.steps[1][:5] == (2, 4, 7, 11, 15) and c.steps[1][:5] == (2, 3, 4, 7, 15)
    assert available_protocols().count("voc-15-1@w") == 1 and "voc-15-1@x" not in available_protocols()


def test_rand_orders_are_seeded_permutations_of_the_non_background_classes():
    p = get_protocol("voc-15-1@rand3")
    expected = tuple(int(c) for c in np.random.default_rng(3).permutation(np.arange(1, 21)))
    assert p.steps == chunks((0,) + expected, (16, 1, 1, 1, 1, 1))
    assert p.steps[0][0] == 0 and p.order == "rand3" and p.name == "voc-15-1@rand3"
    assert get_protocol("voc-15-1@rand4").steps != p.steps
    ade = get_protocol("ade-100-10@rand0")
    assert sorted(ade.class_order) == list(r(1, 150)) and ade.step_sizes == (100,) + (10,) * 5
    assert ade.class_order == tuple(int(c) for c in np.random.default_rng(0).permutation(np.arange(1, 151)))
    coco = get_protocol("coco-40-40@rand1")   # permutes the sorted ids, not the CisDQ order
    assert coco.class_order == tuple(int(c) for c in np.random.default_rng(1).permutation(sorted(COCO_ORDER)))


def test_rand_orders_are_the_same_in_a_fresh_interpreter():
    code = "from protocols import get_protocol; print(get_protocol('ade-50-20@rand11').fingerprint)"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parents[1], env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert fresh.stdout.strip() == get_protocol("ade-50-20@rand11").fingerprint


# ------------------------------------------------------------------------------------------- joint and synthetic
def test_joint_derivation():
    p = get_protocol("voc-15-1@b~joint")
    assert p.name == "voc-15-1@b~joint" and p.num_steps == 1 and p.steps[0] == get_protocol("voc-15-1@b").class_order
    assert p.dataset == "voc" and p.mode == "overlap"
    assert get_protocol("voc-15-1~joint").fingerprint == get_protocol("voc-joint").fingerprint
    assert get_protocol("voc-15-1-disjoint~joint").fingerprint == get_protocol("voc-joint").fingerprint
    assert get_protocol("ade-joint").as_joint() is get_protocol("ade-joint")
    assert get_protocol("ade-inst-joint").steps == (ADE_THINGS,)
    assert get_protocol("coco-joint").steps == (COCO_ORDER,)


def test_synthetic_protocols_use_k_classes():
    p = get_protocol("synth-10-2")
    assert p.dataset == "synth" and p.task == "semantic" and p.num_dataset_classes == 20
    assert p.steps == (r(1, 10), (11, 12), (13, 14), (15, 16), (17, 18), (19, 20))
    assert p.background is None and p.ignore_ids == frozenset({0, 255})
    assert p.name_of(1) == synth_class(1).name
    assert get_protocol("synth-10-3").steps == (r(1, 10), r(11, 13), r(14, 16), r(17, 19), r(20, 22))
    assert get_protocol("synth-30-5").steps == (r(1, 30), r(31, 35))
    assert get_protocol("synth-10-5-5-5").steps == (r(1, 10), r(11, 15), r(16, 20), r(21, 25))
    inst = get_protocol("synth-inst-10-5")
    assert (inst.dataset, inst.task, inst.steps) == ("synth-inst", "instance", (r(1, 10), r(11, 15), r(16, 20)))
    joint = get_protocol("synth-joint")
    assert joint.steps == (r(1, 20),) and joint.num_dataset_classes == 20


def test_synthetic_catalogue_is_pairwise_distinct_with_a_solid_base_block():
    classes = [synth_class(k) for k in range(1, 151)]
    assert len({(c.shape, c.colour, c.texture) for c in classes}) == 150
    assert len({c.name for c in classes}) == 150
    # the texture tells the base block of the default synth-10-<i> (K = 20) from the classes the step-0 model
    # has not seen (a catalogue of twenty solid hues: step-0 base mIoU 47-50 instead of 87, README)
    assert all(c.texture == "solid" for c in classes[:10]) and all(c.texture != "solid" for c in classes[10:20])
    assert len({c.colour for c in classes[:10]}) == len({c.shape for c in classes[:10]}) == 10


def test_on_synthetic_keeps_the_step_structure_by_rank():
    voc = get_protocol("voc-15-1~synth")
    assert voc.name == "voc-15-1~synth" and voc.dataset == "synth" and voc.num_dataset_classes == 21
    assert voc.steps == (r(1, 16), (17,), (18,), (19,), (20,), (21,))
    assert voc.background is None and voc.name_of(21) == synth_class(21).name
    inst = get_protocol("ade-inst-50-10").on_synthetic()
    assert inst.dataset == "synth-inst" and inst.task == "instance" and inst.num_dataset_classes == 100
    assert inst.steps == chunks(r(1, 100), (50, 10, 10, 10, 10, 10))
    coco = get_protocol("coco-40-20~synth")
    rank = {c: i + 1 for i, c in enumerate(sorted(COCO_ORDER))}
    assert coco.class_order == tuple(rank[c] for c in COCO_ORDER) and coco.class_order[:3] == (1, 3, 57)
    ade = get_protocol("ade-100-5-disjoint@rand2~synth")
    assert ade.num_dataset_classes == 150 and ade.mode == "disjoint" and ade.order == "rand2"
    assert ade.class_order == get_protocol("ade-100-5@rand2").class_order   # ADE ids 1..150 are their own ranks
    assert get_protocol("synth-10-2").on_synthetic() is get_protocol("synth-10-2")
    assert get_protocol("voc-15-1~synth~joint").steps == get_protocol("voc-15-1~joint~synth").steps == (r(1, 21),)


# ------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_is_a_stable_literal():
    # Computed once; must not change across runs, machines or refactorings (results are keyed on it).
    assert get_protocol("voc-15-1").fingerprint == "cc081455cdc9eee286162d199e69bbb0740c135b7b42ec6b5a56ee133f268760"
    canonical = json.dumps({"dataset": "voc", "mode": "overlap", "steps": [list(r(0, 15))] + [[c] for c in r(16, 20)],
                            "task": "semantic"}, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest() == get_protocol("voc-15-1").fingerprint


def test_fingerprint_depends_on_the_splits_only():
    fps = {n: get_protocol(n).fingerprint for n in
           ("voc-15-1", "voc-15-1-disjoint", "voc-15-1@b", "voc-15-5", "voc-15-1~synth", "synth-15-1")}
    assert len(set(fps.values())) == 6          # synth-15-1 has 20 classes, voc-15-1~synth 21 (background kept)
    assert get_protocol("voc-15-5s").fingerprint == fps["voc-15-1"]
    same_shape = get_protocol("synth-16-1-1-1-1-1")      # explicit: synth-16-1 means 16 + 4 x 1 (K = 20)
    assert same_shape.name == "synth-16-1-1-1-1-1" and same_shape.fingerprint == fps["voc-15-1~synth"]
    assert get_protocol("synth-10-2").fingerprint != get_protocol("synth-inst-10-2").fingerprint


# ------------------------------------------------------------------------------------------- errors
def test_unknown_names_suggest_the_nearest():
    message = raises_config("vco-15-1")
    assert "voc-15-1" in message and "<dataset>-<base>-<increment>" in message
    assert "ade-100-10" in raises_config("ade-100-1O")
    assert "voc-15-1-disjoint" in raises_config("voc-15-1-disjont")
    assert "did you mean" in raises_config("coco-40")


@pytest.mark.parametrize("name,fragment", [
    ("voc-15-1~jiont", "'~jiont' is not a derivation"),
    ("voc-15-1@", "is not an order name"),
    ("voc-15-1@b@c", "is not an order name"),
    ("voc-0-5", "at least one class"),
    ("voc-joint-disjoint", "'-disjoint' does not apply"),
    ("ade-100-10@zz", "named orders of ade-100-10: @b, @c"),
    ("ade-100-5@b", "named orders exist for ade-100-10"),
    ("voc-15-3-3", "15+3+3 = 21 classes, but voc splits 20"),
    ("synth-100-60", "160 synthetic classes"),
    ("ade-150-10", "leaves no class"),
    ("imagenet-10-10", "does not start with a dataset name"),
])
def test_malformed_names_are_config_errors(name, fragment):
    assert fragment in raises_config(name)


def test_non_dividing_increment_lists_the_valid_ones():
    message = raises_config("voc-15-4")
    assert "the 5 voc classes after a base of 15 cannot be split into steps of 4" in message
    assert "increments that divide 5: 1, 5" in message and "voc-15-5" in message
    assert "1, 2, 5, 10, 25, 50" in raises_config("ade-inst-50-7")


def test_non_string_names_are_config_errors():
    for bad in (None, 15, "", "   "):
        with pytest.raises(ConfigError):
            get_protocol(bad)


# ------------------------------------------------------------------------------------------- listing
def test_available_protocols_are_sorted_canonical_and_buildable():
    names = available_protocols()
    assert names == sorted(set(names)) and set(TABLE) <= set(names) and set(NAMED_ORDERS) <= set(names)
    assert {"synth-10-2", "synth-10-5", "synth-inst-10-2", "synth-joint", "voc-joint", "ade-joint"} <= set(names)
    assert all(get_protocol(n).name == n for n in names)
    assert available_protocols() is not names                          # computed on call


def test_describe_protocols_rows():
    rows = {row["name"]: row for row in describe_protocols()}
    assert set(rows) == set(available_protocols())
    assert rows["voc-15-1"] == {"name": "voc-15-1", "dataset": "voc", "task": "semantic", "mode": "overlap",
                                "order": "default", "steps": [list(r(0, 15)), [16], [17], [18], [19], [20]],
                                "num_steps": 6, "classes": 21, "num_classes": 21, "sizes": "16+1x5",
                                "aliases": "voc-15-5s"}
    assert json.loads(json.dumps(rows["voc-15-1"])) == rows["voc-15-1"]
    assert rows["ade-100-50"]["sizes"] == "100+50" and rows["coco-joint"]["aliases"] == "coco-offline"
    assert rows["ade-inst-50-5"]["task"] == "instance" and rows["ade-inst-50-5"]["classes"] == 100
