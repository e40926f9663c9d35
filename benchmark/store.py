"""The results store (design.md "Results store"): one folder per run, raw outputs first, metrics derived.

Layout of a run folder::

    run.json                 method, protocol, seed first; then the resolved config, protocol fingerprint,
                             versions, git revision, device, timings (instance runs: val_annotations)
    metrics.csv              long table of every done step (columns COLUMNS, IoU / AP in percent)
    step_XX/confusion.npz    semantic: ``matrix`` int64 [N, N] (rows = ground truth, columns = prediction)
                             and ``class_ids`` int64 [N] (the native id of each row / column)
    step_XX/per_image.npz    per-image sufficient statistics (benchmark.metrics.per_image): ``image_ids`` [I],
                             ``class_ids`` [N] and int64 [I, N] arrays named by the task (semantic: ``tp``,
                             ``fp``, ``fn`` pixel counts; their sums over images are confusion.npz's diagonal,
                             column sums minus diagonal, row sums minus diagonal). Absent in run folders of
                             older versions and for instance steps: the reporter then gives seed-only intervals
    step_XX/detections.json  instance: COCO results (native category ids, RLE masks, scores)
    step_XX/weights.pt       the step's final weights (when given)
    step_XX/metrics.csv      the step's own rows (metrics.csv at the top is their concatenation)
    step_XX/DONE             written last: the step is complete (JSON: files, finish time, extras)

Every file is written to a temporary name in the same folder and renamed into place, so a kill leaves
either the old or the new file, never a torn one. Re-writing a step first removes its DONE (the step
is incomplete from then on), replaces its files, drops files of the old version that the new one does
not have, writes DONE, and rebuilds the top-level metrics.csv from the done steps only, so a step's rows
appear once however often it is re-written.

:func:`load_results` reads every run under a folder into one DataFrame. Folders whose name starts with
``_`` or ``.`` are internal (e.g. the runner's shared step-0 cache ``_step0/``) and are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from benchmark.errors import DataError
from benchmark.metrics.ap import mask_ap
from benchmark.metrics.per_image import PerImageStats, check_against_confusion
from benchmark.metrics.rows import COLUMNS, instance_rows, semantic_rows

__all__ = ["COLUMNS", "PerImageStats", "RunStore", "StepResult", "atomic_write", "instance_rows", "load_results", "read_metrics_csv",
           "semantic_rows"]

RUN_KEYS = ("method", "protocol", "seed")
CONFUSION, DETECTIONS, WEIGHTS, STEP_METRICS, DONE = "confusion.npz", "detections.json", "weights.pt", "metrics.csv", "DONE"
PER_IMAGE = "per_image.npz"
_STORE_FILES = (CONFUSION, PER_IMAGE, DETECTIONS, WEIGHTS, STEP_METRICS)
_DTYPES = {"method": str, "protocol": str, "seed": "int64", "step": "int64", "class_id": "int64", "class_name": str,
           "class_step": "int64", "metric": str, "value": "float64", "support": "int64"}


@dataclass
class StepResult:
    """The raw evaluation output of a stored step (what the engine's evaluation returned).

    ``matrix`` (alias ``confusion``) and ``class_ids`` for a semantic step, ``detections`` for an instance one;
    ``per_image`` when the step stored per-image statistics.
    """

    step: int
    matrix: np.ndarray | None = None
    class_ids: np.ndarray | None = None
    detections: list[dict] | None = None
    per_image: PerImageStats | None = None

    @property
    def confusion(self) -> np.ndarray | None:
        return self.matrix

    @property
    def task(self) -> str:
        return "semantic" if self.matrix is not None else "instance"

    def per_class_ap(self, gt_json_path, class_ids: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
        """:func:`benchmark.metrics.mask_ap` of the stored detections."""
        if self.detections is None:
            raise ValueError("per_class_ap needs an instance step (detections)")
        return mask_ap(gt_json_path, self.detections, class_ids)


class RunStore:
    """Writer and reader of one run folder (created on first write)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunStore({str(self.run_dir)!r})"

    # ------------------------------------------------------------------------------------------ paths
    @property
    def run_json_path(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"step_{int(step):02d}"

    def weights_path(self, step: int) -> Path:
        """Where the step's final weights are (or will be) stored."""
        return self.step_dir(step) / WEIGHTS

    # ------------------------------------------------------------------------------------------ run.json
    def write_run_json(self, info: Mapping[str, Any]) -> Path:
        """Write run.json atomically with ``method``, ``protocol``, ``seed`` as its first keys."""
        missing = [k for k in RUN_KEYS if k not in info]
        if missing:
            raise ValueError(f"run.json needs the keys {list(RUN_KEYS)}; missing {missing}")
        ordered = {k: info[k] for k in RUN_KEYS} | {k: v for k, v in info.items() if k not in RUN_KEYS}
        text = json.dumps(ordered, indent=2, default=_json_default) + "\n"
        atomic_write(self.run_json_path, lambda f: f.write(text.encode("utf-8")))
        return self.run_json_path

    def read_run_json(self) -> dict | None:
        """The recorded run.json, or None when the run has none yet."""
        if not self.run_json_path.exists():
            return None
        return _read_json(self.run_json_path)

    # ------------------------------------------------------------------------------------------ steps
    def write_step(self, step: int, *, metrics_rows: Iterable[Mapping[str, Any]],
                   confusion: tuple[Any, Sequence[int]] | None = None, detections: list[dict] | None = None,
                   files: Mapping[str, Callable[[Any], Any]] | None = None,
                   folders: Mapping[str, Callable[[Path], Any]] | None = None,
                   per_image: PerImageStats | None = None,
                   weights_path: str | Path | None = None, state_dict: Mapping | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
        """Store one evaluated step; DONE is written last. Returns the step folder.

        The raw evaluation output: ``confusion=(matrix, class_ids)`` (semantic) or ``detections`` (instance),
        or a task's own artefacts: ``files`` (name -> ``write(binary file)``, written atomically) and
        ``folders`` (name -> ``fill(empty folder)``, filled under a temporary name and renamed into place).
        At least one of them; confusion and detections exclude each other.
        ``per_image`` (optional) is written as per_image.npz; with a confusion matrix, its tp / fp / fn sums
        must equal the matrix (checked, ValueError otherwise).
        Weights, optional: ``weights_path`` is *moved* into the folder (write it next to the run
        folder so this is a rename), or ``state_dict`` is saved with ``torch.save``. ``extra`` (e.g.
        timings) goes into the DONE marker.
        """
        files, folders = dict(files or {}), dict(folders or {})
        if confusion is not None and detections is not None:
            raise ValueError("write_step takes confusion=(matrix, class_ids) or detections=[...], not both")
        if confusion is None and detections is None and not files and not folders:
            raise ValueError("write_step needs the step's raw output: confusion, detections, files or folders")
        if weights_path is not None and state_dict is not None:
            raise ValueError("give weights_path or state_dict, not both")
        rows = _check_rows(metrics_rows, step)
        folder = self.step_dir(step)
        folder.mkdir(parents=True, exist_ok=True)
        previous = self._done_files(step)
        (folder / DONE).unlink(missing_ok=True)
        written = []
        if confusion is not None:
            matrix, class_ids = _confusion_arrays(*confusion)
            atomic_write(folder / CONFUSION, lambda f: np.savez(f, matrix=matrix, class_ids=class_ids))
            written.append(CONFUSION)
        if detections is not None:
            text = json.dumps(list(detections), separators=(",", ":"), default=_json_default)
            atomic_write(folder / DETECTIONS, lambda f: f.write(text.encode("utf-8")))
            written.append(DETECTIONS)
        for name, write in files.items():
            atomic_write(folder / name, write)
            written.append(name)
        for name, fill in folders.items():
            _atomic_folder(folder / name, fill)
            written.append(name)
        if per_image is not None:
            if confusion is not None and "tp" in per_image.arrays:
                check_against_confusion(per_image, matrix)
            atomic_write(folder / PER_IMAGE, lambda f: np.savez_compressed(f, **per_image.to_npz_dict()))
            written.append(PER_IMAGE)
        if weights_path is not None:
            _move_into(Path(weights_path), folder / WEIGHTS)
            written.append(WEIGHTS)
        elif state_dict is not None:
            import torch

            atomic_write(folder / WEIGHTS, lambda f: torch.save(state_dict, f))
            written.append(WEIGHTS)
        atomic_write(folder / STEP_METRICS, lambda f: f.write(_rows_to_csv(rows).encode("utf-8")))
        written.append(STEP_METRICS)
        for name in (set(_STORE_FILES) | previous) - set(written):   # leftovers of an earlier version of this step
            stale = folder / name
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        marker = {"step": int(step), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": written,
                  **dict(extra or {})}
        atomic_write(folder / DONE, lambda f: f.write(json.dumps(marker, default=_json_default).encode("utf-8")))
        self.rebuild_metrics()
        return folder

    def _done_files(self, step: int) -> set[str]:
        """The files (and folders) the step's DONE marker lists; empty when there is none."""
        marker = self.step_dir(step) / DONE
        try:
            names = json.loads(marker.read_text()).get("files", []) if marker.is_file() else []
        except (OSError, ValueError, AttributeError):
            return set()
        return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..", DONE)}

    def is_done(self, step: int) -> bool:
        return (self.step_dir(step) / DONE).is_file()

    def done_record(self, step: int) -> dict:
        """The JSON of a done step's DONE marker (files, finish time, extras such as its cost); {} if absent."""
        try:
            return json.loads((self.step_dir(step) / DONE).read_text())
        except (OSError, ValueError):
            return {}

    def done_steps(self) -> list[int]:
        steps = []
        for d in self.run_dir.glob("step_*"):
            suffix = d.name[len("step_"):]
            if d.is_dir() and suffix.isdigit() and (d / DONE).is_file():
                steps.append(int(suffix))
        return sorted(steps)

    def read_confusion(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix, class_ids)`` of a done semantic step."""
        path = self._done_file(step, CONFUSION)
        with np.load(path) as data:
            return data["matrix"], data["class_ids"]

    def read_per_image(self, step: int) -> PerImageStats | None:
        """The per-image statistics of a done step, None when the step has none (older runs, instance)."""
        path = self.step_dir(step) / PER_IMAGE
        if not self.is_done(step) or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return PerImageStats.from_npz(data)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"cannot read {path}: {err}",
                            hint="the file is corrupt: delete the step's DONE marker and re-run the step") from err

    def read_detections(self, step: int) -> list[dict]:
        return _read_json(self._done_file(step, DETECTIONS))

    def step_result(self, step: int) -> StepResult:
        """The stored raw evaluation output of a done step."""
        if (self.step_dir(step) / CONFUSION).is_file():
            matrix, class_ids = self.read_confusion(step)
            return StepResult(step=int(step), matrix=matrix, class_ids=class_ids, per_image=self.read_per_image(step))
        return StepResult(step=int(step), detections=self.read_detections(step), per_image=self.read_per_image(step))

    # ------------------------------------------------------------------------------------------ metrics
    def rebuild_metrics(self) -> Path:
        """Rewrite metrics.csv from the rows of every done step (atomically; no duplicates)."""
        frames = [read_metrics_csv(self.step_dir(t) / STEP_METRICS) for t in self.done_steps()]
        table = pd.concat(frames, ignore_index=True) if frames else _empty_table()
        atomic_write(self.metrics_path, lambda f: f.write(_frame_to_csv(table).encode("utf-8")))
        return self.metrics_path

    def read_metrics(self) -> pd.DataFrame:
        """This run's long table (empty when no step is done)."""
        return read_metrics_csv(self.metrics_path) if self.metrics_path.exists() else _empty_table()

    def _done_file(self, step: int, name: str) -> Path:
        path = self.step_dir(step) / name
        if not self.is_done(step) or not path.is_file():
            raise DataError(f"{path} is missing or its step is not complete (no DONE marker)",
                            hint="run the benchmark again with the same arguments to (re)compute the step")
        return path


def load_results(root: str | Path) -> pd.DataFrame:
    """Every run under ``root`` (any depth) as one long DataFrame: COLUMNS plus ``run_dir``.

    A run is a folder with a run.json; its rows come from its metrics.csv (done steps only).
    ``run_dir`` is the run folder relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"results folder {root} does not exist", hint="pass the --out folder of the runs")
    frames = []
    for run_json in sorted(root.rglob("run.json")):
        rel = run_json.parent.relative_to(root)
        if any(part.startswith(("_", ".")) for part in rel.parts):
            continue
        csv = run_json.parent / "metrics.csv"
        if not csv.is_file():
            continue
        frame = read_metrics_csv(csv)
        frame["run_dir"] = rel.as_posix() or "."
        frames.append(frame)
    if not frames:
        return _empty_table().assign(run_dir=pd.Series(dtype=str))
    return pd.concat(frames, ignore_index=True)


def read_metrics_csv(path: str | Path) -> pd.DataFrame:
    """A metrics.csv with its column types (class names are kept verbatim, empty value = NaN)."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values={"value": ["", "nan", "NaN"]},
                            dtype={"class_name": str, "method": str, "protocol": str, "metric": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"cannot read {path}: {err}", hint="delete the run folder's metrics.csv and "
                                                           "step_XX/DONE of the affected steps, then resume") from err
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks the columns {missing}", hint="it was not written by this benchmark version")
    try:
        return frame.astype({c: _DTYPES[c] for c in COLUMNS})
    except (ValueError, TypeError) as err:
        raise DataError(f"{path} has malformed values: {err}", hint="re-run the affected steps") from err


# ---------------------------------------------------------------------------------------------- helpers
def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through ``write(binary file)`` to a temporary sibling, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_folder(path: Path, fill: Callable[[Path], Any]) -> None:
    """Fill a fresh temporary sibling folder, then put it in place of ``path`` (a kill leaves a stray
    ``.name.tmp-PID`` folder or the old folder, never a half-filled ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise DataError(f"weights file {src} does not exist", hint="save the step's weights before storing the step")
    if src.resolve() == dst.resolve():
        return
    try:
        os.replace(src, dst)
    except OSError:   # another file system: copy to a temporary sibling, then rename
        with open(src, "rb") as source:
            atomic_write(dst, lambda f: shutil.copyfileobj(source, f))
        src.unlink()


def _confusion_arrays(matrix, class_ids) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix)
    ids = np.asarray([int(c) for c in class_ids], dtype=np.int64)
    if m.ndim != 2 or m.shape != (len(ids), len(ids)) or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"confusion matrix must be integer [{len(ids)}, {len(ids)}] for {len(ids)} class ids, "
                         f"got {m.dtype} {m.shape}")
    return m.astype(np.int64), ids


def _check_rows(rows: Iterable[Mapping[str, Any]], step: int) -> list[dict]:
    rows = [dict(r) for r in rows]
    for r in rows:
        missing = [c for c in COLUMNS if c not in r]
        if missing:
            raise ValueError(f"metric row lacks {missing}: {r}")
        if int(r["step"]) != int(step):
            raise ValueError(f"a metric row of step {r['step']} was passed to write_step({step})")
    runs = {(r["method"], r["protocol"], int(r["seed"])) for r in rows}
    if len(runs) > 1:
        raise ValueError(f"metric rows of one step must belong to one run, got {sorted(runs)}")
    return rows


def _rows_to_csv(rows: list[dict]) -> str:
    return _frame_to_csv(pd.DataFrame(rows, columns=list(COLUMNS)) if rows else _empty_table())


def _frame_to_csv(frame: pd.DataFrame) -> str:
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[list(COLUMNS) + extra].to_csv(index=False, na_rep="", lineterminator="\n")


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES[c] if _DTYPES[c] is not str else object) for c in COLUMNS})


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}", hint="the file is corrupt: delete it and re-run the step") from err


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist"):          # torch tensors
        return obj.tolist()
    if hasattr(obj, "to_dict"):         # Protocol
        return obj.to_dict()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON: {obj!r}")
