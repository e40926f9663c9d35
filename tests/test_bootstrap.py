"""Uncertainty: per-image statistics, the paired bootstrap on constructed data with known answers, the report's
intervals recomputed independently from per_image.npz, significance, table marks, class orders (--orders)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.cli import build_parser, specs_from_args
from benchmark.errors import ConfigError
from benchmark.metrics import confusion_matrix, iou_per_class
from benchmark.metrics.continual import forgetting_per_class, mean_forgetting
from benchmark.metrics.per_image import PerImageStats, SemanticPerImage, check_against_confusion, iou_from_counts
from benchmark.report import ReportOptions, final_table, write_report
from benchmark.report.bootstrap import (BootstrapConfig, combine_units, forgetting, group_means, percentile_interval,
                                        resample_weights, resampled_class_scores, significant)
from benchmark.report.orders import order_name, split_name, splits_with_orders
from benchmark.store import RunStore, semantic_rows
from protocols import Protocol
from protocols.datasets import dataset_spec
from tests.test_report import toy_protocol, write_hand_run

QUICK = ReportOptions(plots=False, resamples=200)
IOU = iou_from_counts


# ---------------------------------------------------------------------------------------------- per image
def test_per_image_counts_sum_to_the_confusion_matrix_and_round_trip(tmp_path):
    rng = torch.Generator().manual_seed(0)
    collector, total = SemanticPerImage([1, 2, 3]), torch.zeros(3, 3, dtype=torch.int64)
    for i in range(5):
        target = torch.randint(-1, 3, (7, 9), generator=rng)       # -1 = void
        pred = torch.randint(0, 3, (7, 9), generator=rng)
        m = confusion_matrix(pred, target, 3)
        total += m
        collector.add(f"img{i}", m)
    stats = collector.result()
    check_against_confusion(stats, total.numpy())
    assert stats.image_ids.tolist() == [f"img{i}" for i in range(5)] and stats.class_ids.tolist() == [1, 2, 3]
    # one image's counts are its own confusion matrix's diagonal / column / row sums
    assert stats.arrays["tp"].shape == (5, 3) and (stats.arrays["tp"] + stats.arrays["fn"]).sum() == total.sum()

    protocol = Protocol(name="toy-3", dataset="synth", task="semantic", mode="overlap", order="default",
                        steps=((1, 2, 3),), class_names=dataset_spec("synth", 3).class_names, num_dataset_classes=3)
    store = RunStore(tmp_path / "run")
    rows = semantic_rows(matrix=total, class_ids=[1, 2, 3], protocol=protocol, method="m", seed=0, step=0)
    store.write_step(0, confusion=(total, [1, 2, 3]), per_image=stats, metrics_rows=rows)
    back = store.read_per_image(0)
    assert back.image_ids.tolist() == stats.image_ids.tolist()
    assert all(np.array_equal(back.arrays[k], stats.arrays[k]) for k in ("tp", "fp", "fn"))
    assert store.step_result(0).per_image is not None
    # IoU from the summed counts = IoU of the confusion matrix = metrics.csv
    summed = IOU(*(back.arrays[k].sum(0) for k in ("tp", "fp", "fn")))
    np.testing.assert_allclose(summed, 100 * iou_per_class(total.numpy()))
    np.testing.assert_allclose(summed, store.read_metrics().sort_values("class_id")["value"])
    # counts that do not add up to the matrix are refused, and nothing is marked done
    bad = PerImageStats(stats.image_ids, stats.class_ids, {**stats.arrays, "tp": stats.arrays["tp"] + 1})
    with pytest.raises(ValueError, match="sums differ"):
        store.write_step(1, confusion=(total, [1, 2, 3]), per_image=bad, metrics_rows=[])
    assert not store.is_done(1)


def test_per_image_rows_are_gathered_in_loader_order():
    collector = SemanticPerImage([1, 2])
    parts = []
    for rank in (1, 0):            # rank r evaluated images r, r + 2, ...
        c = SemanticPerImage([1, 2])
        for i in range(rank, 5, 2):
            c.add(i * 10, torch.tensor([[i, 0], [0, 1]]), position=i)
        parts.append(c.parts())
    stats = collector.result(parts)
    assert stats.image_ids.tolist() == [0, 10, 20, 30, 40] and stats.arrays["tp"][:, 0].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- bootstrap
def counts(rng, n_images=60, n_classes=6, quality=0.7, difficulty=None):
    """Stacked tp | fp | fn [N, 3K]; ``difficulty`` [N] scales every method's errors on an image alike."""
    gt = rng.integers(50, 500, (n_images, n_classes)) * (rng.random((n_images, n_classes)) < 0.6)
    q = np.clip(quality - (0 if difficulty is None else difficulty[:, None]), 0.02, 0.98)
    tp = (gt * q).astype(np.int64)
    fp = (gt * (1 - q) * 0.5).astype(np.int64)
    return np.concatenate([tp, fp, gt - tp], axis=1)


