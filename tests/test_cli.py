"""Command line: listings, dry runs and user errors (clear message, exit 2, no traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_list_protocols_prints_every_table_protocol():
    out = run_cli("--list", "protocols")
    assert out.returncode == 0, out.stderr
    for name in ("voc-15-1", "voc-10-5-5", "ade-100-5", "ade-inst-50-10", "coco-40-4", "synth-10-2"):
        assert f"\n{name} " in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("voc-15-1 "))
    assert "15-5s" in line and " 6 " in line      # alias listed, 6 steps


def test_list_methods():
    out = run_cli("--list", "methods")
    assert out.returncode == 0, out.stderr
    assert "finetune" in out.stdout and "joint" in out.stdout
    assert "cisdq-kl" in out.stdout and "only when named" in out.stdout


def test_optional_variant_is_registered_but_not_in_the_default_grid():
    from methods import available_methods, default_methods, get_method

    assert "cisdq-kl" in available_methods() and "cisdq-kl" not in default_methods()
    assert default_methods() == ["finetune", "mib", "plop", "comformer", "cisdq", "eclipse", "balconpas", "joint"]
    assert "balconpas-r" in available_methods() and "balconpas-r" not in default_methods()
    assert get_method("cisdq-kl", "synth-10-5").hparams.distill == "kl"


@pytest.mark.parametrize("args, needle", [
    (["--protocol", "ade-100-6"], "ade-100-6"),
    (["--protocol", "voc-15-1@zz"], "voc-15-1@zz"),
    (["--methods", "cisqd", "--protocol", "synth-10-5"], "did you mean"),
    (["--protocol", "synth-10-5", "--set", "step0.iteration=3", "--dry-run"], "step0.iterations"),
    (["--protocol", "synth-10-5", "--set", "bogus.x=3", "--dry-run"], "unknown --set section"),
    (["--device", "cuda", "--protocol", "synth-10-5"], "CUDA"),
])
def test_user_errors_are_clear_and_without_traceback(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ")
    assert needle in out.stderr


def test_missing_dependency_is_an_installation_hint_not_a_traceback():
    code = ("import sys; sys.modules['torch'] = None; from benchmark.cli import main; "
            "sys.exit(main(['--list', 'methods']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "'torch' is not installed" in res.stderr and "pip install -e ." in res.stderr
    assert "Traceback" not in res.stderr


def test_one_set_flag_takes_several_pairs_and_repeated_flags_add_up():
    out = run_cli("--methods", "finetune", "--protocol", "synth-10-5", "--set", "step0.iterations=7",
                  "increment.iterations=5", "--set", "increment.lr=0.002", "--dry-run")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[-3], r[-1]) for r in rows] == [("0", "7", "0.001"), ("1", "5", "0.002"), ("2", "5", "0.002")]
