"""Shared inference (semantic / instance) and the evaluation loop on constructed model outputs."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from torch import nn

from benchmark.batch import EvalSample
from benchmark.engine.evaluate import UNASSIGNED_ID, EvalResult, SemanticInference, evaluate
from benchmark.engine.inference import instance_inference, semantic_inference
from benchmark.engine.outputs import ModelOutputs
from protocols import get_protocol


# --- semantic_inference --------------------------------------------------------------------------
def _two_region_logits() -> torch.Tensor:
    """Mask logits [3, 6, 5] for a padded input of 24 x 20 whose valid region is 16 x 12.

    Query 0 is on in mask columns 0-1, query 1 (its mirror) in columns 2-4, query 2 only in the padding
    columns 3-4. Upsampled x4, query 0's logit at input columns 6, 7, 8 is 20, 0, -20.
    """
    logits = torch.empty(3, 6, 5)
    logits[0, :, :2], logits[0, :, 2:] = 30.0, -50.0
    logits[1] = -logits[0]
    logits[2, :, :3], logits[2, :, 3:] = -50.0, 50.0
    return logits


CLASS_PROBS = torch.tensor([[0.02, 0.03, 0.90, 0.05],      # query 0 -> column 2
                            [0.80, 0.05, 0.05, 0.10],      # query 1 -> column 0
                            [0.01, 0.02, 0.02, 0.95]])     # query 2 -> column 3 (padding only)


def test_semantic_inference_crops_padding_and_resizes_to_original():
    labels = semantic_inference(CLASS_PROBS, _two_region_logits(), input_size=(16, 12), out_size=(32, 24),
                                padded_size=(24, 20), mode="sum")
    assert labels.shape == (32, 24) and labels.dtype == torch.int64
    # Resizing 12 -> 24 columns: output columns 14 and 15 sample input columns 6.75 (+5) and 7.25 (-5).
    expected = torch.zeros(32, 24, dtype=torch.int64)
    expected[:, :15] = 2
    assert torch.equal(labels, expected)
    # Without the crop, query 2's padding region would reach the right part of the image.
    uncropped = semantic_inference(CLASS_PROBS, _two_region_logits(), input_size=(24, 20), out_size=(32, 24),
                                   mode="sum")
    assert (uncropped == 3).any()


def test_semantic_inference_resizes_the_class_score_maps_not_the_mask_logits():
    # Mask2Former's semantic configs: sigmoid and sum over queries at the input size, then the score maps
    # are resized. Input 1 x 2 -> output 1 x 4 samples input columns 0, 0.25, 0.75, 1 (bilinear, clamped).
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    logits = torch.tensor([[[20.0, -20.0]], [[-2.0, -2.0]]])        # query 1: a weak column-1 everywhere
    labels = semantic_inference(probs, logits, input_size=(1, 2), out_size=(1, 4), mode="sum")
    # column 0: 0.9 * (1, 0.75, 0.25, 0) + 0.1 * 0.119; column 1: 0.1 * (1, 0.75, 0.25, 0) + 0.9 * 0.119
    assert labels.tolist() == [[0, 0, 0, 1]]
    # Resizing the logits first would give sigmoid(-10) ~ 0 at the third pixel, i.e. column 1 there.


def test_semantic_inference_sums_over_queries():
    # Two weak queries of column 1 together beat one stronger query of column 0 (sum, not max).
    probs = torch.tensor([[0.6, 0.0], [0.0, 0.4], [0.0, 0.4]])
    logits = torch.full((3, 2, 2), 5.0)
    labels = semantic_inference(probs, logits, input_size=(8, 8), out_size=(8, 8), mode="sum")
    assert torch.equal(labels, torch.ones(8, 8, dtype=torch.int64))


def test_segment_inference_leaves_pixels_without_a_confident_segment_unassigned():
    # CoMFormer's MASK_BG False: query 0 (column 1, score 0.7) covers the left half; query 1 is no-object
    # (0.2 + 0.2 < 0.6) and is dropped although its mask covers everything; query 2 (column 0, 0.5) covers
    # the top row with a stronger mask than query 0 there; the bottom-right pixel has no mask >= 0.5.
    probs = torch.tensor([[0.1, 0.7], [0.2, 0.2], [0.5, 0.1]])
    logits = torch.full((3, 2, 2), -20.0)
    logits[0, :, 0] = 1.0                       # sigmoid 0.73 -> 0.7 * 0.73 = 0.51
    logits[1] = 20.0
    logits[2, 0, :] = 20.0                      # 0.5 * 1.0 = 0.5 < 0.51 at (0, 0); alone at (0, 1)
    labels = semantic_inference(probs, logits, input_size=(2, 2), out_size=(2, 2))
    assert labels.tolist() == [[1, 0], [1, -1]]
    # The arg-max over classes instead gives every pixel a class.
    assert (semantic_inference(probs, logits, input_size=(2, 2), out_size=(2, 2), mode="sum") >= 0).all()
    # A score threshold above 0.5 drops query 2 (CoMFormer's OBJECT_MASK_THRESHOLD).
    labels = semantic_inference(probs, logits, input_size=(2, 2), out_size=(2, 2), object_threshold=0.6)
    assert labels.tolist() == [[1, -1], [1, -1]]


def test_segment_inference_resizes_the_one_hot_map_with_unassigned_first():
    probs = torch.tensor([[0.9, 0.05]])
    logits = torch.tensor([[[20.0, -20.0]]])    # column 0 on the left input pixel only
    # one-hot [unassigned, col 0, col 1] resized 2 -> 4: col 0 weights 1, 0.75, 0.25, 0 -> ties impossible
    labels = semantic_inference(probs, logits, input_size=(1, 2), out_size=(1, 4))
    assert labels.tolist() == [[0, 0, -1, -1]]


# --- instance_inference --------------------------------------------------------------------------
def test_instance_inference_scores_by_hand():
    # Mask logits 2 x 2 -> input 8 x 8: columns of query 0 become [3, 3, 2, 0, -2, -4, -5, -5].
    logits = torch.empty(2, 2, 2)
    logits[0, :, 0], logits[0, :, 1] = 3.0, -5.0
    logits[1] = -2.0                                            # empty mask
    probs = torch.tensor([[0.9, 0.05], [0.1, 0.6]])
    scores, columns, masks = instance_inference(probs, logits, input_size=(8, 8), out_size=(8, 8), top_k=3)
    sig = torch.sigmoid
    mean_inside = (2 * sig(torch.tensor(3.0)) + sig(torch.tensor(2.0))) / 3
    # Top-3 pairs by class probability: (q0, c0) 0.9, (q1, c1) 0.6, (q1, c0) 0.1; query 1's mask is empty
    # (score 0) so both of its pairs are dropped.
    assert columns.tolist() == [0]
    torch.testing.assert_close(scores, (0.9 * mean_inside).reshape(1), rtol=1e-5, atol=1e-6)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:, :3] = True
    assert masks.dtype == torch.bool and torch.equal(masks[0], expected)
    # Pairs below the threshold go; at the original size (x2) the mask covers columns 0-6.
    scores, columns, masks = instance_inference(probs, logits, (8, 8), (16, 16), top_k=3, score_threshold=0.85)
    assert len(scores) == 0
    # top_k above Q x K keeps every pair: query 0 with both columns.
    scores, columns, masks = instance_inference(probs, logits, (8, 8), (16, 16), top_k=10)
    assert columns.tolist() == [0, 1] and masks.shape == (2, 16, 16)
    assert masks[0].sum(1).tolist() == [7] * 16 and torch.equal(masks[0], masks[1])


def test_instance_inference_orders_pairs_best_first():
    logits = torch.full((3, 2, 2), 4.0)                         # full masks, mean prob sigmoid(4)
    probs = torch.tensor([[0.2, 0.7], [0.5, 0.1], [0.3, 0.3]])
    scores, columns, masks = instance_inference(probs, logits, (8, 8), (8, 8), top_k=4)
    expected = torch.tensor([0.7, 0.5, 0.3, 0.3]) * torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(scores, expected)
    assert columns.tolist()[:2] == [1, 0] and sorted(columns.tolist()[2:]) == [0, 1]
    assert masks.all()


# --- evaluate ------------------------------------------------------------------------------------
class HalvesModel(nn.Module):
    """Predicts column 0 on input columns 0-3 (the left half of the 8-wide test images) and column 1 elsewhere
    (mask logits at input size); a fixed column, so the evaluation's padding to a multiple of 32 keeps it."""

    def __init__(self, num_columns: int):
        super().__init__()
        self.num_columns = num_columns
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, pixel_values, pixel_mask=None):
        batch, _, height, width = pixel_values.shape
        masks = torch.full((batch, 2, height, width), -20.0)
        masks[:, 0, :, :4] = 20.0
        masks[:, 1] = -masks[:, 0]
        logits = torch.full((batch, 2, self.num_columns + 1), -10.0)
        logits[:, 0, 0] = 10.0
        logits[:, 1, 1] = 10.0
        logits = logits * self.scale
        empty = torch.zeros(batch, 0)
        return ModelOutputs(layer_class_logits=[(logits,)], layer_mask_logits=[masks], layer_query_states=[empty],
                            backbone_features=(), mask_features=empty, group_queries=(slice(0, 2),),
                            group_columns=(slice(0, self.num_columns),))