def groups_of(stacked, weights, n_classes):
    scores = resampled_class_scores(stacked, weights, IOU, 3)
    return group_means(scores, np.ones((1, n_classes), bool))[:, 0]


def test_identical_methods_are_not_significant_and_a_better_method_everywhere_is():
    rng = np.random.default_rng(0)
    a = counts(rng)
    w = resample_weights(len(a), 500, np.random.default_rng(1))
    base = groups_of(a, w, 6)
    same = groups_of(a.copy(), w, 6)
    low, high = percentile_interval(same - base)
    assert low <= 0 <= high and significant(low, high) is False
    better = a.copy()                           # every image: 10 % of each class's misses become hits
    k = 6
    moved = better[:, 2 * k:] // 10
    better[:, :k] += moved
    better[:, 2 * k:] -= moved
    low, high = percentile_interval(groups_of(better, w, 6) - base)
    assert low > 0 and significant(low, high) is True
    assert significant(float("nan"), 1.0) is None


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0, 0.6, 80)        # shared by both methods: hard images are hard for both
    a = counts(rng, 80, 6, 0.8, difficulty)
    b = a.copy()
    b[:, :6] = (a[:, :6] * 0.97).astype(np.int64)
    b[:, 12:] = a[:, 12:] + (a[:, :6] - b[:, :6])
    w1 = resample_weights(80, 1000, np.random.default_rng(1))
    w2 = resample_weights(80, 1000, np.random.default_rng(2))
    paired = percentile_interval(groups_of(a, w1, 6) - groups_of(b, w1, 6))
    unpaired = percentile_interval(groups_of(a, w1, 6) - groups_of(b, w2, 6))
    assert paired[1] - paired[0] < 0.5 * (unpaired[1] - unpaired[0])
    assert paired[0] > 0                        # a is better on every image: only the paired test sees it
    assert unpaired[0] < 0 < unpaired[1]


def test_draws_are_reproducible_under_a_seed():
    config = BootstrapConfig(resamples=100, seed=7)
    w = resample_weights(30, 100, config.rng("images:x"))
    assert np.array_equal(w, resample_weights(30, 100, config.rng("images:x")))
    assert not np.array_equal(w, resample_weights(30, 100, BootstrapConfig(resamples=100, seed=8).rng("images:x")))
    assert not np.array_equal(w, resample_weights(30, 100, config.rng("images:y")))
    assert (w.sum(1) == 30).all() and w.min() >= 0
    with pytest.raises(ConfigError, match="resamples"):
        BootstrapConfig(resamples=10)


def test_unresampled_scores_equal_the_full_set_and_forgetting_matches_the_metrics():
    rng = np.random.default_rng(5)
    stacked = counts(rng, 20, 4)
    ones = np.ones((1, 20))
    tp, fp, fn = np.split(stacked.sum(0), 3)
    np.testing.assert_allclose(resampled_class_scores(stacked, ones, IOU, 3)[0], IOU(tp, fp, fn))
    assert np.isfinite(IOU(tp, fp, fn)).all()

    steps = np.array([0, 0, 1, 2])
    scores = rng.uniform(0, 100, (3, 1, 4))
    scores[1, 0, 1] = np.nan
    wide = pd.DataFrame(scores[:, 0, :], index=[0, 1, 2], columns=[1, 2, 3, 4])
    expected = mean_forgetting(forgetting_per_class(wide, dict(zip([1, 2, 3, 4], steps)), 2), [1, 2, 3])
    assert forgetting(scores, steps, 2)[0] == pytest.approx(expected)

    values = np.array([[1.0, 2.0], [np.nan, 4.0], [5.0, 6.0]])     # 3 units x 2 resamples
    weights = np.array([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])
    np.testing.assert_allclose(combine_units(values, weights), [3.0, 4.0])


