"""The embedded synthetic dataset: determinism, layout, annotation consistency, appearance, atomic generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from benchmark.data import SynthSpec, ensure_synth, open_dataset
from benchmark.data import synth as synth_module
from benchmark.errors import ConfigError
from protocols.synthetic import synth_class

SMALL = SynthSpec(num_classes=6, seed=3, train_images=24, val_images=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensure_synth(SMALL, tmp_path_factory.mktemp("synth"), progress=False)


def test_layout_and_determinism(folder, tmp_path):
    base = folder / "ADEChallengeData2016"
    assert len(list((base / "images" / "training").glob("*.jpg"))) == 24
    assert len(list((base / "annotations" / "validation").glob("*.png"))) == 8
    assert json.loads((folder / "spec.json").read_text())["num_classes"] == 6
    again = ensure_synth(SMALL, tmp_path, progress=False)
    assert again.name == folder.name
    for rel in ("annotations/training/synth_train_000005.png", "images/validation/synth_val_000002.jpg",
                "synth_instance_train.json"):
        assert (again / "ADEChallengeData2016" / rel).read_bytes() == (base / rel).read_bytes()
    other = SynthSpec(num_classes=6, seed=4, train_images=24, val_images=8)
    assert other.folder_name != SMALL.folder_name
    img_a, _, _ = synth_module.draw_image(SMALL, "train", 0)
    img_b, _, _ = synth_module.draw_image(other, "train", 0)
    assert img_a.shape != img_b.shape or not np.array_equal(img_a, img_b)


def test_semantic_png_and_instance_json_agree(folder):
    base = folder / "ADEChallengeData2016"
    data = json.loads((base / "synth_instance_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 7))
    assert data["categories"][0]["name"] == synth_class(1).name
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in data["images"]:
        label = np.asarray(Image.open(base / "annotations" / "training" / image["file_name"].replace(".jpg", ".png")))
        assert label.shape == (image["height"], image["width"]) and 64 <= min(label.shape) <= max(label.shape) <= 96
        assert set(np.unique(label)) <= set(range(0, 7))
        rebuilt = np.zeros_like(label)
        for ann in by_image[image["id"]]:
            mask = mask_util.decode(ann["segmentation"]).astype(bool)
            assert mask.sum() == ann["area"] >= synth_module.MIN_PIXELS
            assert not rebuilt[mask].any()                      # visible instance masks do not overlap
            rebuilt[mask] = ann["category_id"]
        assert np.array_equal(rebuilt, label)
        assert (label == 0).any()                                  # stuff is void


def test_classes_look_like_the_catalogue():
    spec = SynthSpec(num_classes=20, seed=0, train_images=40, val_images=4)
    checked = 0
    for index in range(12):
        image, labels, instances = synth_module.draw_image(spec, "train", index)
        for class_id, mask in instances:
            cls = synth_class(class_id)
            if cls.texture == "solid" and mask.sum() > 60:
                mean = image[mask].mean(0)
                assert np.abs(mean - np.asarray(cls.rgb)).max() < 0.15 * 255, (class_id, mean, cls.rgb)
                checked += 1
    assert checked >= 3
    # every class leads at least images // K images (the deck)
    leads = [synth_module.draw_image(spec, "train", i)[2][0][0] for i in range(40)]
    assert sorted(set(leads)) == list(range(1, 21))


def test_open_dataset_reads_both_tasks(folder):
    root = folder.parent
    options = dict(num_classes=6, seed=3, train_images=24, val_images=8)
    sem = open_dataset("synth", root, "train", progress=False, **options)
    inst = open_dataset("synth-inst", root, "train", spec=SMALL, progress=False)
    assert sem.task == "semantic" and inst.task == "instance" and len(sem) == len(inst) == 24
    for i in range(len(sem)):
        assert sem.classes_in(i) == inst.classes_in(i)
    union = np.zeros(sem.load(3)[1].shape, bool)
    for class_id, mask in inst.load(3)[1]:
        assert (sem.load(3)[1][mask] == class_id).all()
        union |= mask
    assert np.array_equal(union, sem.load(3)[1] != 255)
    assert inst.coco_json_path.name == "synth_instance_train.json"
    assert sum(1 for i in range(len(sem)) for c in sem.classes_in(i) if c == 6) >= 24 // 6


def test_generation_is_atomic_and_reused(tmp_path, monkeypatch):
    spec = SynthSpec(num_classes=3, train_images=5, val_images=2)
    calls = []
    real_draw = synth_module.draw_image

    def dying_draw(s, split, index):
        if split == "val":
            raise KeyboardInterrupt("killed")
        calls.append(index)
        return real_draw(s, split, index)

    monkeypatch.setattr(synth_module, "draw_image", dying_draw)
    with pytest.raises(KeyboardInterrupt):
        ensure_synth(spec, tmp_path, progress=False)
    assert calls and not (tmp_path / spec.folder_name).exists()
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == []   # the temporary folder is gone too
    monkeypatch.setattr(synth_module, "draw_image", real_draw)
    folder = ensure_synth(spec, tmp_path, progress=False)
    monkeypatch.setattr(synth_module, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_synth(spec, tmp_path, progress=False) == folder


def test_default_root_is_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CISDQ_BENCH_CACHE", str(tmp_path))
    ds = open_dataset("synth", None, "val", num_classes=2, train_images=2, val_images=3, progress=False)
    assert len(ds) == 3 and str(ds.root).startswith(str(tmp_path / "synth"))


def test_spec_validation():
    with pytest.raises(ConfigError, match="num_classes"):
        SynthSpec(num_classes=151)
    with pytest.raises(ConfigError, match="min_size"):
        SynthSpec(min_size=100, max_size=90)
    with pytest.raises(ConfigError, match="unknown synthetic dataset option"):
        open_dataset("synth", None, "train", colour="red")
    with pytest.raises(ConfigError, match="min_things"):
        SynthSpec(min_things=4, max_things=3)


def test_min_things_makes_denser_images_and_leaves_the_default_alone():
    dense = SynthSpec(min_things=3, max_things=6, thing_scale=(0.15, 0.32))
    counts = {spec: [len(synth_module.draw_image(spec, "train", i)[2]) for i in range(60)]
              for spec in (SynthSpec(), dense)}
    assert max(counts[SynthSpec()]) <= 3 and min(counts[dense]) >= 2 and max(counts[dense]) <= 6
    assert np.mean(counts[dense]) > np.mean(counts[SynthSpec()]) + 1.5
    # min_things=1 stays out of the key, so the default keeps the cache folder and run config it had before.
    assert "min_things" not in SynthSpec().to_config() and dense.to_config()["min_things"] == 3
    assert dense.folder_name != SynthSpec(max_things=6, thing_scale=(0.15, 0.32)).folder_name


def test_synthetic_readers_decode_each_image_once_real_ones_per_call(folder, tmp_path, monkeypatch):
    """The small synthetic splits keep what they decode (benchmark.data.decoded); ADE re-reads its files."""
    from benchmark.data import semantic as semantic_module
    from tests.test_data_writers import write_ade

    reads = []
    real_read = semantic_module.read_image
    monkeypatch.setattr(semantic_module, "read_image", lambda path: reads.append(path) or real_read(path))
    sem = open_dataset("synth", folder.parent, "train", spec=SMALL, progress=False)
    first, again = sem.load_pair(3), sem.load_pair(3)
    assert first is again and len(reads) == 1
    image, label = first
    assert not image.flags.writeable and not label.flags.writeable      # a transform cannot alter later epochs
    with pytest.raises(ValueError):
        image[0, 0] = 0
    assert np.array_equal(image, real_read(reads[0]))

    write_ade(tmp_path / "ade", {"ADE_train_00000001": [7]}, {"ADE_val_00000001": [3]})
    ade = open_dataset("ade", tmp_path / "ade", "train", cache_dir=tmp_path / "cache")
    a, b = ade.load_pair(0), ade.load_pair(0)
    assert a is not b and len(reads) == 3 and not a[0].flags.writeable


def test_synthetic_panoptic_reader_keeps_decoded_targets(tmp_path):
    spec = SynthSpec(num_classes=6, seed=3, train_images=6, val_images=2, stuff_classes=1)
    pan = open_dataset("synth-pan", tmp_path, "train", spec=spec, progress=False)
    first = pan.load(2)
    assert pan.load(2) is first and not first[1].ids.flags.writeable and not first[0].flags.writeable
