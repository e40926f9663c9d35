"""The calibration report (benchmark.calibrate) on hand-made results folders with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark.calibrate import calibration, main
from benchmark.store import load_results
from tests.test_report import toy_protocol, write_hand_run


@pytest.fixture()
def results(tmp_path):
    """toy protocol (classes 1-2 | 3 | 4), seeds 0-2: fine-tune, MiB and joint with hand-set scores."""
    p = toy_protocol()
    for s in range(3):
        write_hand_run(tmp_path, p, "finetune", s, [{1: 80, 2: 60}, {1: 10, 2: 10, 3: 60}, {1: 0, 2: 0, 3: 10, 4: 70}])
        write_hand_run(tmp_path, p, "mib", s, [{1: 80, 2: 60}, {1: 60, 2: 60, 3: 40},
                                                {1: 40 + 2 * s, 2: 40 + 2 * s, 3: 30, 4: 50}])
        write_hand_run(tmp_path, p, "joint", s, [{1: 80, 2: 80, 3: 80, 4: 80}])
    return tmp_path


def empty_runs(results, methods, seeds) -> None:
    """Remove the files of these methods' runs of these seeds (their folders stay, empty)."""
    for m in methods:
        for s in seeds:
            for f in (results / "toy-2-1" / m / f"seed{s}").glob("*"):
                if f.is_file():
                    f.unlink()


def test_quantities_match_the_hand_computation(results):
    q = {x.name: x for x in calibration(load_results(results))}
    # step-0 base (80 + 60) / 2 = 70 against joint's 80
    assert q["convergence"].value == pytest.approx(70 / 80) and q["convergence"].met is False
    # fine-tune new classes: step 1 60 / 80, step 2 70 / 80; the worst is step 1
    assert q["plasticity"].value == pytest.approx(0.75) and q["plasticity"].met is True
    assert "step 1" in q["plasticity"].detail
    assert "not compared" not in q["plasticity"].detail + q["convergence"].detail     # every seed has a joint run
    # MiB final base 40, 42, 44 -> std 2 (its 'all' (80 + 4s + 80) / 4 has std 1; fine-tune and joint 0)
    assert q["stability (max std)"].value == pytest.approx(2.0) and "mib base" in q["stability (max std)"].detail
    # the other 7 of the 9 (method, group) stds are 0: rms sqrt((2^2 + 1^2) / 9), none above 3
    assert f"rms {np.sqrt(5 / 9):.2f}, 0/9 above" in q["stability (max std)"].detail
    # both of MiB's base classes move by 2 per seed (together): one class's std is 2 as well
    assert "mib base over 3 seeds, class std 2.0 over 2 classes;" in q["stability (max std)"].detail
    assert q["forgetting margin"].value == pytest.approx(0.5 * 80 - 0) and q["forgetting margin"].met
    assert q["retention margin"].value == pytest.approx(min(42 - 2 * 0, 42 - 0 - 10))
    assert q["joint all"].value == pytest.approx(80) and q["joint all"].met


def test_one_seed_leaves_stability_unmeasured_and_check_gates_on_missed_targets(results, capsys):
    empty_runs(results, ("finetune", "mib", "joint"), seeds=(1, 2))
    q = {x.name: x for x in calibration(load_results(results))}
    assert q["stability (max std)"].met is None and math.isnan(q["stability (max std)"].value)
    assert main([str(results)]) == 0
    assert main([str(results), "--check"]) == 1                  # convergence 0.875 < 0.90
    out = capsys.readouterr().out
    assert "convergence" in out and "NO" in out and "target(s) missed" in out


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ratios_name_the_seeds_without_a_joint_run(results):
    """A folder with joint seed 0 only compares seed 0: the detail says that seeds 1 and 2 were not compared."""
    empty_runs(results, ("joint",), seeds=(1, 2))
    q = {x.name: x for x in calibration(load_results(results))}
    for name in ("convergence", "plasticity"):
        assert "seed 0" in q[name].detail
        assert q[name].detail.endswith("(not compared, no joint run of seeds 1, 2)")
