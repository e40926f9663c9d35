"""Evaluate stored runs again under other evaluation settings, into a new results folder
(``python -m benchmark.reevaluate RESULTS --out NEW --eval-set KEY=VALUE ...``).

A run's numbers depend on its trained weights and on how they are evaluated: the inference rule
(``eval.*``: semantic ``mode`` segments / sum and its thresholds) and, on the embedded benchmark, how many
validation images there are (``synth.val_images``: 120 by default, whose 95 % bootstrap half-width on a
10-class group is 5-6 points). Re-training to change either costs the whole run; the stored weights of
every step (``step_XX/weights.pt``) already hold everything the evaluation needs. This command reads every
run under RESULTS (optionally only some protocols, methods and seeds), rebuilds it with the options it was
trained with (``--engine``, ``--schedule``, ``--set``, as for ``run_benchmark.py``; checked against its
``run.json``), evaluates each stored step with the new evaluation settings and writes a complete run folder
under NEW: the task's artefacts and metrics, the weights, and a ``run.json`` whose configuration holds the
new evaluation settings, whose ``reevaluated_from`` names the source folder and whose ``reevaluated_with``
the code that evaluated (the source's ``git_revision`` and ``versions`` stay: they trained the weights).
``run_benchmark.py report NEW`` and ``python -m benchmark.calibrate NEW`` then read it as any results folder.

Only evaluation settings may change (``--eval-set`` keys ``eval.*`` and ``synth.val_images``): anything else
would describe weights these are not. The synthetic generator draws each image from (dataset seed, split,
index) and each split's class deck from (dataset seed, split), so a larger validation set keeps the training
images, and its first 120 images are the default set's. Each step's training cost is copied from the
source's DONE marker. Resumable: a step already re-evaluated in NEW is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from benchmark.errors import ConfigError, DataError, UserError

EVAL_SECTIONS = ("eval",)
EVAL_KEYS = {"synth": ("val_images",)}


@dataclass(frozen=True)
class SourceRun:
    """One stored run: its folder and its ``run.json``."""

    run_dir: Path
    record: dict

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def protocol(self) -> str:
        return self.record["protocol"]

    @property
    def seed(self) -> int:
        return int(self.record["seed"])


def find_runs(results: Path, protocols: Sequence[str] = (), methods: Sequence[str] = (),
              seeds: Sequence[int] = ()) -> list[SourceRun]:
    """Every run folder under ``results`` (``<protocol>/<method>/seed<N>/run.json``) that the filters keep."""
    runs = []
    for path in sorted(Path(results).glob("*/*/seed*/run.json")):
        if path.parts[-4].startswith("_"):          # the shared step-0 cache, not a run
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read {path}: {err}", hint="a run folder's run.json is damaged; "
                                                               "remove that run or restore the file") from None
        run = SourceRun(path.parent, record)
        if ((not protocols or run.protocol in protocols) and (not methods or run.method in methods)
                and (not seeds or run.seed in seeds)):
            runs.append(run)
    if not runs:
        raise DataError(f"no runs under {results} match", hint="check the folder (the --out of run_benchmark.py) "
                                                              "and the --protocol / --methods / --seeds filters")
    return runs


def check_eval_overrides(overrides: dict[str, dict[str, str]]) -> None:
    """Refuse a key that is not an evaluation setting."""
    for section, values in overrides.items():
        for key in values:
            if section not in EVAL_SECTIONS and key not in EVAL_KEYS.get(section, ()):
                allowed = ", ".join([f"{s}.*" for s in EVAL_SECTIONS] +
                                    [f"{s}.{k}" for s, keys in EVAL_KEYS.items() for k in keys])
                raise ConfigError(f"--eval-set {section}.{key}: not an evaluation setting (it changes what the "
                                  f"weights were trained on)", hint=f"--eval-set takes {allowed}; pass the run's "
                                                                    f"training options with --set")


def differing_keys(recorded: dict, config: dict) -> list[str]:
    """Top-level configuration keys (``synth.<field>`` inside the synthetic spec) whose values differ."""
    diff = []
    for key in sorted(set(recorded) | set(config)):
        a, b = recorded.get(key), config.get(key)
        if key == "synth" and isinstance(a, dict) and isinstance(b, dict):
            diff += [f"synth.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(key)
    return diff


def reevaluate_run(source: SourceRun, spec, *, show_progress: bool = False) -> Path:
    """Evaluate every stored step of ``source`` with ``spec`` (the run's options plus the new evaluation
    settings, ``out`` = the new results folder); returns the new run folder."""
    from benchmark.runner import StepRunner, _check_recorded_config, _git_revision, _versions, resolve
    from benchmark.store import RunStore
    from benchmark.tasks import get_task

    r = resolve(spec)
    changed = [k for k in differing_keys(source.record.get("config", {}), r.config)
               if k != "eval" and k not in {f"synth.{key}" for key in EVAL_KEYS["synth"]}]
    if changed or source.record.get("protocol_fingerprint") != r.protocol.fingerprint:
        raise ConfigError(f"{source.run_dir} was trained with other options (differs in: "
                          f"{', '.join(changed) or 'protocol definition'})",
                          hint="pass the --engine, --schedule and --set options the run was made with (its "
                               "run.json has them under 'config')")
    source_store = RunStore(source.run_dir)
    steps = [t for t in source_store.done_steps() if source_store.weights_path(t).is_file()]
    if not steps:
        raise DataError(f"{source.run_dir} has no stored step weights", hint="the run has not finished a step")
    run_dir = spec.run_dir(r.protocol.name)
    if run_dir.resolve() == source.run_dir.resolve():
        raise ConfigError(f"--out would overwrite the source run {source.run_dir}", hint="give another --out folder")
    store = RunStore(run_dir)
    _check_recorded_config(store, r)
    runner = StepRunner(r, show_progress=show_progress)
    task = get_task(r.protocol.task)
    header = source.record | {"config": r.config, "reevaluated_from": str(source.run_dir.resolve()),
                              "reevaluated_with": {"git_revision": _git_revision(), "versions": _versions()}}
    header |= task.run_header(runner.val_ds)
    store.write_run_json(header)
    for t in steps:
        if store.is_done(t):
            continue
        model = runner.load_model(source_store.weights_path(t)).to(runner.device)
        start = time.time()
        result = runner.evaluate(model, t)
        seconds = time.time() - start
        tmp = run_dir / f".weights_{t:02d}.pt"
        shutil.copyfile(source_store.weights_path(t), tmp)
        cost = source_store.done_record(t).get("cost")
        extra = {"seconds": round(seconds, 2), "reevaluated_from": str(source.run_dir.resolve()),
                 **({"cost": cost} if cost else {})}
        task.store_step(store, t, result, val_ds=runner.val_ds, weights_path=tmp, extra=extra,
                        ident=dict(method=r.spec.method, protocol=r.protocol, seed=r.spec.seed))
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    from benchmark.config import parse_set_options
    from benchmark.runner import RunSpec

    parser = argparse.ArgumentParser(prog="python -m benchmark.reevaluate", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results folder of the trained runs (the --out of run_benchmark.py)")
    parser.add_argument("--out", required=True, help="new results folder for the re-evaluated runs")
    parser.add_argument("--eval-set", nargs="+", default=[], metavar="KEY=VALUE", required=True,
                        help="the new evaluation settings: eval.KEY=VALUE (e.g. eval.mode=sum) and, on the "
                             "synthetic protocols, synth.val_images=N")
    parser.add_argument("--protocol", nargs="*", default=[], help="only these protocols (default: all found)")
    parser.add_argument("--methods", nargs="*", default=[], help="only these methods (default: all found)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[], help="only these seeds (default: all found)")
    parser.add_argument("--engine", default="tiny", help="the run's model preset (default tiny)")
    parser.add_argument("--schedule", default="cpu", help="the run's schedule (default cpu)")
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--backbone-weights", default=None)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="the --set options the runs were trained with")
    args = parser.parse_args(argv)
    try:
        eval_overrides = parse_set_options(args.eval_set)
        check_eval_overrides(eval_overrides)
        overrides = parse_set_options(args.set)
        for section, values in eval_overrides.items():
            overrides.setdefault(section, {}).update(values)
        from benchmark.engine.host_memory import retain_freed_memory
        from benchmark.runner import CPU_THREADS, _torch_threads, resolve_device_name

        base = RunSpec(method="", protocol="", engine=args.engine, schedule=args.schedule, data_root=args.data_root,
                       device=resolve_device_name(args.device), out=str(Path(args.out)),
                       backbone_weights=args.backbone_weights, overrides=RunSpec.freeze_overrides(overrides))
        runs = find_runs(Path(args.results), args.protocol, args.methods, args.seeds)
        with contextlib.ExitStack() as stack:
            if base.device == "cpu":      # as the runner evaluates a CPU run: same thread count, same numbers
                stack.enter_context(_torch_threads(CPU_THREADS))
                retain_freed_memory()
            for i, source in enumerate(runs, 1):
                run_dir = reevaluate_run(source, replace(base, method=source.method, protocol=source.protocol,
                                                         seed=source.seed))
                print(f"[{i}/{len(runs)}] {source.protocol} {source.method} seed {source.seed}: {run_dir}",
                      flush=True)
    except UserError as err:
        return err.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
