"""The README's code is real: the 'Adding a method' example file runs through the runner as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import methods
from benchmark.runner import run_one
from tests.test_runner import PROTOCOL, metrics, spec

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [block] = [b for b in blocks if containing in b]
    return block


def test_adding_a_method_example_runs_every_step(tmp_path, monkeypatch):
    (tmp_path / "readme_lwf.py").write_text(python_block("class LwF(Method)"))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry_line = python_block('"lwf": ("methods.lwf", "LwF")').strip()
    assert registry_line.startswith('"lwf": ("methods.lwf", "LwF"),')
    monkeypatch.setitem(methods._REGISTRY, "lwf", ("readme_lwf", "LwF"))
    run = run_one(spec("lwf", tmp_path, extra=["--set", "method.kd_weight=5"]), show_progress=False)
    rows = metrics(run)
    assert set(rows["step"]) == {0, 1, 2} and rows["method"].eq("lwf").all()
    log = (run / "log.txt").read_text()
    assert re.search(r"mean loss [-0-9.e]+ \(.*\bkd [-0-9.e]+", log) and PROTOCOL in log
    sys.modules.pop("readme_lwf", None)