# ---------------------------------------------------------------------------------------------- the report
def image_matrices(rng, n_images, k=4):
    """One confusion matrix per validation image [N, K, K]; about 30 % of (image, class) pairs have no ground truth."""
    m = rng.integers(0, 30, (n_images, k, k)) + np.eye(k, dtype=np.int64) * rng.integers(20, 200, (n_images, k, 1))
    return m * (rng.random((n_images, k, 1)) > 0.3)


def improved(mats):
    """Half of every image's misses moved to the diagonal: better on every image and class."""
    eye = np.eye(mats.shape[1], dtype=np.int64)
    half = (mats * (1 - eye)) // 2
    return mats - half + eye * half.sum(2)[:, :, None]


def write_counts_run(root, protocol, method, seed, per_step, image_ids):
    """A run whose steps store per_image.npz (from per-image confusion matrices) and the matching rows."""
    store = RunStore(root / protocol.name / method / f"seed{seed}")
    store.write_run_json({"method": method, "protocol": protocol.name, "seed": seed})
    ids = list(protocol.all_classes)
    for t, mats in enumerate(per_step):
        tp = np.diagonal(mats, axis1=1, axis2=2)
        stats = PerImageStats(image_ids, ids, {"tp": tp, "fp": mats.sum(1) - tp, "fn": mats.sum(2) - tp})
        matrix = mats.sum(0)
        rows = semantic_rows(matrix=matrix, class_ids=ids, protocol=protocol, method=method, seed=seed, step=t)
        store.write_step(t, confusion=(matrix, ids), per_image=stats, metrics_rows=rows)
    return store


@pytest.fixture(scope="module")
def count_results(tmp_path_factory):
    """toy-2-1, 40 images: 'finetune' and 'mib' (identical counts), 'cisdq' (better on every image), joint."""
    root = tmp_path_factory.mktemp("counts")
    p = toy_protocol()
    rng = np.random.default_rng(11)
    image_ids = np.array([f"im{i:03d}" for i in range(40)])
    steps = [image_matrices(rng, 40) for _ in range(3)]
    better = [improved(m) for m in steps]
    write_counts_run(root, p, "finetune", 0, steps, image_ids)
    order = rng.permutation(40)                 # stored in another image order: aligned by id
    write_counts_run(root, p, "mib", 0, [m[order] for m in steps], image_ids[order])
    write_counts_run(root, p, "cisdq", 0, better, image_ids)
    write_counts_run(root, p, "joint", 0, better[-1:], image_ids)
    return root, p, image_ids


