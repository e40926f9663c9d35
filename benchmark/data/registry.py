"""``open_dataset``: one entry point for every reader.

Every dataset object offers ``name``, ``split``, ``task`` ("semantic" | "instance" | "panoptic"),
``len(ds)``, ``image_id(i)``, ``image_path(i)``, ``classes_in(i)``, ``load(i)``, ``load_image(i)``,
``class_ids`` and ``fingerprint``; semantic datasets add ``load_label(i)`` (uint8 native ids), instance
datasets ``load_target(i)``, ``class_names`` and ``coco_json_path``, panoptic datasets ``load_target(i)``
(a PanopticTarget), ``categories``, ``thing_ids``, ``json_path`` and ``png_dir``.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from benchmark.errors import ConfigError, DataError

from .ade import open_ade
from .ade_instance import open_ade_instance
from .cache import cache_root
from .coco import open_coco
from .instance import CocoFormatDataset
from .semantic import SemanticDataset
from .panoptic import PanopticDataset, open_panoptic
from .synth import SynthSpec, ensure_synth, panoptic_paths
from .voc import open_voc

DATASETS = ("voc", "ade", "ade-inst", "coco", "ade-pan", "coco-pan", "synth", "synth-inst", "synth-pan")
SPLITS = ("train", "val")
ROOT_ENV = "DETECTRON2_DATASETS"


def open_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", *,
                 spec: SynthSpec | None = None, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, **synth_options) -> SemanticDataset | CocoFormatDataset:
    """Open split ``split`` ("train" | "val") of dataset ``name``.

    Real datasets (voc, ade, ade-inst, coco) are read from the data root ``root`` (None: the
    ``$DETECTRON2_DATASETS`` folder the Mask2Former-based repositories use). ``synth`` (semantic) and
    ``synth-inst`` (instance) read the same generated folder: ``root`` is where it is generated (None:
    the cache dir), ``spec`` or keyword options (``num_classes=20, seed=0, ...``, see :class:`SynthSpec`)
    describe it. ``cache_dir`` overrides where presence tables and converted files are cached.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}", hint=f"known datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} of dataset {name!r}", hint="use 'train' or 'val'")
    if name.startswith("synth"):
        return _open_synth(name, root, split, spec, cache_dir, progress, synth_options)
    if spec is not None or synth_options:
        given = ["spec"] * (spec is not None) + sorted(synth_options)
        raise ConfigError(f"options {', '.join(given)} only apply to the synthetic dataset, not to {name!r}")
    if root is None:
        env = os.environ.get(ROOT_ENV)
        if not env:
            raise DataError(f"no data root given for dataset {name!r}",
                            hint=f"pass the folder that holds the datasets (--data-root DIR) or set ${ROOT_ENV}; "
                                 f"`python -m benchmark.data.prepare {name} --root DIR` says what it must contain")
        root = env
    root = Path(root).expanduser()
    if name == "voc":
        return open_voc(root, split, cache_dir)
    if name == "ade":
        return open_ade(root, split, cache_dir)
    if name == "ade-inst":
        return open_ade_instance(root, split, cache_dir)
    if name in ("ade-pan", "coco-pan"):
        return open_panoptic(name, root, split, cache_dir)
    return open_coco(root, split, cache_dir)


def _open_synth(name, root, split, spec, cache_dir, progress, options):
    if spec is not None and options:
        raise ConfigError("give the synthetic dataset either spec= or keyword options, not both")
    if spec is None:
        known = {f.name for f in fields(SynthSpec)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown synthetic dataset option(s): {', '.join(unknown)}",
                              hint=f"options: {', '.join(sorted(known))}")
        spec = SynthSpec(**options)
    folder = ensure_synth(spec, cache_root(cache_dir) / "synth" if root is None else root, progress)
    k = spec.num_classes
    # The synthetic splits are small (600 + 120 images of 64-96 px by default), so the semantic and panoptic
    # readers keep what they decode (benchmark.data.decoded); the instance reader decodes per call.
    if name == "synth":
        ds = open_ade(folder, split, cache_dir, num_classes=k, name="synth", dataset="synth")
        ds.keep_decoded()
        return ds
    if name == "synth-pan":
        if not spec.panoptic:
            raise ConfigError("synth-pan needs a SynthSpec with stuff_classes > 0",
                              hint="pass stuff_classes=protocols.synthetic.default_stuff_classes(K)")
        json_path, png_dir, image_dir = panoptic_paths(folder, split)
        ds = PanopticDataset("synth-pan", split, json_path, png_dir, image_dir, cache_dir=cache_dir,
                             prepare_hint=f"delete {folder} to regenerate the synthetic dataset")
        ds.keep_decoded()
        return ds
    base = folder / "ADEChallengeData2016"
    json_path = base / f"synth_instance_{split}.json"
    image_dir = base / "images" / ("training" if split == "train" else "validation")
    return CocoFormatDataset("synth-inst", split, json_path, image_dir, id_space=tuple(range(1, k + 1)),
                             cache_dir=cache_dir, root=folder,
                             prepare_hint=f"delete {folder} to regenerate the synthetic dataset")
