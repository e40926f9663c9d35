"""PQ / SQ / RQ (panopticapi's definition) on constructed cases with answers worked out by hand, and against
an independent mask-by-mask computation written here."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.metrics.pq import Segment, image_pq_stats, panoptic_scores, pq_from_stats
from benchmark.metrics.per_image import PER_IMAGE_METRICS, PerImageStats

CLASSES = [1, 2, 3]          # 1, 2 things; 3 stuff (the metric does not care)


def stats(gt, gt_segs, pred, pred_segs, classes=CLASSES):
    return image_pq_stats(np.asarray(gt), gt_segs, np.asarray(pred), pred_segs, classes)


def test_perfect_prediction():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]])
    segs = [Segment(1, 1), Segment(2, 1), Segment(3, 3)]
    s = stats(gt, segs, gt, segs)
    np.testing.assert_array_equal(s, [[2, 0, 1], [2, 0, 1], [0, 0, 0], [0, 0, 0]])
    scores = panoptic_scores(s)
    assert scores["pq"][0] == 100 and scores["sq"][2] == 100 and np.isnan(scores["pq"][1])   # class 2 absent


def test_split_segment_counts_one_match_and_one_false_positive():
    """GT: one 8-pixel segment. Prediction splits it 6 + 2: IoU 6/8 = 0.75 matches, the 2-pixel part is FP."""
    gt = np.ones((2, 4), np.int64)
    pred = np.array([[1, 1, 1, 1], [1, 1, 2, 2]])
    s = stats(gt, [Segment(1, 1)], pred, [Segment(1, 1), Segment(2, 1)])
    np.testing.assert_allclose(s[:, 0], [0.75, 1, 1, 0])
    # PQ = 0.75 / (1 + 0.5) = 50 %, SQ 75 %, RQ 66.7 %
    scores = panoptic_scores(s)
    assert scores["pq"][0] == pytest.approx(50.0) and scores["sq"][0] == pytest.approx(75.0)
    assert scores["rq"][0] == pytest.approx(200 / 3)


def test_merged_segments():
    """Two GT segments of 4 px merged into one 8 px prediction: IoU 4/8 = 0.5 is not > 0.5: 2 FN + 1 FP."""
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    pred = np.ones((2, 4), np.int64)
    s = stats(gt, [Segment(1, 1), Segment(2, 1)], pred, [Segment(1, 1)])
    np.testing.assert_array_equal(s[:, 0], [0, 0, 1, 2])
    assert panoptic_scores(s)["pq"][0] == 0


def test_void_pixels_leave_the_union_and_a_mostly_void_false_positive_is_ignored():
    # GT: segment 1 = left 4 px, the rest VOID (0). Prediction: 8 px covering segment 1 and the void.
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = np.ones((2, 4), np.int64)
    s = stats(gt, [Segment(1, 1)], pred, [Segment(1, 1)])
    # union = 8 + 4 - 4 - 4 (pred on void) = 4: IoU 1.
    np.testing.assert_allclose(s[:, 0], [1.0, 1, 0, 0])
    # A predicted class-2 segment lying 3/4 on void is not a false positive; 1/4 on void would be.
    gt2 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    pred2 = np.array([[0, 0, 2, 2], [0, 2, 0, 0], [0, 0, 0, 0]])
    s2 = stats(gt2, [Segment(1, 1)], pred2, [Segment(2, 2)])
    assert s2[2, 1] == 0
    pred3 = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [2, 2, 2, 0]])
    s3 = stats(gt2, [Segment(1, 1)], pred3, [Segment(2, 2)])
    assert s3[2, 1] == 1 and s3[3, 0] == 1          # class 2 FP, class 1 FN


def test_crowd_regions_are_ignored():
    """A crowd GT segment never matches; a prediction mostly on the crowd of its own class is no FP, one
    on another class's crowd is."""
    gt = np.array([[1, 1, 5, 5], [1, 1, 5, 5]])
    gt_segs = [Segment(1, 1), Segment(5, 1, iscrowd=True)]
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    s = stats(gt, gt_segs, pred, [Segment(1, 1), Segment(2, 1)])
    np.testing.assert_allclose(s[:, 0], [1.0, 1, 0, 0])     # the crowd-covering prediction is ignored
    s = stats(gt, gt_segs, pred, [Segment(1, 1), Segment(2, 2)])
    assert s[2, 1] == 1                                      # class 2 on class 1's crowd: FP


