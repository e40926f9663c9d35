"""Step image selection (overlap / disjoint) against MiB/PLOP's filter_images rule, and its on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.data import open_dataset, select_images, step_indices
from benchmark.data import selection as selection_module
from protocols import get_protocol
from tests.test_data_writers import write_ade, write_voc


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CISDQ_BENCH_CACHE", str(tmp_path / "cache"))


def mib_filter_images(label_sets, labels, labels_old, overlap):
    """A literal transcription of MiB's dataset/utils.py filter_images (labels = C_t, labels_old = O_t)."""
    labels = [c for c in labels if c != 0]
    labels_cum = labels + list(labels_old) + [0, 255]
    idxs = []
    for i, cls in enumerate(label_sets):
        if overlap:
            keep = any(x in labels for x in cls)
        else:
            keep = any(x in labels for x in cls) and all(x in labels_cum for x in cls)
        if keep:
            idxs.append(i)
    return idxs


def test_select_images_matches_mib_on_random_voc_images():
    rng = np.random.default_rng(0)
    protocol = get_protocol("voc-15-1")
    # what MiB's np.unique sees: classes, plus background 0 and void 255 on most images
    label_sets = []
    for _ in range(300):
        classes = set(rng.choice(np.arange(1, 21), size=rng.integers(1, 4), replace=False).tolist())
        label_sets.append(sorted(classes | ({0} if rng.random() < 0.9 else set()) | ({255} if rng.random() < 0.7 else set())))
    presence = [tuple(c for c in s if c != 255) for s in label_sets]   # what classes_in gives
    for t in range(protocol.num_steps):
        for mode, overlap in (("overlap", True), ("disjoint", False)):
            got = select_images(presence, protocol.new(t), protocol.seen(t), mode, background=0)
            expected = mib_filter_images(label_sets, list(protocol.new(t)), protocol.old(t), overlap)
            assert got == expected, (t, mode)


def test_selection_rules_by_hand():
    presence = [(0, 1), (0, 16), (0, 1, 16), (0, 16, 17), (0,), (0, 2, 20)]
    new, seen = (16,), tuple(range(17))
    assert select_images(presence, new, seen, "overlap", 0) == [1, 2, 3]
    # disjoint: old classes may be present (image 2), a future class (17) may not (image 3)
    assert select_images(presence, new, seen, "disjoint", 0) == [1, 2]
    # step 0 of VOC: background alone never selects an image
    assert select_images(presence, tuple(range(16)), tuple(range(16)), "overlap", 0) == [0, 2, 5]
    assert select_images(presence, tuple(range(16)), tuple(range(16)), "disjoint", 0) == [0]


def test_step_indices_on_a_voc_dataset_in_both_modes(tmp_path):
    train = {"i0": [1, 2], "i1": [16], "i2": [3, 16], "i3": [16, 20], "i4": [20], "i5": [5, 17]}
    write_voc(tmp_path, train, {"v": [1]})
    ds = open_dataset("voc", tmp_path, "train")
    overlap, disjoint = get_protocol("voc-15-1"), get_protocol("voc-15-1-disjoint")
    assert step_indices(ds, overlap, 0) == [0, 2, 5]
    assert step_indices(ds, disjoint, 0) == [0]
    assert step_indices(ds, overlap, 1) == [1, 2, 3]
    assert step_indices(ds, disjoint, 1) == [1, 2]
    assert step_indices(ds, overlap, 5) == [3, 4]
    assert step_indices(ds, disjoint, 5) == [3, 4]
    assert step_indices(ds, overlap.as_joint(), 0) == [0, 1, 2, 3, 4, 5]


def test_step_indices_on_ade_and_the_cache(tmp_path, monkeypatch):
    write_ade(tmp_path, {"a": [1, 120], "b": [101], "c": [150], "d": [55]}, {"v": [1]})
    ds = open_dataset("ade", tmp_path, "train")
    protocol = get_protocol("ade-100-10")
    assert step_indices(ds, protocol, 0) == [0, 3]
    assert step_indices(ds, protocol, 1) == [1]
    assert step_indices(ds, get_protocol("ade-100-10-disjoint"), 0) == [3]

    monkeypatch.setattr(selection_module, "select_images", lambda *a, **k: pytest.fail("selection recomputed"))
    assert step_indices(open_dataset("ade", tmp_path, "train"), protocol, 1) == [1]