def _semantic_samples(protocol):
    a, b, c = protocol.class_order[0], protocol.class_order[1], protocol.class_order[12]   # c: a step-1 class
    first = np.full((16, 16), c, dtype=np.int64)
    first[:8, :8] = a
    first[8:, :8] = 255
    second = np.full((4, 8), b, dtype=np.int64)
    second[0] = 0                                               # synthetic/ADE 0: not a class
    return [EvalSample(torch.zeros(3, 8, 8), "img1", (16, 16), first),
            EvalSample(torch.zeros(3, 4, 8), "img2", (4, 8), second)], (a, b, c)


def test_evaluate_semantic_confusion_matrix():
    protocol = get_protocol("synth-10-5@rand1")                 # permuted order: columns != native ids
    samples, (a, b, c) = _semantic_samples(protocol)
    model = HalvesModel(num_columns=len(protocol.seen(0))).train()
    result = evaluate(model, samples, protocol, step=0, device="cpu", task="semantic", progress=False)
    assert isinstance(result, EvalResult) and result.num_images == 2 and model.training
    assert result.class_ids == tuple(range(1, 21)) + (UNASSIGNED_ID,)     # the last: pixels left without a class
    row = {cid: i for i, cid in enumerate(result.class_ids)}
    expected = np.zeros((21, 21), dtype=np.int64)
    expected[row[a], row[a]] = 64                               # image 1, top-left quarter
    expected[row[c], row[b]] = 128                              # image 1, right half: unseen class c -> b
    expected[row[b], row[a]] = 12                               # image 2, rows 1-3, left half
    expected[row[b], row[b]] = 12
    assert result.matrix.dtype == np.int64
    np.testing.assert_array_equal(result.matrix, expected)


