"""Readers on tiny datasets written in each real format, their presence cache and every error they raise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmark.data import open_dataset
from benchmark.data import semantic as semantic_module
from benchmark.errors import ConfigError, DataError
from tests.test_data_writers import (save_jpg, save_label, write_ade, write_ade_instance, write_coco, write_coco_json,
                                     write_voc)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CISDQ_BENCH_CACHE", str(folder))
    return folder


# ---- VOC --------------------------------------------------------------------------------------------
def test_voc_pascalvoc12_layout_palette_pngs(tmp_path, cache):
    labels = write_voc(tmp_path, {"2008_000002": [15, 3], "2007_000001": [20]}, {"2009_000005": [7]})
    ds = open_dataset("voc", tmp_path, "train")
    assert ds.task == "semantic" and len(ds) == 2
    # list-file order, not sorted order (MiB's step files index into train_aug.txt as written)
    assert [ds.image_id(i) for i in range(2)] == ["2008_000002", "2007_000001"]
    assert ds.classes_in(0) == (0, 3, 15)          # background 0 is a class, void 255 is not
    assert ds.classes_in(1) == (0, 20)
    image, target = ds.load(0)
    assert image.dtype == np.uint8 and image.shape == (20, 24, 3)
    assert target.dtype == np.int64 and np.array_equal(target, labels["2008_000002"])
    val = open_dataset("voc", tmp_path, "val")
    assert len(val) == 1 and val.classes_in(0) == (0, 7)


def test_voc_vocdevkit_layout_grayscale_and_mib_pairs(tmp_path, cache):
    labels = write_voc(tmp_path, {"a": [1], "b": [2, 5]}, {"c": [9]}, layout="VOCdevkit", palette=False, pairs=True)
    ds = open_dataset("voc", tmp_path, "train")
    assert [ds.image_id(i) for i in range(len(ds))] == ["a", "b"]
    assert ds.classes_in(1) == (0, 2, 5)
    assert np.array_equal(ds.load(1)[1], labels["b"])
    # a root that *is* the VOC folder works too
    assert len(open_dataset("voc", tmp_path / "VOCdevkit" / "VOC2012", "val")) == 1


# ---- ADE20K -----------------------------------------------------------------------------------------
def test_ade_raw_annotations_zero_becomes_void(tmp_path, cache):
    labels = write_ade(tmp_path, {"ADE_train_00000002": [150, 1], "ADE_train_00000001": [7]},
                       {"ADE_val_00000001": [3]})
    ds = open_dataset("ade", tmp_path, "train")
    assert [ds.image_id(i) for i in range(2)] == ["ADE_train_00000001", "ADE_train_00000002"]   # sorted
    assert ds.classes_in(1) == (1, 150)                  # 'other' (0) is void, never a class
    target = ds.load(1)[1]
    assert np.array_equal(target, labels["ADE_train_00000002"]) and (target == 255).any() and not (target == 0).any()


def test_ade_detectron2_annotations_are_shifted(tmp_path, cache):
    labels = write_ade(tmp_path, {"ADE_train_00000001": [1, 150]}, {"ADE_val_00000001": [2]}, detectron2=True)
    ds = open_dataset("ade", tmp_path, "train")
    assert ds.classes_in(0) == (1, 150)
    assert np.array_equal(ds.load(0)[1], labels["ADE_train_00000001"])


def test_ade_raw_folder_wins_over_detectron2(tmp_path, cache):
    write_ade(tmp_path, {"x": [4]}, {"y": [4]}, detectron2=True)
    write_ade(tmp_path, {"x": [5]}, {"y": [5]})
    assert open_dataset("ade", tmp_path, "train").classes_in(0) == (5,)


# ---- COCO and ADE20K-instance ----------------------------------------------------------------------------
def test_coco_polygons_rle_and_crowd(tmp_path, cache):
    truth = write_coco(tmp_path, {
        "train": {
            42: [(62, (1, 2, 10, 12), "polygon"), (1, (12, 3, 20, 9), "rle"), (18, (0, 0, 30, 20), "rle")],
            7: [(90, (3, 3, 8, 8), "rle-raw")],
        },
        "val": {5: [(2, (2, 2, 9, 9), "polygon")]},
    }, crowd={42: {2}})
    ds = open_dataset("coco", tmp_path, "train")
    assert ds.task == "instance" and len(ds) == 2
    assert [ds.image_id(i) for i in range(2)] == [7, 42]        # ordered by COCO image id
    assert ds.classes_in(1) == (1, 62)                            # the crowd 'dog' (18) does not count
    image, target = ds.load(1)
    assert image.shape == (24, 32, 3)
    assert [c for c, _ in target] == [c for c, _ in truth[42]]
    for (c, mask), (_, expected) in zip(target, truth[42]):
        assert mask.dtype == bool and np.array_equal(mask, expected)
    assert np.array_equal(ds.load(0)[1][0][1], truth[7][0][1])   # uncompressed RLE
    val = open_dataset("coco", tmp_path, "val")
    assert val.coco_json_path == tmp_path / "coco" / "annotations" / "instances_val2017.json"


def test_ade_instance_categories_are_shifted_by_one(tmp_path, cache):
    truth = write_ade_instance(tmp_path, {
        "train": {"ADE_train_00000001": [(13, (1, 1, 9, 9), "rle"), (150, (10, 2, 20, 12), "polygon")]},
        "val": {"ADE_val_00000001": [(8, (2, 2, 12, 10), "rle")]},
    })
    ds = open_dataset("ade-inst", tmp_path, "train")
    assert ds.image_id(0) == "ADE_train_00000001"
    assert ds.classes_in(0) == (13, 150)                             # SceneParse150 ids
    target = ds.load(0)[1]
    assert [c for c, _ in target] == [13, 150]
    assert all(np.array_equal(m, e) for (_, m), (_, e) in zip(target, truth["ADE_train_00000001"]))
    val = open_dataset("ade-inst", tmp_path, "val")
    converted = json.loads(val.coco_json_path.read_text())
    assert val.coco_json_path.is_relative_to(cache)
    assert converted["annotations"][0]["category_id"] == 8
    assert {c["id"] for c in converted["categories"]} == set(val.class_ids) and 150 in val.class_ids


# ---- presence cache -----------------------------------------------------------------------------------
def test_presence_is_cached_on_disk_and_invalidated_by_file_changes(tmp_path, cache, monkeypatch):
    write_ade(tmp_path, {"a": [3], "b": [4, 5]}, {"c": [1]})
    assert open_dataset("ade", tmp_path, "train").presence() == [(3,), (4, 5)]

    def no_read(path):
        raise AssertionError(f"label {path} was read again")

    monkeypatch.setattr(semantic_module, "read_label_raw", no_read)
    assert open_dataset("ade", tmp_path, "train").presence() == [(3,), (4, 5)]
    monkeypatch.undo()
    monkeypatch.setenv("CISDQ_BENCH_CACHE", str(cache))
    label_file = tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "b.png"
    save_label(label_file, np.full((20, 24), 9, np.uint8), palette=False)
    assert open_dataset("ade", tmp_path, "train").presence() == [(3,), (9,)]


def test_instance_presence_cache_avoids_parsing_the_json(tmp_path, cache, monkeypatch):
    write_coco(tmp_path, {"train": {1: [(3, (1, 1, 5, 5), "rle")]}, "val": {2: [(1, (1, 1, 5, 5), "rle")]}})
    open_dataset("coco", tmp_path, "train")
    from benchmark.data.instance import CocoFormatDataset

    monkeypatch.setattr(CocoFormatDataset, "_parse", lambda self: pytest.fail("json parsed again"))
    ds = open_dataset("coco", tmp_path, "train")
    assert len(ds) == 1 and ds.classes_in(0) == (3,) and ds.image_id(0) == 1


# ---- errors -------------------------------------------------------------------------------------------
def test_missing_root_names_expected_folders_and_prepare_command(tmp_path, cache):
    with pytest.raises(DataError) as err:
        open_dataset("voc", tmp_path / "nowhere", "train")
    text = str(err.value)
    assert "PascalVOC12" in text and "VOCdevkit/VOC2012" in text and "python -m benchmark.data.prepare voc" in text
    for name, folder in (("ade", "ADEChallengeData2016"), ("coco", "coco"), ("ade-inst", "ade20k_instance")):
        with pytest.raises(DataError) as err:
            open_dataset(name, tmp_path, "train")
        assert folder in str(err.value) and f"prepare {name}" in str(err.value)


def test_incomplete_layout_names_the_missing_parts(tmp_path, cache):
    write_voc(tmp_path, {"a": [1]}, {"b": [2]})
    (tmp_path / "PascalVOC12" / "splits" / "train_aug.txt").unlink()
    with pytest.raises(DataError, match="train_aug.txt"):
        open_dataset("voc", tmp_path, "train")
    write_ade(tmp_path, {"a": [1], "b": [2]}, {"c": [3]})
    (tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 annotation PNGs missing .*training: b\.png"):
        open_dataset("ade", tmp_path, "train")


def test_root_none_without_environment_is_a_clear_error(monkeypatch, cache):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(DataError, match="no data root"):
        open_dataset("ade", None, "val")


def test_unknown_dataset_split_and_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        open_dataset("cityscapes", tmp_path, "train")
    with pytest.raises(ConfigError, match="unknown split"):
        open_dataset("ade", tmp_path, "test")
    with pytest.raises(ConfigError, match="only apply to the synthetic"):
        open_dataset("ade", tmp_path, "train", num_classes=5)


def test_corrupt_image_and_label_name_the_file(tmp_path, cache):
    write_voc(tmp_path, {"a": [1], "b": [2]}, {"c": [3]})
    image = tmp_path / "PascalVOC12" / "JPEGImages" / "a.jpg"
    image.write_bytes(image.read_bytes()[:40])
    ds = open_dataset("voc", tmp_path, "train")
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg"):
        ds.load(0)
    label = tmp_path / "PascalVOC12" / "SegmentationClassAug" / "b.png"
    label.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read label map .*b\.png"):
        open_dataset("voc", tmp_path, "train").presence()


def test_label_values_outside_the_id_space_name_file_and_values(tmp_path, cache):
    write_voc(tmp_path, {"a": [1]}, {"c": [3]})
    save_label(tmp_path / "PascalVOC12" / "SegmentationClassAug" / "a.png", np.array([[0, 21, 40], [255, 1, 21]]),
               palette=True)
    ds = open_dataset("voc", tmp_path, "train")
    with pytest.raises(DataError, match=r"a\.png has values outside the voc id space: 21, 40"):
        ds.presence()
    with pytest.raises(DataError, match=r"21, 40"):
        ds.load(0)
    write_ade(tmp_path, {"x": [151]}, {"y": [1]})
    with pytest.raises(DataError, match=r"x\.png has values outside the ade id space: 151"):
        open_dataset("ade", tmp_path, "train").classes_in(0)


def test_rgb_label_map_is_refused(tmp_path, cache):
    write_voc(tmp_path, {"a": [1]}, {"c": [3]})
    Image.new("RGB", (24, 20), (128, 0, 0)).save(tmp_path / "PascalVOC12" / "SegmentationClassAug" / "a.png")
    with pytest.raises(DataError, match=r"a\.png is a RGB image; expected a palette or grayscale PNG"):
        open_dataset("voc", tmp_path, "train").load_label(0)


def test_image_and_label_of_different_size(tmp_path, cache):
    write_voc(tmp_path, {"a": [1]}, {"c": [3]})
    save_jpg(tmp_path / "PascalVOC12" / "JPEGImages" / "a.jpg", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataError, match=r"a\.jpg is 10x10 but its label map .*a\.png is 24x20"):
        open_dataset("voc", tmp_path, "train").load(0)


def test_coco_json_errors_name_the_file(tmp_path, cache):
    write_coco(tmp_path, {"train": {1: [(3, (1, 1, 5, 5), "rle")]}, "val": {2: [(1, (1, 1, 5, 5), "rle")]}})
    ann_file = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    good = ann_file.read_text()
    ann_file.write_text(good[:50])
    with pytest.raises(DataError, match=r"cannot read annotation file .*instances_train2017\.json"):
        open_dataset("coco", tmp_path, "train")
    data = json.loads(good)
    data["annotations"][0]["category_id"] = 77
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_train2017\.json has annotations with category ids outside its "
                                        r"categories: 77"):
        open_dataset("coco", tmp_path, "train")
    data = json.loads(good)
    data["categories"].append({"id": 95, "name": "nope"})
    ann_file.write_text(json.dumps(data))
    assert 95 not in open_dataset("coco", tmp_path, "train").class_ids      # declared but unused: harmless
    data["annotations"][0]["category_id"] = 95
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations with categories outside the coco id space: 95"):
        open_dataset("coco", tmp_path, "train")
    data = json.loads(good)
    data["images"][0]["file_name"] = "missing.jpg"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"1 images of instances_train2017\.json are missing .*missing\.jpg"):
        open_dataset("coco", tmp_path, "train")


def test_instance_json_without_image_sizes_reads_them_from_the_images(tmp_path, cache):
    truth = write_coco(tmp_path, {"val": {3: [(2, (1, 1, 6, 7), "polygon")]}, "train": {4: []}})
    ann_file = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    for image in data["images"]:
        del image["height"], image["width"]
    ann_file.write_text(json.dumps(data))
    image, target = open_dataset("coco", tmp_path, "val").load(0)
    assert image.shape == (24, 32, 3) and np.array_equal(target[0][1], truth[3][0][1])


def test_ade_instance_annotation_of_a_stuff_class_is_refused(tmp_path, cache):
    write_ade_instance(tmp_path, {"train": {"a": [(8, (1, 1, 5, 5), "rle")]}, "val": {"b": [(8, (1, 1, 5, 5), "rle")]}})
    ann_file = tmp_path / "ADEChallengeData2016" / "ade20k_instance_train.json"
    data = json.loads(ann_file.read_text())
    data["categories"].append({"id": 0, "name": "wall"})
    data["annotations"][0]["category_id"] = 0
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"outside the ade-inst id space: 0 \(native ids 1\)"):
        open_dataset("ade-inst", tmp_path, "train")


def test_coco_unreadable_segmentation_names_annotation(tmp_path, cache):
    folder = tmp_path / "coco"
    save_jpg(folder / "val2017" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    write_coco_json(folder / "annotations" / "instances_val2017.json",
                    [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 8}],
                    [{"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": "oops"}],
                    [{"id": 1, "name": "person"}])
    ds = open_dataset("coco", tmp_path, "val")
    with pytest.raises(DataError, match=r"annotation 11 of image 1 in .*instances_val2017\.json has an unreadable"):
        ds.load(0)
