"""Results store: run.json, atomic step folders with DONE last, metrics.csv without duplicates, reader."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.errors import DataError
from benchmark.metrics import iou_per_class, masks_to_coco_results
from benchmark.store import COLUMNS, RunStore, instance_rows, load_results, semantic_rows
from protocols import Protocol
from protocols.datasets import dataset_spec


def toy_protocol(task: str = "semantic") -> Protocol:
    """4 synthetic classes in steps (1, 2), (3,), (4,)."""
    dataset = "synth" if task == "semantic" else "synth-inst"
    return Protocol(name="toy-2-1", dataset=dataset, task=task, mode="overlap", order="default",
                    steps=((1, 2), (3,), (4,)), class_names=dataset_spec(dataset, 4).class_names,
                    num_dataset_classes=4)


CLASS_IDS = [1, 2, 3, 4]


def matrix_for(step: int) -> np.ndarray:
    """A different, deterministic confusion matrix per step (class 4 has no ground truth)."""
    m = np.diag([10 - step, 8, 6, 0]).astype(np.int64)
    m[0, 1] = step + 1
    m[2, 0] = 2
    return m


def write_semantic_run(run_dir: Path, method="finetune", seed=0, steps=(0, 1, 2)) -> RunStore:
    p = toy_protocol()
    store = RunStore(run_dir)
    store.write_run_json({"config": {"lr": 1e-4}, "seed": seed, "protocol": p.name, "method": method})
    for t in steps:
        rows = semantic_rows(matrix=matrix_for(t), class_ids=CLASS_IDS, protocol=p, method=method, seed=seed, step=t)
        store.write_step(t, confusion=(torch.from_numpy(matrix_for(t)), CLASS_IDS), metrics_rows=rows,
                         state_dict={"w": torch.full((2,), float(t))}, extra={"seconds": 1.5})
    return store


@dataclass
class Cfg:
    lr: float
    root: Path


def test_run_json_key_order_and_values(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.read_run_json() is None
    store.write_run_json({"config": Cfg(1e-4, Path("/data")), "seed": 2, "protocol": "voc-15-1", "method": "mib",
                          "versions": {"torch": "2.13"}, "classes": frozenset({3, 1}), "n": np.int64(5)})
    text = (tmp_path / "run" / "run.json").read_text()
    data = json.loads(text)
    assert list(data)[:3] == ["method", "protocol", "seed"]
    assert data["config"] == {"lr": 1e-4, "root": "/data"} and data["classes"] == [1, 3] and data["n"] == 5
    assert store.read_run_json() == data
    with pytest.raises(ValueError, match="missing \\['seed'\\]"):
        store.write_run_json({"method": "mib", "protocol": "voc-15-1"})


def test_semantic_steps_files_and_metrics(tmp_path):
    store = write_semantic_run(tmp_path / "run")
    for t in range(3):
        folder = store.step_dir(t)
        assert folder.name == f"step_{t:02d}"
        assert sorted(p.name for p in folder.iterdir()) == ["DONE", "confusion.npz", "metrics.csv", "weights.pt"]
        with np.load(folder / "confusion.npz") as data:
            assert data["matrix"].dtype == np.int64 and data["class_ids"].dtype == np.int64
            np.testing.assert_array_equal(data["matrix"], matrix_for(t))
            np.testing.assert_array_equal(data["class_ids"], CLASS_IDS)
        assert torch.load(store.weights_path(t))["w"].tolist() == [float(t)] * 2
        marker = json.loads((folder / "DONE").read_text())
        assert marker["seconds"] == 1.5 and "confusion.npz" in marker["files"]
        assert store.is_done(t)
    assert store.done_steps() == [0, 1, 2] and not store.is_done(3)
    assert not list(store.run_dir.rglob(".*.tmp-*"))           # no temporary file left behind

    table = pd.read_csv(store.metrics_path)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 3 * 4
    # IoU in metrics.csv is recomputed independently from the stored matrix
    for t in range(3):
        matrix, ids = store.read_confusion(t)
        expected = dict(zip(ids.tolist(), 100 * iou_per_class(matrix)))
        got = table[table["step"] == t].set_index("class_id")["value"]
        for c in (1, 2, 3):
            assert got[c] == pytest.approx(expected[c])
        assert math.isnan(got[4])                              # written as an empty cell
    assert store.step_result(1).matrix.tolist() == matrix_for(1).tolist()


def test_rewriting_a_step_replaces_it(tmp_path):
    store = write_semantic_run(tmp_path / "run")
    p = toy_protocol()
    new = matrix_for(5)
    rows = semantic_rows(matrix=new, class_ids=CLASS_IDS, protocol=p, method="finetune", seed=0, step=1)
    store.write_step(1, confusion=(new, CLASS_IDS), metrics_rows=rows)      # no weights this time
    table = store.read_metrics()
    assert len(table) == 12 and not table.duplicated(["step", "class_id", "metric"]).any()
    assert sorted(table["step"].unique()) == [0, 1, 2]
    assert table.query("step == 1 and class_id == 1")["value"].item() == pytest.approx(100 * 5 / 13)   # TP 5, GT 11, predicted 7
    assert not store.weights_path(1).exists()                  # leftover of the old version removed


def test_a_step_without_done_is_not_reported(tmp_path):
    store = write_semantic_run(tmp_path / "run")
    (store.step_dir(2) / "DONE").unlink()                       # as after a kill in the middle of write_step
    store.rebuild_metrics()
    assert sorted(store.read_metrics()["step"].unique()) == [0, 1]
    assert store.done_steps() == [0, 1]
    with pytest.raises(DataError, match="not complete"):
        store.read_confusion(2)


def test_weights_file_is_moved_in(tmp_path):
    store = RunStore(tmp_path / "run")
    p = toy_protocol()
    tmp = tmp_path / "run" / ".weights_00.pt"
    tmp.parent.mkdir(parents=True)
    torch.save({"a": torch.ones(1)}, tmp)
    rows = semantic_rows(matrix=matrix_for(0), class_ids=CLASS_IDS, protocol=p, method="m", seed=0, step=0)
    store.write_step(0, confusion=(matrix_for(0), CLASS_IDS), metrics_rows=rows, weights_path=tmp)
    assert not tmp.exists() and torch.load(store.weights_path(0))["a"].item() == 1.0
    with pytest.raises(DataError, match="does not exist"):
        store.write_step(0, confusion=(matrix_for(0), CLASS_IDS), metrics_rows=rows, weights_path=tmp)


def test_write_step_validates_its_input(tmp_path):
    store = RunStore(tmp_path / "run")
    p = toy_protocol()
    rows = semantic_rows(matrix=matrix_for(0), class_ids=CLASS_IDS, protocol=p, method="m", seed=0, step=0)
    with pytest.raises(ValueError, match="raw output"):
        store.write_step(0, metrics_rows=rows)
    with pytest.raises(ValueError, match="step 0 was passed to write_step\\(1\\)"):
        store.write_step(1, confusion=(matrix_for(0), CLASS_IDS), metrics_rows=rows)
    with pytest.raises(ValueError, match="integer \\[3, 3\\]"):
        store.write_step(0, confusion=(matrix_for(0), CLASS_IDS[:3]), metrics_rows=rows)
    with pytest.raises(ValueError, match="lacks"):
        store.write_step(0, confusion=(matrix_for(0), CLASS_IDS), metrics_rows=[{"step": 0}])
    assert not store.is_done(0)


def test_instance_step_round_trip(tmp_path):
    p = toy_protocol("instance")
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, :3, :3] = True
    masks[1, 3:, 3:] = True
    gt = {"images": [{"id": 1, "width": 6, "height": 6}], "categories": [{"id": c} for c in CLASS_IDS],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "iscrowd": 0, "area": 9.0,
                           "bbox": [0, 0, 3, 3], "segmentation": r["segmentation"]}
                          for i, (c, r) in enumerate(zip((1, 3), masks_to_coco_results(1, [1, 1], [1, 3], masks)))]}
    gt_path = tmp_path / "val.json"
    gt_path.write_text(json.dumps(gt))
    dets = masks_to_coco_results(1, [0.9, 0.8], [1, 2], masks)   # class 1 right, class 3 missed, class 2 wrong
    store = RunStore(tmp_path / "run")
    store.write_run_json({"method": "cisdq", "protocol": p.name, "seed": 0, "val_annotations": str(gt_path)})
    rows = instance_rows(protocol=p, method="cisdq", seed=0, step=1, detections=dets, gt_json_path=gt_path)
    store.write_step(1, detections=dets, metrics_rows=rows)
    assert store.read_detections(1) == dets
    result = store.step_result(1)
    assert result.task == "instance" and result.matrix is None
    recomputed = result.per_class_ap(store.read_run_json()["val_annotations"], CLASS_IDS)
    table = store.read_metrics().set_index(["class_id", "metric"])["value"]
    assert table[1, "ap"] == pytest.approx(100 * recomputed[1]["ap"]) == pytest.approx(100.0)
    assert table[3, "ap50"] == 0.0 and math.isnan(table[2, "ap"]) and math.isnan(table[4, "ap75"])


def test_load_results_reads_every_run_and_skips_internal_folders(tmp_path):
    write_semantic_run(tmp_path / "toy-2-1" / "finetune" / "seed0", seed=0)
    write_semantic_run(tmp_path / "toy-2-1" / "finetune" / "seed1", seed=1, steps=(0, 1))
    write_semantic_run(tmp_path / "_step0" / "abc", method="step0-cache", steps=(0,))
    (tmp_path / "empty").mkdir()
    RunStore(tmp_path / "started").write_run_json({"method": "mib", "protocol": "toy-2-1", "seed": 0})
    df = load_results(tmp_path)
    assert set(df["run_dir"]) == {"toy-2-1/finetune/seed0", "toy-2-1/finetune/seed1"}
    assert len(df) == (3 + 2) * 4
    assert df["seed"].dtype == np.int64 and df["value"].dtype == np.float64
    assert set(df["method"]) == {"finetune"}
    # a single run folder is a results folder too
    assert len(load_results(tmp_path / "toy-2-1" / "finetune" / "seed1")) == 8
    assert load_results(tmp_path / "empty").empty
    with pytest.raises(DataError, match="does not exist"):
        load_results(tmp_path / "nowhere")


def test_class_names_are_kept_verbatim(tmp_path):
    store = RunStore(tmp_path / "run")
    row = {"method": "m", "protocol": "p", "seed": 0, "step": 0, "class_id": 1, "class_name": "NA",
           "class_step": 0, "metric": "iou", "value": float("nan"), "support": 0}
    store.write_step(0, confusion=(np.zeros((1, 1), np.int64), [1]), metrics_rows=[row, {**row, "class_id": 2,
                                                                                          "class_name": "null"}])
    table = store.read_metrics()
    assert table["class_name"].tolist() == ["NA", "null"] and table["value"].isna().all()


def test_task_files_and_folders_are_stored_and_stale_ones_dropped(tmp_path):
    """A task's own artefacts (files and folders) are written under the step, listed in DONE, and removed
    when the step is re-written without them; a step needs some raw output."""
    p = toy_protocol()
    store = RunStore(tmp_path / "run")
    rows = semantic_rows(matrix=matrix_for(0), class_ids=CLASS_IDS, protocol=p, method="finetune", seed=0, step=0)

    def fill(folder: Path) -> None:
        (folder / "a.png").write_bytes(b"png-a")
        (folder / "b.png").write_bytes(b"png-b")

    folder = store.write_step(0, metrics_rows=rows, files={"panoptic.json": lambda f: f.write(b'{"x": 1}')},
                              folders={"panoptic": fill})
    assert json.loads((folder / "panoptic.json").read_text()) == {"x": 1}
    assert sorted(q.name for q in (folder / "panoptic").iterdir()) == ["a.png", "b.png"]
    assert {"panoptic.json", "panoptic"} <= set(json.loads((folder / "DONE").read_text())["files"])
    assert not list(folder.glob(".*tmp*"))
    # Re-written as a semantic step: the task files of the old version go, the new ones stay.
    store.write_step(0, metrics_rows=rows, confusion=(matrix_for(0), CLASS_IDS))
    assert not (folder / "panoptic.json").exists() and not (folder / "panoptic").exists()
    assert (folder / "confusion.npz").is_file() and store.is_done(0)
    with pytest.raises(ValueError, match="raw output"):
        store.write_step(1, metrics_rows=rows)