class ShapeRecorder(HalvesModel):
    def forward(self, pixel_values, pixel_mask=None):
        self.seen = getattr(self, "seen", []) + [tuple(pixel_values.shape[-2:])]
        return super().forward(pixel_values, pixel_mask)


def test_evaluate_pads_the_input_to_a_multiple_of_32_with_the_mean_colour():
    protocol = get_protocol("synth-10-5")
    target = np.full((40, 50), protocol.class_order[0], dtype=np.int64)
    sample = EvalSample(torch.ones(3, 40, 50), "img", (40, 50), target)
    model = ShapeRecorder(num_columns=10)
    result = evaluate(model, [sample], protocol, step=0, device="cpu", task="semantic", progress=False)
    assert model.seen == [(64, 64)]              # ImageList.from_tensors(size_divisibility=32)
    assert result.matrix.sum() == 40 * 50        # the padding is cropped off again


class LeftOnlyModel(HalvesModel):
    """As HalvesModel, but the right half's query predicts no-object: the inference leaves it unassigned."""

    def forward(self, pixel_values, pixel_mask=None):
        out = super().forward(pixel_values, pixel_mask)
        logits = out.layer_class_logits[-1][0].clone()
        logits[:, 1, :] = -10.0
        logits[:, 1, -1] = 10.0
        return ModelOutputs(layer_class_logits=[(logits,)], layer_mask_logits=out.layer_mask_logits,
                            layer_query_states=out.layer_query_states, backbone_features=(),
                            mask_features=out.mask_features, group_queries=out.group_queries,
                            group_columns=out.group_columns)


