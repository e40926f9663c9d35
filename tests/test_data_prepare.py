"""``python -m benchmark.data.prepare``: layout checks, and downloads from local archives through file:// URLs."""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data import open_dataset
from benchmark.data.download import Source, download, extract
from benchmark.data.prepare import main, prepare
from benchmark.errors import DataError
from tests.test_data_writers import block_label, random_image, save_jpg, save_label


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CISDQ_BENCH_CACHE", str(tmp_path / "cache"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_voc_archives(folder: Path) -> tuple[Path, Path]:
    """A VOCtrainval-like tar (images + val.txt) and a SegmentationClassAug zip (with macOS junk)."""
    rng = np.random.default_rng(0)
    stage = folder / "stage"
    voc = stage / "VOCdevkit" / "VOC2012"
    stems = ["2007_000032", "2007_000039", "2008_000001", "2009_000010"]
    for k, stem in enumerate(stems):
        save_jpg(voc / "JPEGImages" / f"{stem}.jpg", random_image(rng, 20, 24))
        save_label(stage / "SegmentationClassAug" / f"{stem}.png", block_label([k + 1, 16]), palette=False)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n")
    tar_path = folder / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(stage / "VOCdevkit", arcname="VOCdevkit")
    zip_path = folder / "SegmentationClassAug.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for png in sorted((stage / "SegmentationClassAug").iterdir()):
            zf.write(png, f"SegmentationClassAug/{png.name}")
        zf.writestr("__MACOSX/SegmentationClassAug/._junk", b"junk")
    return tar_path, zip_path


def write_sources(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps(entries))
    return path


def voc_sources(folder: Path, tar_path: Path, zip_path: Path, tar_md5: str | None = None) -> Path:
    return write_sources(folder / "sources.json", {"voc": [
        {"file": tar_path.name, "url": tar_path.as_uri(), "md5": tar_md5 or md5(tar_path), "extract_to": ".",
         "provides": ["VOCdevkit/VOC2012/JPEGImages"]},
        {"file": zip_path.name, "url": zip_path.as_uri(), "md5": None, "extract_to": "VOCdevkit/VOC2012",
         "provides": ["VOCdevkit/VOC2012/SegmentationClassAug"],
         "expect_files": {"VOCdevkit/VOC2012/SegmentationClassAug": 4}},
    ]})


def test_check_lists_every_missing_part(tmp_path):
    lines = []
    assert prepare("voc", tmp_path / "data", out=lines.append) == 1
    text = "\n".join(lines)
    for part in ("VOCdevkit/VOC2012/JPEGImages", "SegmentationClassAug", "train_aug.txt", "val.txt", "--download"):
        assert part in text
    lines.clear()
    assert prepare("coco", tmp_path, out=lines.append) == 1
    assert sum("missing:" in line for line in lines) == 4
    lines.clear()
    assert prepare("ade-inst", tmp_path, out=lines.append) == 1
    assert any("ade20k_instance_val.json" in line for line in lines)


def test_voc_download_extract_and_train_aug_list(tmp_path):
    tar_path, zip_path = make_voc_archives(tmp_path / "archives")
    sources = voc_sources(tmp_path, tar_path, zip_path)
    root = tmp_path / "data"
    lines = []
    assert prepare("voc", root, download_missing=True, sources_path=sources, progress=False, out=lines.append) == 0
    assert lines[-1].startswith("voc: ok") and "train 3 images" in lines[-1] and "val 1 images" in lines[-1]
    assert any("no published checksum; sha256" in line for line in lines)
    train_aug = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert train_aug.read_text().split() == ["2007_000032", "2008_000001", "2009_000010"]
    assert not (root / "VOCdevkit" / "VOC2012" / "__MACOSX").exists()
    assert not (root / "downloads" / tar_path.name).exists()            # archives removed after extraction
    ds = open_dataset("voc", root, "train")
    assert ds.classes_in(2) == (0, 4, 16)
    # a second run has nothing to fetch
    lines.clear()
    assert prepare("voc", root, download_missing=True, sources_path=sources, progress=False, out=lines.append) == 0
    assert not any(line.startswith("fetching") for line in lines)


