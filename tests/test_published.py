"""Published numbers as data (benchmark/report/published.csv) and `report --published` beside a run."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark.report.published import load_published
from benchmark.store import RunStore
from protocols import get_protocol
from tests.test_report import write_hand_run

ROOT = Path(__file__).resolve().parents[1]


def test_every_published_row_names_a_protocol_a_metric_and_a_source():
    table = load_published()
    assert len(table) >= 25
    for row in table.itertuples():
        protocol = get_protocol(row.protocol)                       # raises on an unknown name
        assert row.metric == {"semantic": "miou", "panoptic": "pq", "instance": "ap"}[protocol.task]
        values = [getattr(row, c) for c in ("old", "new", "all") if not pd.isna(getattr(row, c))]
        assert values and all(0 <= v <= 100 for v in values), row
        assert row.source and row.table and row.backbone and row.all_convention
    # the rows the issue starts from are there: ADE semantic and panoptic, the field's methods and joint
    assert {"finetune", "mib", "comformer", "eclipse", "balconpas-r", "joint"} <= set(table.method)
    assert {"ade-100-50", "ade-100-10", "ade-pan-100-50", "ade-pan-100-5", "ade-pan-50-20"} <= set(table.protocol)
    assert not table.duplicated(["method", "protocol", "metric", "source"]).any()


def test_report_published_puts_the_papers_numbers_beside_the_runs(tmp_path):
    protocol = get_protocol("ade-100-50")
    base, novel = protocol.steps
    step0 = {c: 50.0 for c in base}
    step1 = {**{c: 10.0 for c in base}, **{c: 30.0 for c in novel}}
    store = write_hand_run(tmp_path / "results", protocol, "finetune", 0, [step0, step1])
    store.write_run_json({**store.read_run_json(), "config": {"engine": "r50"}})
    res = subprocess.run([sys.executable, "run_benchmark.py", "report", str(tmp_path / "results"), "--published",
                          "--no-plots", "--resamples", "0"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = pd.read_csv(tmp_path / "results" / "report" / "published.csv").set_index("column")
    # MiB's Table 2 prints fine-tuning on ADE 100-50 as 0.0 / 24.9 / 8.3
    assert out.loc["old", "ours"] == pytest.approx(10.0) and out.loc["old", "published"] == 0.0
    assert out.loc["new", "difference"] == pytest.approx(30.0 - 24.9)
    assert out.loc["all", "ours"] == pytest.approx((100 * 10 + 50 * 30) / 150)
    assert out.loc["all", "difference"] == pytest.approx((100 * 10 + 50 * 30) / 150 - 8.3)
    assert "DeepLab-v3 R101 vs our r50 preset" in out.loc["all", "convention"]
    assert "MiB (Cermelli et al., CVPR 2020), Table 2" in out.loc["old", "source"]
    assert "## ade-100-50" in res.stdout and "+5.1" in res.stdout


def test_a_convention_difference_is_stated(tmp_path):
    from benchmark.report.published import compare

    summary = pd.DataFrame([{"protocol": "ade-100-50", "method": "comformer", "step": 1, "group": "base",
                             "metric": "miou", "mean": 40.0, "std": 1.0, "n_seeds": 3}])
    out = compare(summary, {("ade-100-50", "comformer"): "r101"})
    assert list(out.column) == ["old"] and out.difference.iloc[0] == pytest.approx(40.0 - 44.7)
    assert "secondary source" in out.convention.iloc[0]