def test_missing_class_and_unknown_ids():
    gt = np.array([[1, 1], [2, 2]])
    s = stats(gt, [Segment(1, 1), Segment(2, 2)], np.zeros((2, 2), np.int64), [])
    np.testing.assert_array_equal(s[3, :2], [1, 1])        # both missed
    assert panoptic_scores(s)["pq"][0] == 0 and np.isnan(panoptic_scores(s)["pq"][2])
    with pytest.raises(ValueError, match="segment id 7"):
        stats(gt, [Segment(1, 1), Segment(2, 2)], np.full((2, 2), 7), [])


def independent_pq(images, classes):
    """Per-class PQ from boolean masks, written from the paper's definition (no offset trick, no shared code)."""
    iou = {c: 0.0 for c in classes}
    tp, fp, fn = ({c: 0 for c in classes} for _ in range(3))
    for gt, gt_segs, pred, pred_segs in images:
        gt_masks = {s.id: (gt == s.id, s) for s in gt_segs if (gt == s.id).any()}
        pred_masks = {s.id: (pred == s.id, s) for s in pred_segs if (pred == s.id).any()}
        void = gt == 0
        matched_gt, matched_pred = set(), set()
        for gid, (gm, gs) in gt_masks.items():
            if gs.iscrowd:
                continue
            for pid, (pm, ps) in pred_masks.items():
                if ps.category_id != gs.category_id:
                    continue
                inter = (gm & pm).sum()
                union = (gm | pm).sum() - (pm & void).sum()
                if union and inter / union > 0.5:
                    if gs.category_id in iou:
                        iou[gs.category_id] += inter / union
                        tp[gs.category_id] += 1
                    matched_gt.add(gid)
                    matched_pred.add(pid)
        crowd = {}
        for gid, (gm, gs) in gt_masks.items():
            if gs.iscrowd:
                crowd[gs.category_id] = gm
            elif gid not in matched_gt and gs.category_id in fn:
                fn[gs.category_id] += 1
        for pid, (pm, ps) in pred_masks.items():
            if pid in matched_pred or ps.category_id not in fp:
                continue
            ignored = (pm & void).sum() + (pm & crowd.get(ps.category_id, np.zeros_like(pm))).sum()
            if ignored / pm.sum() <= 0.5:
                fp[ps.category_id] += 1
    out = {}
    for c in classes:
        n = tp[c] + 0.5 * fp[c] + 0.5 * fn[c]
        out[c] = np.nan if tp[c] + fp[c] + fn[c] == 0 else 100 * iou[c] / n
    return out


def random_image(rng, h=12, w=14, classes=(1, 2, 3)):
    """Random blocky GT and a noisy prediction of it, with void and a crowd segment now and then."""
    gt = np.zeros((h, w), np.int64)
    segs, sid = [], 1
    for _ in range(rng.integers(1, 5)):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        gt[y:y + rng.integers(3, 7), x:x + rng.integers(3, 8)] = sid
        segs.append(Segment(sid, int(rng.choice(classes)), iscrowd=bool(rng.random() < 0.15)))
        sid += 1
    present = set(np.unique(gt).tolist())
    segs = [s for s in segs if s.id in present]
    pred = gt.copy()
    noise = rng.random((h, w)) < 0.15
    pred[noise] = rng.integers(0, sid + 1, noise.sum())
    pred_present = set(np.unique(pred).tolist()) - {0}
    pred_segs = [Segment(i, int(rng.choice(classes))) if rng.random() < 0.2 else
                 Segment(i, next((s.category_id for s in segs if s.id == i), int(rng.choice(classes))))
                 for i in sorted(pred_present)]
    return gt, segs, pred, pred_segs


def test_matches_an_independent_implementation_on_random_images():
    rng = np.random.default_rng(0)
    images = [random_image(rng) for _ in range(60)]
    total = sum(image_pq_stats(*img, CLASSES) for img in images)
    expected = independent_pq(images, CLASSES)
    got = pq_from_stats(*total)
    for k, c in enumerate(CLASSES):
        assert got[k] == pytest.approx(expected[c], nan_ok=True, abs=1e-9)


def test_per_image_statistics_feed_the_bootstrap_declaration():
    """pq/sq/rq are declared for per_image.npz; float iou sums are kept as float64."""
    names, score = PER_IMAGE_METRICS["pq"]
    assert names == ("iou_sum", "tp", "fp", "fn")
    arrays = {"iou_sum": np.array([[0.75, 0.0]]), "tp": np.array([[1, 0]]), "fp": np.array([[1, 0]]),
              "fn": np.array([[0, 0]])}
    st = PerImageStats(np.array([1]), np.array([1, 2]), arrays)
    assert st.arrays["iou_sum"].dtype == np.float64 and st.arrays["tp"].dtype == np.int64
    assert st.metrics() == ["pq", "sq", "rq"]
    np.testing.assert_allclose(score(*(st.arrays[n].sum(0) for n in names)), [50.0, np.nan])