def test_download_resumes_a_partial_file(tmp_path):
    tar_path, _ = make_voc_archives(tmp_path / "archives")
    good = tar_path.read_bytes()
    expected = md5(tar_path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    half = len(good) // 2
    (downloads / (tar_path.name + ".part")).write_bytes(good[:half])
    # corrupt the source's first half: only a download that resumes at the offset gets the right file
    tar_path.write_bytes(b"x" * half + good[half:])
    source = Source(tar_path.name, tar_path.as_uri(), expected, ".", ())
    path = download(source, downloads, progress=False)
    assert path.read_bytes() == good and not (downloads / (tar_path.name + ".part")).exists()


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    tar_path, zip_path = make_voc_archives(tmp_path / "archives")
    sources = voc_sources(tmp_path, tar_path, zip_path, tar_md5="0" * 32)
    with pytest.raises(DataError, match=r"checksum mismatch for file://.*expected md5 0{32}, got " + md5(tar_path)):
        prepare("voc", tmp_path / "data", download_missing=True, sources_path=sources, progress=False, out=lambda s: None)
    assert list((tmp_path / "data" / "downloads").iterdir()) == []


def test_extract_refuses_entries_outside_the_target(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", b"x")
    with pytest.raises(DataError, match="outside the target folder"):
        extract(evil, tmp_path / "target")
    assert not (tmp_path / "outside.txt").exists()


def make_ade_instance_archives(folder: Path) -> tuple[Path, Path, dict]:
    """ADEChallengeData2016.zip (images, semantic PNGs) and annotations_instance.tar (R = Instance100 id, G = id)."""
    rng = np.random.default_rng(1)
    stage = folder / "stage"
    truth = {}
    for dirname, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        ade = stage / "ADEChallengeData2016"
        save_jpg(ade / "images" / dirname / f"{stem}.jpg", random_image(rng, 16, 20))
        save_label(ade / "annotations" / dirname / f"{stem}.png", block_label([13, 8], 16, 20), palette=False)
        png = np.zeros((16, 20, 3), np.uint8)
        png[1:6, 1:8] = (4, 1, 0)           # Instance100 #4 = person (13), instance 1
        png[8:14, 2:12] = (1, 2, 0)         # Instance100 #1 = bed (8), instance 2
        png[8:14, 14:19] = (100, 3, 0)      # Instance100 #100 = flag (150), instance 3
        inst_dir = stage / "annotations_instance" / dirname
        inst_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(png).save(inst_dir / f"{stem}.png")
        truth[stem] = {13: png[..., 1] == 1, 8: png[..., 1] == 2, 150: png[..., 1] == 3}
    zip_path = folder / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted((stage / "ADEChallengeData2016").rglob("*")):
            zf.write(path, path.relative_to(stage).as_posix())
    tar_path = folder / "annotations_instance.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(stage / "annotations_instance", arcname="annotations_instance")
    return zip_path, tar_path, truth


def test_ade_instance_download_and_json_conversion(tmp_path):
    zip_path, tar_path, truth = make_ade_instance_archives(tmp_path / "archives")
    sources = write_sources(tmp_path / "sources.json", {"ade-inst": [
        {"file": zip_path.name, "url": zip_path.as_uri(), "md5": md5(zip_path), "extract_to": ".",
         "provides": ["ADEChallengeData2016/images/training"]},
        {"file": tar_path.name, "url": tar_path.as_uri(), "md5": md5(tar_path), "extract_to": "ADEChallengeData2016",
         "provides": ["ADEChallengeData2016/annotations_instance/training"]},
    ]})
    root = tmp_path / "data"
    assert prepare("ade-inst", root, download_missing=True, sources_path=sources, progress=False,
                   out=lambda s: None) == 0
    raw = json.loads((root / "ADEChallengeData2016" / "ade20k_instance_val.json").read_text())
    assert raw["images"][0]["id"] == "ADE_val_00000001"
    assert sorted(a["category_id"] for a in raw["annotations"]) == [7, 12, 149]      # Mask2Former: id - 1
    ds = open_dataset("ade-inst", root, "train")
    assert ds.classes_in(0) == (8, 13, 150)
    for class_id, mask in ds.load(0)[1]:
        assert np.array_equal(mask, truth["ADE_train_00000001"][class_id])
    assert prepare("ade", root, out=lambda s: None) == 0                    # the semantic layout came along


def test_command_line_exit_codes_and_messages(tmp_path, capsys):
    assert main(["coco", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "coco: the layout under" in out and "instances_train2017.json" in out and "--download" in out
    (tmp_path / "broken.json").write_text("{")
    assert main(["voc", "--root", str(tmp_path), "--download", "--sources", str(tmp_path / "broken.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the archive list") and "hint:" in err


def make_ade_panoptic_archives(folder: Path) -> tuple[Path, Path, dict]:
    """ADE archives whose semantic maps hold stuff (wall 1, floor 4), things with instances (person 13, bed 8)
    and a thing without instance (chair 20); ``truth[stem]`` = the expected {(class, instance): mask}."""
    rng = np.random.default_rng(2)
    stage = folder / "stage"
    truth = {}
    for dirname, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        ade = stage / "ADEChallengeData2016"
        save_jpg(ade / "images" / dirname / f"{stem}.jpg", random_image(rng, 12, 16))
        semantic = np.zeros((12, 16), np.uint8)
        semantic[:6] = 1                  # wall
        semantic[6:] = 4                  # floor
        semantic[1:5, 1:5] = 13           # person (has an instance)
        semantic[8:11, 2:9] = 8           # bed (has an instance)
        semantic[1:4, 10:14] = 20         # chair without instance -> VOID
        semantic[11, 15] = 0              # unlabelled
        save_label(ade / "annotations" / dirname / f"{stem}.png", semantic, palette=False)
        png = np.zeros((12, 16, 3), np.uint8)
        png[1:5, 1:5] = (4, 1, 0)         # Instance100 #4 = person (13)
        png[8:11, 2:9] = (1, 2, 0)        # Instance100 #1 = bed (8)
        png[6:8, 12:16] = (1, 3, 0)       # a second bed, drawn over floor pixels
        inst_dir = stage / "annotations_instance" / dirname
        inst_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(png).save(inst_dir / f"{stem}.png")
        wall, floor = semantic == 1, (semantic == 4) & (png[..., 1] == 0)
        truth[stem] = {(1, 0): wall, (4, 0): floor, (13, 1): png[..., 1] == 1, (8, 2): png[..., 1] == 2,
                       (8, 3): png[..., 1] == 3}
    zip_path = folder / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted((stage / "ADEChallengeData2016").rglob("*")):
            zf.write(path, path.relative_to(stage).as_posix())
    tar_path = folder / "annotations_instance.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(stage / "annotations_instance", arcname="annotations_instance")
    return zip_path, tar_path, truth


def test_ade_panoptic_download_and_conversion(tmp_path):
    """Stuff from the semantic map, things from the instance map painted over it, thing pixels without an
    instance VOID, category ids 0..149 in the json (Mask2Former's converter) and 1..150 through the reader."""
    zip_path, tar_path, truth = make_ade_panoptic_archives(tmp_path / "archives")
    sources = write_sources(tmp_path / "sources.json", {"ade-pan": [
        {"file": zip_path.name, "url": zip_path.as_uri(), "md5": md5(zip_path), "extract_to": ".",
         "provides": ["ADEChallengeData2016/images/training"]},
        {"file": tar_path.name, "url": tar_path.as_uri(), "md5": None, "extract_to": "ADEChallengeData2016",
         "provides": ["ADEChallengeData2016/annotations_instance/training"]},
    ]})
    root = tmp_path / "data"
    assert prepare("ade-pan", root, out=lambda s: None) == 1
    assert prepare("ade-pan", root, download_missing=True, sources_path=sources, progress=False,
                   out=lambda s: None) == 0
    raw = json.loads((root / "ADEChallengeData2016" / "ade20k_panoptic_val.json").read_text())
    assert len(raw["categories"]) == 150 and sum(c["isthing"] for c in raw["categories"]) == 100
    assert raw["categories"][0] == {"id": 0, "name": "wall", "isthing": 0}
    assert sorted(s["category_id"] for s in raw["annotations"][0]["segments_info"]) == [0, 3, 7, 7, 12]
    for split, stem in (("train", "ADE_train_00000001"), ("val", "ADE_val_00000001")):
        ds = open_dataset("ade-pan", root, split)
        assert ds.classes_in(0) == (1, 4, 8, 13)
        target = ds.load(0)[1]
        got = {(s.category_id, s.id % 1000): target.ids == s.id for s in target.segments}
        assert got.keys() == truth[stem].keys()
        for key, mask in truth[stem].items():
            assert np.array_equal(got[key], mask), key
        covered = np.any(list(truth[stem].values()), axis=0)
        assert np.all(target.ids[~covered] == 0)          # the chair without instance and the unlabelled pixel
    png = root / "ADEChallengeData2016" / "ade20k_panoptic_val" / "ADE_val_00000001.png"
    first = png.read_bytes()
    (root / "ADEChallengeData2016" / "ade20k_panoptic_val.json").unlink()
    assert prepare("ade-pan", root, download_missing=True, sources_path=sources, progress=False,
                   out=lambda s: None) == 0
    assert png.read_bytes() == first                       # reproducible ids, byte for byte


def test_coco_panoptic_download_unpacks_the_png_zips(tmp_path):
    """panoptic_annotations_trainval2017.zip holds the jsons and the PNGs as zips inside annotations/."""
    from benchmark.data.panoptic import id_to_rgb, panoptic_json

    rng = np.random.default_rng(3)
    stage, archives = tmp_path / "stage", tmp_path / "archives"
    archives.mkdir()
    image_zips = []
    for split in ("train", "val"):
        save_jpg(stage / "images" / f"{split}2017" / "000000000139.jpg", random_image(rng, 10, 12))
        image_zip = archives / f"{split}2017.zip"
        with zipfile.ZipFile(image_zip, "w") as zf:
            zf.write(stage / "images" / f"{split}2017" / "000000000139.jpg", f"{split}2017/000000000139.jpg")
        image_zips.append(image_zip)
    ids = np.zeros((10, 12), np.int64)
    ids[:5] = 3 + 256 * 7                     # a person
    ids[5:] = 11                              # grass (stuff), id 11
    ids[0, 0] = 99                            # a crowd segment
    cats = [{"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
            {"id": 125, "name": "grass-merged", "isthing": 0, "supercategory": "plant"}]
    ann_zip = archives / "panoptic_annotations_trainval2017.zip"
    with zipfile.ZipFile(ann_zip, "w") as zf:
        for split in ("train", "val"):
            doc = panoptic_json([{"id": 139, "file_name": "000000000139.jpg", "height": 10, "width": 12}],
                                [{"image_id": 139, "file_name": "000000000139.png", "segments_info": [
                                    {"id": 3 + 256 * 7, "category_id": 1, "iscrowd": 0},
                                    {"id": 11, "category_id": 125, "iscrowd": 0},
                                    {"id": 99, "category_id": 1, "iscrowd": 1}]}], cats)
            zf.writestr(f"annotations/panoptic_{split}2017.json", json.dumps(doc))
            inner = stage / f"panoptic_{split}2017.zip"
            Image.fromarray(id_to_rgb(ids)).save(stage / "000000000139.png")
            with zipfile.ZipFile(inner, "w") as izf:
                izf.write(stage / "000000000139.png", f"panoptic_{split}2017/000000000139.png")
            zf.write(inner, f"annotations/panoptic_{split}2017.zip")
    sources = write_sources(tmp_path / "sources.json", {"coco-pan": [
        {"file": z.name, "url": z.as_uri(), "md5": md5(z), "extract_to": "coco", "provides": [f"coco/{z.stem}"]}
        for z in image_zips] + [
        {"file": ann_zip.name, "url": ann_zip.as_uri(), "md5": None, "extract_to": "coco",
         "provides": ["coco/annotations/panoptic_train2017.json"], "expect_files": {"coco/annotations": 4}}]})
    root = tmp_path / "data"
    lines = []
    assert prepare("coco-pan", root, download_missing=True, sources_path=sources, progress=False,
                   out=lines.append) == 0, lines
    ds = open_dataset("coco-pan", root, "val")
    assert ds.classes_in(0) == (1, 125)                    # the crowd segment is no class presence
    target = ds.load(0)[1]
    assert np.array_equal(target.ids, ids)
    assert {(s.id, s.category_id, s.iscrowd) for s in target.segments} == {(1795, 1, False), (11, 125, False),
                                                                          (99, 1, True)}
