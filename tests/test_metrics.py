"""Metrics: hand-computed confusion matrices and IoU, AP against pycocotools, groups, continual aggregates."""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket

import numpy as np
import pandas as pd
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmark.errors import ConfigError, DataError
from benchmark.metrics import (
    average_incremental,
    class_groups,
    confusion_matrix,
    confusion_update,
    forgetting_per_class,
    index_lookup,
    index_to_native,
    instance_rows,
    iou_per_class,
    mask_ap,
    masks_to_coco_results,
    mean_forgetting,
    mean_iou,
    native_to_index,
    new_confusion,
    reduce_confusion,
    semantic_rows,
)
from protocols import Protocol, get_protocol
from protocols.datasets import dataset_spec


def toy_protocol(task: str = "semantic") -> Protocol:
    """4 synthetic classes in steps (1, 2), (3,), (4,)."""
    dataset = "synth" if task == "semantic" else "synth-inst"
    return Protocol(name="toy-2-1", dataset=dataset, task=task, mode="overlap", order="default",
                    steps=((1, 2), (3,), (4,)), class_names=dataset_spec(dataset, 4).class_names,
                    num_dataset_classes=4)


# ---------------------------------------------------------------------------------------------- confusion
def test_confusion_hand_computed_with_void_and_accumulation():
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 1, 255], [2, 1, 0]])
    expected = np.array([[2, 0, 0],
                         [0, 1, 1],
                         [0, 0, 1]])
    m = new_confusion(3)
    confusion_update(m, pred, target, 3)
    assert m.dtype == torch.int64
    np.testing.assert_array_equal(m.numpy(), expected)
    # accumulation, and uint8 label maps (target * N must not overflow in uint8)
    confusion_update(m, pred.to(torch.uint8), target.to(torch.uint8))
    np.testing.assert_array_equal(m.numpy(), 2 * expected)
    # IoU by hand: class 0: 2/2; class 1: TP 1, FN 1, FP 0 -> 1/2; class 2: TP 1, FP 1 -> 1/2
    np.testing.assert_allclose(iou_per_class(m), [1.0, 0.5, 0.5])
    assert mean_iou(m) == pytest.approx(2 / 3)


def test_iou_nan_for_class_without_ground_truth_even_if_predicted():
    pred = torch.tensor([0, 3, 1, 1])
    target = torch.tensor([0, 0, 1, 1])
    m = confusion_matrix(pred, target, num_classes=4)
    iou = iou_per_class(m)
    # class 0: TP 1, FN 1 (predicted as 3) -> 1/2; class 1: 2/2; class 2: nothing -> NaN; class 3: only FP -> NaN
    np.testing.assert_allclose(iou[:2], [0.5, 1.0])
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou(m) == pytest.approx(0.75)


def test_confusion_matches_independent_count_on_random_labels():
    rng = np.random.default_rng(0)
    n = 7
    target = rng.integers(0, n, size=(3, 20, 30))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, n, size=target.shape)
    m = new_confusion(n)
    for p, t in zip(pred, target):
        confusion_update(m, torch.from_numpy(p), torch.from_numpy(t))
    ref = np.zeros((n, n), dtype=np.int64)
    keep = target != 255
    np.add.at(ref, (target[keep], pred[keep]), 1)
    np.testing.assert_array_equal(m.numpy(), ref)


def test_confusion_rejects_labels_out_of_range_and_ignores_negatives():
    m = new_confusion(3)
    with pytest.raises(ValueError, match="prediction values \\[3\\]"):
        confusion_update(m, torch.tensor([3, 0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="target values \\[7\\]"):
        confusion_update(m, torch.tensor([1, 0]), torch.tensor([7, 0]))
    with pytest.raises(ValueError, match="shape"):
        confusion_update(m, torch.tensor([1, 0]), torch.tensor([1]))
    # -1 (unmapped native id) is not counted, and a wrong prediction on it does not matter
    confusion_update(m, torch.tensor([9, 2]), torch.tensor([-1, 2]))
    assert m.sum() == 1 and m[2, 2] == 1


def test_native_id_mapping_ade_like_ids():
    class_ids = [1, 2, 5]               # ADE-like: no class 0 (void), gaps
    labels = torch.tensor([[0, 1, 5], [255, 2, 9]])
    idx = native_to_index(labels, class_ids)
    np.testing.assert_array_equal(idx.numpy(), [[-1, 0, 2], [-1, 1, -1]])
    lut = index_lookup(class_ids)
    np.testing.assert_array_equal(native_to_index(torch.tensor([70000, -3, 5]), lut).numpy(), [-1, -1, 2])
    np.testing.assert_array_equal(index_to_native(torch.tensor([2, 0, 1]), class_ids).numpy(), [5, 1, 2])
    with pytest.raises(ValueError, match="duplicates"):
        index_lookup([1, 1])
    # native labels -> rows -> confusion
    pred = native_to_index(torch.tensor([1, 5, 5, 2]), lut)
    target = native_to_index(torch.tensor([1, 5, 0, 1]), lut)   # 0 = void
    m = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(m.numpy(), [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pred = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])[rank]
        target = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 255]])[rank]
        m = reduce_confusion(confusion_matrix(pred, target, 3))
        if rank == 0:
            np.save(path, m.numpy())
    finally:
        dist.destroy_process_group()