def test_report_intervals_recomputed_independently_from_per_image(count_results, tmp_path):
    root, p, image_ids = count_results
    out = write_report(root, tmp_path / "rep", ReportOptions(plots=False, resamples=400, ci_seed=3))
    summary = pd.read_csv(out / "summary.csv")
    mine = summary[summary["metric"] == "miou"]
    assert (mine["ci_source"] == "images").all()
    assert ((mine["ci_low"] <= mine["mean"] + 1e-9) & (mine["mean"] <= mine["ci_high"] + 1e-9)).all()

    # independent recomputation: index resampling with its own generator, IoU from the resampled sums
    gen = np.random.default_rng(99)
    idx = gen.integers(0, len(image_ids), (4000, len(image_ids)))
    for method in ("finetune", "cisdq"):
        stats = RunStore(root / p.name / method / "seed0").read_per_image(2)
        tp, fp, fn = (stats.arrays[k][idx].sum(1) for k in ("tp", "fp", "fn"))     # [B, K]
        iou = IOU(tp, fp, fn)
        for group, cols in (("base", [0, 1]), ("novel", [2, 3]), ("seen", [0, 1, 2, 3])):
            ref = np.nanpercentile(np.nanmean(iou[:, cols], axis=1), [2.5, 97.5])
            row = mine[(mine["method"] == method) & (mine["step"] == 2) & (mine["group"] == group)].iloc[0]
            width = ref[1] - ref[0]
            assert abs(row["ci_low"] - ref[0]) < 0.2 * width + 0.3, (method, group)
            assert abs(row["ci_high"] - ref[1]) < 0.2 * width + 0.3, (method, group)
            full = IOU(*(stats.arrays[k].sum(0) for k in ("tp", "fp", "fn")))
            assert row["mean"] == pytest.approx(np.nanmean(full[cols]))

    sig = pd.read_csv(out / "significance.csv")
    assert list(sig.columns) == ["protocol", "method", "reference", "step", "group", "metric", "diff", "ci_low",
                                 "ci_high", "significant"]
    final = sig[(sig["step"] == 2) & (sig["metric"] == "miou") & (sig["group"] == "seen")].set_index("method")
    assert set(final["reference"]) == {"cisdq"} and set(final.index) == {"finetune", "mib"}
    assert final.loc["finetune", "significant"] and final.loc["finetune", "ci_high"] < 0
    # the difference's interval recomputed independently (paired: the same indices for both methods)
    diffs = []
    for method in ("finetune", "cisdq"):
        stats = RunStore(root / p.name / method / "seed0").read_per_image(2)
        diffs.append(np.nanmean(IOU(*(stats.arrays[k][idx].sum(1) for k in ("tp", "fp", "fn"))), axis=1))
    ref = np.percentile(diffs[0] - diffs[1], [2.5, 97.5])
    assert abs(final.loc["finetune", "ci_low"] - ref[0]) < 0.2 * (ref[1] - ref[0]) + 0.3
    # identical methods (mib stored its images in another order): the same intervals
    a, b = (mine[mine["method"] == m].reset_index(drop=True) for m in ("finetune", "mib"))
    pd.testing.assert_frame_equal(a.drop(columns="method"), b.drop(columns="method"))
    assert (out / "significance.md").read_text().startswith("# Differences to the best continual method")
    # forgetting and average incremental get intervals from the same resamples
    cont = summary[summary["metric"].isin(["forgetting", "avg_incremental"])]
    assert len(cont) == 6 and cont["ci_low"].notna().all()

    # reproducible under --ci-seed, different with another seed
    again = pd.read_csv(write_report(root, tmp_path / "again", ReportOptions(plots=False, resamples=400,
                                                                             ci_seed=3)) / "summary.csv")
    pd.testing.assert_frame_equal(summary, again)
    other = pd.read_csv(write_report(root, tmp_path / "other", ReportOptions(plots=False, resamples=400,
                                                                             ci_seed=4)) / "summary.csv")
    assert not np.allclose(summary["ci_low"].fillna(0), other["ci_low"].fillna(0))
    info = json.loads((out / "report.json").read_text())
    assert info["bootstrap"]["resamples"] == 400
    assert info["bootstrap"]["image_sets"] == {"toy-2-1": "40 validation images"}


def test_table_marks_follow_significance(count_results, tmp_path):
    root, _, _ = count_results
    md = (write_report(root, tmp_path / "rep", QUICK) / "tables.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| CisDQ"))
    assert row.count("**") == 6                  # better on every image: bold in all three columns
    assert "one run: ± half-width of the 95% bootstrap interval" in md
    text = final_table(root, options=QUICK)
    assert "runs" in text.splitlines()[1] and "1 seed" in text

    # without the better method, finetune and mib are identical: a tie, nothing bold
    tie_root = tmp_path / "tie"
    for method in ("finetune", "mib"):
        src = root / "toy-2-1" / method
        import shutil

        shutil.copytree(src, tie_root / "toy-2-1" / method)
    md = (write_report(tie_root, tmp_path / "tie_rep", QUICK) / "tables.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| Fine-tuning", "| MiB"))]
    assert len(rows) == 2 and all(line.count("†") == 3 and "**" not in line for line in rows)
    sig = pd.read_csv(tmp_path / "tie_rep" / "significance.csv")
    assert (sig["diff"] == 0).all() and (sig["ci_low"] == 0).all() and (sig["ci_high"] == 0).all()
    assert not sig["significant"].astype(bool).any()


