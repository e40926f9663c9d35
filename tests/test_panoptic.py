"""Panoptic task: COCO-panoptic readers on real files, training targets, Mask2Former's panoptic inference on
constructed logits, the synthetic panoptic dataset, and an end-to-end run whose stored predictions are
re-scored independently and compared class by class with metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from benchmark.config import parse_set_options
from benchmark.data import open_dataset
from benchmark.data.panoptic import id_to_rgb, read_id_png, rgb_to_id
from benchmark.data.synth import SynthSpec, draw_panoptic_image
from benchmark.engine.inference import panoptic_inference
from benchmark.errors import DataError
from benchmark.metrics.pq import Segment
from benchmark.runner import RunSpec, run_one
from benchmark.tasks.panoptic import training_targets
from protocols import get_protocol
from protocols.datasets import dataset_spec
from tests.test_pq import independent_pq


# ---- files in the real format ----------------------------------------------------------------------
def write_coco_panoptic(root: Path, split: str = "val") -> Path:
    """Two images: image 1 = person (thing, id 1) x2 + a crowd person + sky (stuff, id 187) + void;
    image 2 = only a crowd person and void."""
    folder = root / "coco"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / f"{split}2017").mkdir(exist_ok=True)
    (folder / f"panoptic_{split}2017").mkdir(exist_ok=True)
    ids1 = np.zeros((6, 8), np.int64)
    ids1[:2, :] = 300           # sky
    ids1[2:5, 0:3] = 11         # person a
    ids1[2:5, 4:7] = 12         # person b
    ids1[5, 0:4] = 13           # crowd person
    ids2 = np.zeros((4, 4), np.int64)
    ids2[1:3, 1:3] = 7          # crowd
    images, annotations = [], []
    for image_id, ids, segs in ((1, ids1, [(11, 1, 0), (12, 1, 0), (13, 1, 1), (300, 187, 0)]),
                                (2, ids2, [(7, 1, 1)])):
        name = f"{image_id:012d}"
        Image.fromarray(np.full((*ids.shape, 3), 120, np.uint8)).save(folder / f"{split}2017" / f"{name}.jpg")
        Image.fromarray(id_to_rgb(ids), mode="RGB").save(folder / f"panoptic_{split}2017" / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": [
            {"id": i, "category_id": c, "iscrowd": crowd, "area": int((ids == i).sum())} for i, c, crowd in segs]})
    categories = [{"id": 1, "name": "person", "isthing": 1}, {"id": 187, "name": "sky-other-merged", "isthing": 0}]
    path = folder / "annotations" / f"panoptic_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_rgb_ids_round_trip(tmp_path):
    ids = np.array([[0, 1, 255], [256, 65536, 256 ** 3 - 1]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(tmp_path / "x.png")
    assert np.array_equal(read_id_png(tmp_path / "x.png"), ids)


def test_coco_panoptic_reader_crowd_void_and_presence(tmp_path):
    write_coco_panoptic(tmp_path)
    ds = open_dataset("coco-pan", tmp_path, "val", cache_dir=tmp_path / "cache")
    assert ds.task == "panoptic" and len(ds) == 2 and ds.thing_ids == {1}
    assert ds.presence() == [(1, 187), ()]          # crowd segments are no presence
    image, target = ds.load(0)
    assert image.shape == (6, 8, 3) and target.ids.shape == (6, 8)
    assert {s.id: (s.category_id, s.iscrowd) for s in target.segments} == {
        11: (1, False), 12: (1, False), 13: (1, True), 300: (187, False)}
    # The presence table is cached: a second open reads it without parsing the json again.
    assert open_dataset("coco-pan", tmp_path, "val", cache_dir=tmp_path / "cache").presence() == ds.presence()
    # Training targets at a step with both classes: two person instances (crowd excluded) and one sky.
    masks, labels = training_targets(target, {1: 0, 187: 1}, ds.thing_ids)
    assert labels.tolist() == [0, 0, 1] and [int(m.sum()) for m in masks] == [9, 9, 16]
    # A step with only sky: old/future classes are unlabelled.
    masks, labels = training_targets(target, {187: 0}, ds.thing_ids)
    assert labels.tolist() == [0] and int(masks[0].sum()) == 16


def test_reader_errors_name_the_file(tmp_path):
    write_coco_panoptic(tmp_path)
    png = tmp_path / "coco" / "panoptic_val2017" / "000000000001.png"
    ds = open_dataset("coco-pan", tmp_path, "val", cache_dir=tmp_path / "cache")
    ids = np.zeros((6, 8), np.int64)
    ids[0, 0] = 999                                   # not listed in the json
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(png)
    with pytest.raises(DataError, match=r"000000000001\.png has segment id\(s\) \[999\]"):
        ds.load(0)
    png.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read panoptic PNG .*000000000001\.png"):
        ds.load(0)
    with pytest.raises(DataError, match="coco-pan under .* is incomplete"):
        open_dataset("coco-pan", tmp_path / "nothing", "val")


def test_ade_panoptic_ids_are_shifted_to_the_harness_ids(tmp_path):
    """Mask2Former's ADE converter writes category ids 0..149 (0 = wall): ade-pan reads them as 1..150."""
    base = tmp_path / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "ade20k_panoptic_val").mkdir()
    ids = np.array([[1, 1], [2, 0]])
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(base / "images" / "validation" / "ADE_val_1.jpg")
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(base / "ade20k_panoptic_val" / "ADE_val_1.png")
    doc = {"images": [{"id": "ADE_val_1", "file_name": "ADE_val_1.jpg", "height": 2, "width": 2}],
           "annotations": [{"image_id": "ADE_val_1", "file_name": "ADE_val_1.png", "segments_info": [
               {"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 12, "iscrowd": 0}]}],
           "categories": [{"id": 0, "name": "wall", "isthing": 0}, {"id": 12, "name": "person", "isthing": 1}]}
    (base / "ade20k_panoptic_val.json").write_text(json.dumps(doc))
    ds = open_dataset("ade-pan", tmp_path, "val", cache_dir=tmp_path / "cache")
    assert ds.presence() == [(1, 13)] and ds.thing_ids == {13}
    assert 13 in dataset_spec("ade-pan").thing_ids and 1 not in dataset_spec("ade-pan").thing_ids


# ---- inference -------------------------------------------------------------------------------------
def test_panoptic_inference_thresholds_stuff_merge_and_overlap():
    """4 queries on a 4x4 image, columns 0 (thing) and 1 (stuff)."""
    big = 10.0
    logits = torch.full((4, 4, 4), -big)
    logits[0, :2, :2] = big          # thing, top-left
    logits[1, :2, 2:] = big          # thing, top-right
    logits[2, 2:, :2] = big          # stuff, bottom-left
    logits[3, 2:, 2:] = big          # stuff again, bottom-right: merged with query 2
    probs = torch.tensor([[0.9, 0.05], [0.85, 0.0], [0.02, 0.95], [0.0, 0.9]])
    pred = panoptic_inference(probs, logits, (4, 4), (4, 4), thing_columns=[0])
    seg = pred.segment_ids
    assert pred.columns == (0, 0, 1) and pred.isthing == (True, True, False)
    assert seg[0, 0] == 1 and seg[0, 3] == 2 and seg[3, 0] == 3 and seg[3, 3] == 3
    # Object threshold: query 1's 0.85 is not > 0.86, its pixels stay without segment.
    pred = panoptic_inference(probs, logits, (4, 4), (4, 4), thing_columns=[0], object_mask_threshold=0.86)
    assert pred.columns == (0, 1) and int((pred.segment_ids == 0).sum()) == 4
    # Overlap threshold: a query whose mask is mostly won by a stronger one is dropped.
    logits[1] = big                   # query 1 now covers the whole image but wins only its quarter
    pred = panoptic_inference(probs, logits, (4, 4), (4, 4), thing_columns=[0])
    assert 0 not in [c for c, t in zip(pred.columns, pred.isthing) if t][1:]     # query 1 dropped
    assert pred.columns == (0, 1)
    # A query whose best class is no-object (1 - 0.3 - 0.3 = 0.4 > 0.3) is never kept.
    pred = panoptic_inference(torch.tensor([[0.3, 0.3]]), logits[:1], (4, 4), (4, 4), thing_columns=[0],
                              object_mask_threshold=0.0)
    assert pred.columns == ()


def test_panoptic_task_uses_comformer_and_eclipse_thresholds_by_default():
    """CoMFormer's and ECLIPSE's ADE panoptic configs (0.0 / 0.0): a query that is more likely its class than
    no-object is kept however unconfident; Mask2Former's / BalConpas's 0.8 (one --set away) drops it."""
    from benchmark.tasks.panoptic import PanopticInference

    default = PanopticInference()
    assert (default.object_mask_threshold, default.overlap_threshold) == (0.0, 0.0)
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :2, :2] = 10.0
    probs = torch.tensor([[0.6, 0.1]])              # no-object 0.3 < 0.6 < 0.8
    kwargs = dict(thing_columns=[0])
    pred = panoptic_inference(probs, logits, (4, 4), (4, 4), **kwargs,
                              object_mask_threshold=default.object_mask_threshold,
                              overlap_threshold=default.overlap_threshold)
    assert pred.columns == (0,) and int((pred.segment_ids == 1).sum()) == 4
    stock = PanopticInference(object_mask_threshold=0.8, overlap_threshold=0.8)
    pred = panoptic_inference(probs, logits, (4, 4), (4, 4), **kwargs,
                              object_mask_threshold=stock.object_mask_threshold,
                              overlap_threshold=stock.overlap_threshold)
    assert pred.columns == () and int(pred.segment_ids.sum()) == 0


# ---- the synthetic panoptic dataset ---------------------------------------------------------------
def test_synth_pan_is_deterministic_and_has_stuff_in_every_split():
    spec = SynthSpec(stuff_classes=4)
    a = draw_panoptic_image(spec, "train", 5)
    b = draw_panoptic_image(spec, "train", 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert (a[1] > 0).all()                          # no void: stuff fills the background
    p = get_protocol("synth-pan-10-5")
    things = dataset_spec("synth-pan", 20).thing_ids
    for step in p.steps:
        assert set(step) - things and set(step) & things   # stuff and things in base and increments
    assert SynthSpec().folder_name.startswith("synth-v1") and "stuff_classes" not in SynthSpec().to_config()


# ---- end to end ------------------------------------------------------------------------------------
TINY = {
    "synth": {"train_images": "30", "val_images": "6", "min_size": "32", "max_size": "40"},
    "step0": {"iterations": "60", "batch_size": "4", "crop_size": "32", "eval_size": "32"},
    "increment": {"iterations": "3", "batch_size": "2", "crop_size": "32", "eval_size": "32"},
    "joint": {"iterations": "4", "batch_size": "2", "crop_size": "32", "eval_size": "32"},
    "eval": {"object_mask_threshold": "0.0", "overlap_threshold": "0.0"},
}


def test_stored_predictions_rescore_to_metrics_csv(tmp_path):
    args = [f"{section}.{k}={v}" for section, kv in TINY.items() for k, v in kv.items()]
    frozen = RunSpec.freeze_overrides(parse_set_options(args))
    run_dir = run_one(RunSpec(method="finetune", protocol="synth-pan-10-5", out=str(tmp_path), overrides=frozen),
                      show_progress=False)
    run = json.loads((run_dir / "run.json").read_text())
    gt_doc = json.loads(Path(run["val_panoptic_json"]).read_text())
    gt_root = Path(run["val_panoptic_root"])
    metrics = pd.read_csv(run_dir / "metrics.csv")
    classes = list(get_protocol("synth-pan-10-5").class_order)
    predicted = 0
    for step in range(3):
        folder = run_dir / f"step_{step:02d}"
        pred_doc = json.loads((folder / "panoptic.json").read_text())
        pred_by_image = {a["image_id"]: a for a in pred_doc["annotations"]}
        predicted += sum(len(a["segments_info"]) for a in pred_doc["annotations"])
        assert len(pred_by_image) == len(gt_doc["annotations"]) == 6
        images = []
        for gt_ann in gt_doc["annotations"]:
            pred_ann = pred_by_image[gt_ann["image_id"]]
            gt_ids = rgb_to_id(np.asarray(Image.open(gt_root / gt_ann["file_name"])))
            pred_ids = rgb_to_id(np.asarray(Image.open(folder / "panoptic" / pred_ann["file_name"])))
            images.append((gt_ids, [Segment(s["id"], s["category_id"], bool(s["iscrowd"]))
                                    for s in gt_ann["segments_info"]],
                           pred_ids, [Segment(s["id"], s["category_id"]) for s in pred_ann["segments_info"]]))
        expected = independent_pq(images, classes)
        stored = metrics[(metrics.step == step) & (metrics.metric == "pq")].set_index("class_id")["value"]
        for c in classes:
            assert stored[c] == pytest.approx(expected[c], nan_ok=True, abs=1e-6), (step, c)
        with np.load(folder / "per_image.npz") as data:
            assert data["iou_sum"].dtype == np.float64 and data["tp"].shape == (6, 20)
    assert predicted > 0          # something was predicted (by step 0's 60 iterations at least)
    # a stored step read back (a shared step 0 reused by another run) stores the same artefacts again
    from benchmark.store import RunStore
    from benchmark.tasks import TASKS

    task, source = TASKS["panoptic"], RunStore(run_dir)
    result = task.stored_result(source, 0)
    copy = RunStore(tmp_path / "copy")
    copy.write_run_json({"method": "finetune", "protocol": "synth-pan-10-5", "seed": 0})
    task.store_step(copy, 0, result, val_ds=None, weights_path=None, extra={},
                    ident=dict(method="finetune", protocol=get_protocol("synth-pan-10-5"), seed=0))
    for name in ("panoptic.json", "metrics.csv", "per_image.npz"):
        assert (copy.step_dir(0) / name).read_bytes() == (source.step_dir(0) / name).read_bytes(), name
    pngs = sorted(p.name for p in (source.step_dir(0) / "panoptic").iterdir())
    assert pngs and pngs == sorted(p.name for p in (copy.step_dir(0) / "panoptic").iterdir())