def test_confusion_sums_across_ddp_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "m.npy")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    both = confusion_matrix(torch.tensor([0, 1, 2, 2, 1, 1, 0, 2]), torch.tensor([0, 1, 1, 2, 1, 0, 0, 255]), 3)
    np.testing.assert_array_equal(np.load(out), both.numpy())
    # outside a process group it is the identity
    assert reduce_confusion(both.clone()).equal(both)


# ---------------------------------------------------------------------------------------------- AP
def _square(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


GT_MASKS = {  # (image, category) -> mask; category 3 has no ground truth
    (1, 1): _square((10, 10), (0, 5), (0, 5)),
    (2, 1): _square((10, 10), (5, 10), (5, 10)),
    (2, 2): _square((10, 10), (0, 5), (0, 10)),
}


@pytest.fixture
def gt_json(tmp_path):
    anns = []
    for i, ((image, cat), mask) in enumerate(GT_MASKS.items(), start=1):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append({"id": i, "image_id": image, "category_id": cat, "iscrowd": 0, "area": int(mask.sum()),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    # a crowd region of class 2: never counted as ground truth, never a false positive
    crowd = _square((10, 10), (8, 10), (0, 3))
    rle = mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))
    anns.append({"id": 99, "image_id": 1, "category_id": 2, "iscrowd": 1, "area": 6, "bbox": [0, 8, 3, 2],
                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    data = {"images": [{"id": 1, "width": 10, "height": 10, "file_name": "1.png"},
                       {"id": 2, "width": 10, "height": 10, "file_name": "2.png"}],
            "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    return path


def _dets(items):
    """items: (image, category, mask, score) -> COCO results through masks_to_coco_results."""
    out = []
    for image, cat, mask, score in items:
        out += masks_to_coco_results(image, [score], [cat], mask[None])
    return out


def _pycocotools_reference(gt_path, dets, cat):
    """AP, AP50, AP75 of one category straight from COCOeval.summarize()."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), iouType="segm")
        ev.params.catIds = [cat]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1], ev.stats[2]


def _assert_matches_pycocotools(gt_path, dets, result, cats):
    for c in cats:
        ref = _pycocotools_reference(gt_path, dets, c)
        assert (result[c]["ap"], result[c]["ap50"], result[c]["ap75"]) == pytest.approx(ref, abs=1e-12)


def test_ap_perfect_detections(gt_json):
    dets = _dets([(img, cat, m, 0.9) for (img, cat), m in GT_MASKS.items()])
    ap = mask_ap(gt_json, dets, [1, 2, 3])
    for c in (1, 2):
        assert (ap[c]["ap"], ap[c]["ap50"], ap[c]["ap75"]) == pytest.approx((1.0, 1.0, 1.0))
    assert [ap[c]["num_gt"] for c in (1, 2, 3)] == [2, 1, 0]   # the crowd region is not counted
    assert all(math.isnan(ap[3][k]) for k in ("ap", "ap50", "ap75"))
    _assert_matches_pycocotools(gt_json, dets, ap, (1, 2))


def test_ap_shifted_mask(gt_json):
    # class 2: 5x10 box shifted one row down -> IoU 40 / 60 = 0.667: matched at 0.50..0.65 only
    shifted = _square((10, 10), (1, 6), (0, 10))
    dets = _dets([(1, 1, GT_MASKS[1, 1], 0.9), (2, 1, GT_MASKS[2, 1], 0.8), (2, 2, shifted, 0.7)])
    ap = mask_ap(gt_json, dets, [1, 2])
    assert ap[2]["ap"] == pytest.approx(0.4)
    assert ap[2]["ap50"] == pytest.approx(1.0)
    assert ap[2]["ap75"] == pytest.approx(0.0)
    assert ap[1]["ap"] == pytest.approx(1.0)
    _assert_matches_pycocotools(gt_json, dets, ap, (1, 2))


def test_ap_false_positive_ranked_first(gt_json):
    # a confident class-1 false positive where image 2 has no class-1 object: precision 2/3 at every recall
    fp = _square((10, 10), (0, 3), (0, 3))
    dets = _dets([(2, 1, fp, 0.95), (1, 1, GT_MASKS[1, 1], 0.5), (2, 1, GT_MASKS[2, 1], 0.5),
                  (2, 2, GT_MASKS[2, 2], 0.5)])
    ap = mask_ap(gt_json, dets, [1, 2])
    assert ap[1]["ap"] == pytest.approx(2 / 3)
    assert ap[1]["ap50"] == pytest.approx(2 / 3)
    assert ap[2]["ap"] == pytest.approx(1.0)
    _assert_matches_pycocotools(gt_json, dets, ap, (1, 2))


def test_ap_missing_class_and_no_detections(gt_json):
    dets = _dets([(1, 1, GT_MASKS[1, 1], 0.9), (2, 1, GT_MASKS[2, 1], 0.9)])   # nothing for class 2
    ap = mask_ap(gt_json, dets, [1, 2, 3])
    assert ap[2]["ap"] == 0.0 and ap[2]["ap50"] == 0.0 and ap[2]["num_gt"] == 1
    assert math.isnan(ap[3]["ap"])
    _assert_matches_pycocotools(gt_json, dets, ap, (1, 2))
    # an empty result list (pycocotools cannot load one): 0 where there is ground truth, NaN elsewhere
    empty = mask_ap(gt_json, [], [1, 2, 3])
    assert [empty[c]["ap"] for c in (1, 2)] == [0.0, 0.0]
    assert math.isnan(empty[3]["ap75"])
    # default class list = every category of the json
    assert sorted(mask_ap(gt_json, dets)) == [1, 2, 3]


def test_ap_errors_name_the_problem(gt_json, tmp_path):
    with pytest.raises(DataError, match="not in the ground truth"):
        mask_ap(gt_json, _dets([(7, 1, GT_MASKS[1, 1], 0.9)]))
    with pytest.raises(DataError, match="do not exist"):
        mask_ap(tmp_path / "missing.json", [])
    with pytest.raises(DataError, match="lacks"):
        mask_ap(gt_json, [{"image_id": 1, "category_id": 1, "score": 0.3}])


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_masks_to_coco_results_round_trip():
    masks = np.stack([GT_MASKS[1, 1], GT_MASKS[2, 2]])
    res = masks_to_coco_results(np.int64(4), np.array([0.5, 0.25]), torch.tensor([1, 2]), torch.from_numpy(masks))
    back = json.loads(json.dumps(res))
    assert [(r["image_id"], r["category_id"], r["score"]) for r in back] == [(4, 1, 0.5), (4, 2, 0.25)]
    for r, m in zip(back, masks):
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]).astype(bool), m)
    assert masks_to_coco_results(1, [], [], np.zeros((0, 4, 4), bool)) == []


# ---------------------------------------------------------------------------------------------- groups
def test_groups_voc_background_convention():
    p = get_protocol("voc-15-1")
    g = class_groups(p, 2)
    assert g["base"] == tuple(range(0, 16))
    assert g["novel"] == (16, 17) and g["new"] == (17,)
    assert g["old"] == tuple(range(0, 17)) and g["seen"] == tuple(range(0, 18))
    ex = class_groups(p, 2, voc_background="exclude")
    assert ex["base"] == tuple(range(1, 16)) and ex["seen"] == tuple(range(1, 18)) and ex["new"] == (17,)
    g0 = class_groups(p, 0)
    assert g0["novel"] == () and g0["old"] == () and g0["new"] == g0["base"]
    ade = class_groups(get_protocol("ade-100-50"), 1, voc_background="exclude")   # no background: unchanged
    assert len(ade["base"]) == 100 and len(ade["seen"]) == 150
    with pytest.raises(ConfigError, match="background convention"):
        class_groups(p, 1, voc_background="maybe")
    with pytest.raises(ConfigError, match="steps 0..5"):
        class_groups(p, 6)


# ---------------------------------------------------------------------------------------------- continual
def test_forgetting_on_hand_made_sequence():
    scores = pd.DataFrame({1: [80.0, 60.0, 50.0], 2: [70.0, 75.0, 72.0],
                           3: [90.0, 40.0, 10.0],     # step-0 value predates the class: must be ignored
                           4: [0.0, 0.0, 30.0],
                           5: [np.nan, 20.0, 5.0]},   # no ground truth at step 0 only
                          index=pd.Index([0, 1, 2], name="step"))
    class_steps = {1: 0, 2: 0, 3: 1, 4: 2, 5: 0}
    f = forgetting_per_class(scores, class_steps)
    assert f.to_dict() == {1: 30.0, 2: 3.0, 3: 30.0, 5: 15.0}   # class 4 is learned at the final step
    assert mean_forgetting(f) == pytest.approx(78 / 4)
    assert mean_forgetting(f, [1, 2]) == pytest.approx(16.5)
    # forgetting measured at an intermediate step: class 3 is new there, class 5 has no earlier score
    mid = forgetting_per_class(scores, class_steps, final_step=1)
    assert mid[[1, 2]].to_dict() == {1: 20.0, 2: -5.0}
    assert math.isnan(mid[5]) and 3 not in mid.index


def test_average_incremental():
    assert average_incremental({0: 70.0, 1: 50.0, 2: 40.0}) == pytest.approx(160 / 3)
    assert math.isnan(average_incremental({0: 70.0, 2: 40.0}))            # step 1 missing
    assert math.isnan(average_incremental({0: 70.0, 1: 50.0}, num_steps=3))


# ---------------------------------------------------------------------------------------------- rows
def test_semantic_rows_from_confusion():
    p = toy_protocol()                                  # steps (1, 2), (3,), (4,)
    class_ids = [4, 3, 2, 1]                            # any row order works
    m = np.array([[0, 0, 0, 0],                         # class 4: no ground truth
                  [0, 3, 0, 1],                         # class 3
                  [0, 0, 2, 2],                         # class 2
                  [1, 0, 0, 5]])                        # class 1 (one pixel predicted as 4)
    rows = semantic_rows(matrix=m, class_ids=class_ids, protocol=p, method="finetune", seed=3, step=1)
    by_id = {r["class_id"]: r for r in rows}
    assert [r["class_id"] for r in rows] == [1, 2, 3, 4]
    assert by_id[1]["value"] == pytest.approx(100 * 5 / (6 + 8 - 5))
    assert by_id[2]["value"] == pytest.approx(100 * 2 / 4)
    assert by_id[3]["value"] == pytest.approx(100 * 3 / 4)
    assert math.isnan(by_id[4]["value"]) and by_id[4]["support"] == 0
    assert [by_id[c]["support"] for c in (1, 2, 3)] == [6, 4, 4]
    assert [by_id[c]["class_step"] for c in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert by_id[1]["class_name"] == p.name_of(1)
    assert {(r["method"], r["protocol"], r["seed"], r["step"], r["metric"]) for r in rows} == \
        {("finetune", "toy-2-1", 3, 1, "iou")}
    with pytest.raises(ValueError, match="lacks 1 class"):
        semantic_rows(matrix=m[:3, :3], class_ids=[4, 3, 2], protocol=p, method="x", seed=0, step=0)


def test_instance_rows_from_detections_and_per_class(gt_json):
    p = toy_protocol("instance")                        # classes 1..4; the json has 1..3
    dets = _dets([(1, 1, GT_MASKS[1, 1], 0.9), (2, 1, GT_MASKS[2, 1], 0.9)])
    with pytest.raises(ValueError, match="lacks 1 class"):
        instance_rows(protocol=p, method="cisdq", seed=0, step=2, per_class=mask_ap(gt_json, dets))
    rows = instance_rows(protocol=p, method="cisdq", seed=0, step=2, detections=dets, gt_json_path=gt_json)
    table = {(r["class_id"], r["metric"]): r for r in rows}
    assert len(rows) == 4 * 3
    assert table[1, "ap"]["value"] == pytest.approx(100.0) and table[1, "ap"]["support"] == 2
    assert table[2, "ap75"]["value"] == 0.0 and table[2, "ap75"]["support"] == 1
    assert math.isnan(table[4, "ap50"]["value"]) and table[4, "ap50"]["support"] == 0
    assert table[3, "ap"]["class_step"] == 1