def test_orders_are_aggregated_over_their_runs(tmp_path):
    """Three orders of toy-2-1 (hand-made scores, no per-image data): mean and std over orders, per-order table."""
    base = toy_protocol()
    orders = {"toy-2-1": base.steps, "toy-2-1@rand1": ((3, 4), (1,), (2,)), "toy-2-1@rand2": ((2, 4), (3,), (1,))}
    shift = {"toy-2-1": 0.0, "toy-2-1@rand1": 4.0, "toy-2-1@rand2": -2.0}
    for name, steps in orders.items():
        p = Protocol(name=name, dataset="synth", task="semantic", mode="overlap", order=order_name(name), steps=steps,
                     class_names=dataset_spec("synth", 4).class_names, num_dataset_classes=4)
        for method, level in (("finetune", 20.0), ("cisdq", 50.0)):
            for seed in (0, 1):
                per_step = [{c: level + shift[name] + seed for c in p.seen(t)} for t in range(3)]
                write_hand_run(tmp_path / "res", p, method, seed, per_step)
    out = write_report(tmp_path / "res", tmp_path / "rep", ReportOptions(resamples=200))
    table = pd.read_csv(out / "orders.csv")
    row = table[(table["method"] == "cisdq") & (table["step"] == 2) & (table["group"] == "seen")].iloc[0]
    assert row["split"] == "toy-2-1" and row["n_orders"] == 3 and row["n_runs"] == 6
    per_order = [50.5, 54.5, 48.5]                                   # each order's mean over seeds 0, 1
    assert row["mean"] == pytest.approx(np.mean(per_order)) and row["std"] == pytest.approx(np.std(per_order, ddof=1))
    assert row["default"] == pytest.approx(50.5) and row["ci_source"] == "runs"
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    sig = pd.read_csv(out / "orders_significance.csv")
    assert list(sig.columns)[0] == "split" and sig.loc[sig["metric"] == "miou", "significant"].astype(bool).all()
    md = (out / "tables.md").read_text()
    assert "## toy-2-1, over 3 class orders" in md and "## toy-2-1, per order" in md
    assert "all (default order)" in md and "mean ± std over 3 class orders (default, rand1, rand2)" in md
    assert (out / "curves_toy-2-1_orders.png").is_file()
    info = json.loads((out / "report.json").read_text())
    [entry] = info["orders"]
    assert entry["orders"] == ["default", "rand1", "rand2"] and entry["seeds"]["cisdq"]["rand2"] == [0, 1]
    assert "mean over the orders" in entry["averaged"]


def test_order_names_and_the_orders_option():
    assert split_name("ade-100-10@rand3~synth") == "ade-100-10~synth" and split_name("voc-15-1") == "voc-15-1"
    assert order_name("synth-10-5@rand2") == "rand2" and order_name("synth-10-5") == "default"
    assert splits_with_orders(["a@rand2", "a", "a@rand10", "b"]) == {"a": ["a", "a@rand2", "a@rand10"]}

    args = build_parser().parse_args(["--methods", "finetune", "--protocol", "synth-10-5", "--orders", "2",
                                      "--seeds", "0", "1", "--device", "cpu"])
    specs = specs_from_args(args)
    assert [s.protocol for s in specs if s.seed == 0] == ["synth-10-5", "synth-10-5@rand1", "synth-10-5@rand2"]
    assert len(specs) == 6
    args = build_parser().parse_args(["--methods", "finetune", "--protocol", "ade-100-50", "--dataset", "synth",
                                      "--orders", "1", "--device", "cpu"])
    assert [s.protocol for s in specs_from_args(args)] == ["ade-100-50~synth", "ade-100-50@rand1~synth"]
    with pytest.raises(ConfigError, match="single step"):
        specs_from_args(build_parser().parse_args(["--protocol", "synth-joint", "--orders", "1", "--device", "cpu"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--orders", "-1"])


def test_runs_on_other_validation_images_are_refused(count_results, tmp_path):
    import shutil

    from benchmark.errors import DataError

    root, p, image_ids = count_results
    shutil.copytree(root, tmp_path / "mixed")
    rng = np.random.default_rng(0)
    write_counts_run(tmp_path / "mixed", p, "plop", 0, [image_matrices(rng, 30) for _ in range(3)], image_ids[:30])
    with pytest.raises(DataError, match="other validation images"):
        write_report(tmp_path / "mixed", tmp_path / "rep", QUICK)