def test_evaluate_counts_unassigned_pixels_as_false_negatives_only():
    from benchmark.metrics import iou_per_class

    protocol = get_protocol("synth-10-5")
    a = protocol.class_order[0]
    target = np.full((8, 8), a, dtype=np.int64)
    sample = EvalSample(torch.zeros(3, 8, 8), "img", (8, 8), target)
    result = evaluate(LeftOnlyModel(num_columns=10), [sample], protocol, step=0, device="cpu", task="semantic",
                      progress=False)
    row = result.class_ids.index(a)
    assert result.matrix[row, row] == 32 and result.matrix[row, -1] == 32 and result.matrix.sum() == 64
    assert iou_per_class(result.matrix)[row] == pytest.approx(0.5)      # 32 / (32 + 0 FP + 32 FN)
    summed = evaluate(LeftOnlyModel(num_columns=10), [sample], protocol, step=0, device="cpu", task="semantic",
                      semantic=SemanticInference(mode="sum"), progress=False)
    assert summed.matrix[:, -1].sum() == 0                               # the arg-max always takes a class


def test_evaluate_refuses_a_model_with_the_wrong_number_of_columns():
    protocol = get_protocol("synth-10-5@rand1")
    samples, _ = _semantic_samples(protocol)
    with pytest.raises(ValueError, match="10 seen classes"):
        evaluate(HalvesModel(num_columns=15), samples, protocol, step=0, device="cpu", task="semantic",
                 progress=False)


def test_evaluate_instance_detections(tmp_path):
    protocol = get_protocol("synth-inst-10-5")
    sample = EvalSample(torch.zeros(3, 8, 8), 7, (8, 8), [])
    result = evaluate(HalvesModel(num_columns=10), [sample], protocol, step=0, device="cpu", task="instance",
                      top_k=2, progress=False)
    assert result.matrix is None and len(result.detections) == 2
    left = np.zeros((8, 8), dtype=bool)
    left[:, :4] = True
    probability = torch.softmax(torch.tensor([10.0] + [-10.0] * 10), 0)[0].item() * torch.sigmoid(
        torch.tensor(20.0)).item()
    for det, category, region in zip(result.detections, (1, 2), (left, ~left)):
        assert det["image_id"] == 7 and det["category_id"] == protocol.class_order[category - 1]
        np.testing.assert_array_equal(mask_utils.decode(det["segmentation"]).astype(bool), region)
        assert det["score"] == pytest.approx(probability, rel=1e-5)
    # AP against a ground truth holding the left half as column 0's class: perfect; column 1's class has none.
    rle = mask_utils.encode(np.asfortranarray(left.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    first, second = protocol.class_order[:2]
    gt = {"images": [{"id": 7, "height": 8, "width": 8}],
          "categories": [{"id": c, "name": str(c)} for c in protocol.all_classes],
          "annotations": [{"id": 1, "image_id": 7, "category_id": first, "segmentation": rle, "area": 32,
                           "bbox": [0, 0, 4, 8], "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ap = result.per_class_ap(path)
    assert set(ap) == set(protocol.all_classes)
    assert ap[first]["ap"] == pytest.approx(1.0) and np.isnan(ap[second]["ap"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: dict):
    torch.set_num_threads(1)          # a forked child must not enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        protocol = get_protocol("synth-10-5@rand1")
        samples, _ = _semantic_samples(protocol)
        samples = samples + [samples[0]]                        # 3 images over 2 ranks
        result = evaluate(HalvesModel(len(protocol.seen(0))), samples, protocol, 0, "cpu", "semantic",
                          progress=False)
        instance = evaluate(HalvesModel(10), [EvalSample(torch.zeros(3, 8, 8), i, (8, 8), []) for i in range(3)],
                            get_protocol("synth-inst-10-5"), 0, "cpu", "instance", top_k=2, progress=False)
        out[rank] = (result.num_images, result.matrix, sorted(d["image_id"] for d in instance.detections))
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_under_ddp_shards_and_sums():
    protocol = get_protocol("synth-10-5@rand1")
    samples, _ = _semantic_samples(protocol)
    single = evaluate(HalvesModel(len(protocol.seen(0))), samples + [samples[0]], protocol, 0, "cpu", "semantic",
                      progress=False)
    with mp.Manager() as manager:
        out = manager.dict()
        # fork: spawn would re-import this module in each worker (seconds on a small machine).
        mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
        results = dict(out)
    for rank in (0, 1):
        assert results[rank][0] == 3
        np.testing.assert_array_equal(results[rank][1], single.matrix)
    # Detections are gathered on rank 0 only: two per image, every image once.
    assert results[0][2] == [0, 0, 1, 1, 2, 2] and results[1][2] == []
