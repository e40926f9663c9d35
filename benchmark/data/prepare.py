"""Check a dataset layout, and with ``--download`` fetch, verify, extract and convert what is missing.

    python -m benchmark.data.prepare {voc,ade,coco,ade-inst,ade-pan,coco-pan,synth} --root DIR [--download] [--verify]

Without ``--download`` it lists every missing folder or file and exits 1 (0 when the layout is complete).
With ``--download`` it fetches only the official archives (``benchmark/data/sources.json``) whose content
is missing, resumes partial downloads, checks their md5, extracts them under DIR and runs the conversions
the readers need (VOC's train_aug list, the ADE20K-instance jsons, the ADE20K panoptic json and PNGs built
from the semantic and instance annotations, COCO's panoptic PNGs unpacked from the zips inside
``panoptic_annotations_trainval2017.zip``), then checks again. ``--verify``
also reads every annotation once (which fills the class-presence cache). ``synth`` generates the
synthetic dataset under DIR (default: the cache dir); there is nothing to download.

    python -m benchmark.data.prepare weights r50|r101|swin-t|swin-b [--root DIR]

fetches the ImageNet backbone a paper preset starts from and converts it once (benchmark.data.weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmark.errors import DataError, UserError

from . import ade, ade_instance, coco, voc
from .convert import ade_instance_json, ade_panoptic, voc_train_aug_list
from .download import Source, count_files, download, extract, file_sha256
from .panoptic import panoptic_layout
from .registry import open_dataset
from .synth import SynthSpec, ensure_synth
from .weights import SOURCES as WEIGHT_SOURCES
from .weights import load_weight_sources, prepare_weights

DATASETS = ("voc", "ade", "coco", "ade-inst", "ade-pan", "coco-pan", "synth")
SOURCES = Path(__file__).with_name("sources.json")


def load_sources(path: Path = SOURCES) -> dict[str, list[Source]]:
    try:
        data = json.loads(Path(path).read_text())
        return {name: [Source.from_dict(e) for e in entries] for name, entries in data.items()
                if not name.startswith("_")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read the archive list {path}: {err}", hint="restore benchmark/data/sources.json") from None


def required(dataset: str, root: Path) -> list[tuple[Path, str]]:
    """(path, what it is) of everything the reader of ``dataset`` needs under ``root``."""
    if dataset == "voc":
        layouts = voc.layouts(root)
        layout = next((lay for lay in layouts if lay.folder.is_dir() and lay.images.is_dir()), layouts[1])
        return [(layout.images, "images"), (layout.labels, "SegmentationClassAug label maps"),
                (layout.list_file("train"), "train split list (train_aug)"), (layout.list_file("val"), "val split list")]
    if dataset in ("ade", "ade-inst"):
        folder = root / ade.FOLDER
        layout = ade.AdeLayout(folder)
        items = [(layout.images(s), f"{s} images") for s in ("train", "val")]
        if dataset == "ade":
            for s in ("train", "val"):
                items.append((layout.annotations(s) or layout.raw_annotations(s), f"{s} annotation PNGs "
                              f"(or {layout.detectron2_annotations(s).relative_to(root)})"))
        else:
            items += [(ade_instance.paths(folder, s)[0], f"{s} instance json") for s in ("train", "val")]
        return items
    if dataset == "coco":
        folder = root / coco.FOLDER
        items = []
        for s in ("train", "val"):
            json_path, images = coco.paths(folder, s)
            items += [(images, f"{s} images"), (json_path, f"{s} instance annotations")]
        return items
    if dataset in ("ade-pan", "coco-pan"):
        items = []
        for s in ("train", "val"):
            json_path, png_dir, images = panoptic_layout(dataset, root, s)
            items += [(images, f"{s} images"), (json_path, f"{s} panoptic json"), (png_dir, f"{s} panoptic PNGs")]
        return items
    raise DataError(f"unknown dataset {dataset!r}", hint=f"use one of {', '.join(DATASETS)}")


def missing(dataset: str, root: Path) -> list[str]:
    return [f"{path} ({what})" for path, what in required(dataset, root) if not path.exists()]


def check(dataset: str, root: Path, verify: bool = False, cache_dir=None) -> tuple[list[str], dict[str, int]]:
    """(problems, images per split): paths first, then each split opened (and read fully with ``verify``)."""
    problems = [f"missing: {m}" for m in missing(dataset, root)]
    counts: dict[str, int] = {}
    if problems:
        return problems, counts
    for split in ("train", "val"):
        try:
            ds = open_dataset(dataset, root, split, cache_dir=cache_dir)
            if verify:
                ds.presence()
            counts[split] = len(ds)
        except DataError as err:
            problems.append(f"{split}: {err.message}")
    return problems, counts


def fetch(dataset: str, root: Path, sources: dict[str, list[Source]], keep_archives: bool, progress: bool,
          out=print) -> None:
    """Download and extract the archives of ``dataset`` whose content is missing, then convert."""
    for source in sources.get(dataset, []):
        if all((root / p).exists() for p in source.provides):
            continue
        out(f"fetching {source.url}")
        archive = download(source, root / "downloads", progress)
        if source.md5 is None:
            out(f"  {source.file}: no published checksum; sha256 {file_sha256(archive)}")
        target = root / source.extract_to
        out(f"extracting {archive.name} into {target}")
        extract(archive, target)
        for folder, expected in source.expect_files.items():
            found = count_files(root / folder)
            if found < expected:
                raise DataError(f"{root / folder} holds {found} files after extracting {archive.name}, "
                                f"expected {expected}", hint=f"delete {archive} and run the command again")
        if not keep_archives:
            archive.unlink()
    convert(dataset, root, progress, out)


def convert(dataset: str, root: Path, progress: bool, out=print) -> None:
    if dataset == "voc":
        layout = next((lay for lay in voc.layouts(root) if lay.images.is_dir()), None)
        if layout and not layout.list_file("train").exists() and layout.labels.is_dir() \
                and layout.list_file("val").exists():
            out(f"writing {voc_train_aug_list(layout.list_file('val'), layout.labels)}")
    elif dataset == "ade-inst":
        folder = root / ade.FOLDER
        for split in ("train", "val"):
            json_path = ade_instance.paths(folder, split)[0]
            if not json_path.exists() and (folder / "annotations_instance").is_dir():
                out(f"writing {ade_instance_json(folder, split, progress)}")
    elif dataset == "ade-pan":
        folder = root / ade.FOLDER
        for split in ("train", "val"):
            json_path = panoptic_layout(dataset, root, split)[0]
            if not json_path.exists() and (folder / "annotations_instance").is_dir():
                out(f"writing {ade_panoptic(folder, split, progress)}")
    elif dataset == "coco-pan":
        # panoptic_annotations_trainval2017.zip holds the jsons and, as zips inside annotations/, the PNGs
        for split in ("train", "val"):
            json_path, png_dir, _ = panoptic_layout(dataset, root, split)
            inner = json_path.with_suffix(".zip")
            if not png_dir.exists() and inner.exists():
                out(f"extracting {inner.name} into {png_dir.parent}")
                extract(inner, png_dir.parent)


def prepare(dataset: str, root: Path, *, download_missing: bool = False, verify: bool = False,
            sources_path: Path = SOURCES, keep_archives: bool = False, progress: bool = True, cache_dir=None,
            out=print) -> int:
    """The command's work; returns the exit status (0 complete, 1 incomplete)."""
    problems, counts = check(dataset, root, verify and not download_missing, cache_dir)
    if problems and download_missing:
        root.mkdir(parents=True, exist_ok=True)
        fetch(dataset, root, load_sources(sources_path), keep_archives, progress, out)
        problems, counts = check(dataset, root, verify, cache_dir)
    if problems:
        out(f"{dataset}: the layout under {root} is incomplete")
        for problem in problems:
            out(f"  {problem}")
        if dataset == "voc":
            out(f"  (accepted layouts: {voc.expected_text(root)})")
        if not download_missing:
            out(f"run `python -m benchmark.data.prepare {dataset} --root {root} --download` to fetch and convert it")
        return 1
    out(f"{dataset}: ok under {root} (" + ", ".join(f"{s} {n} images" for s, n in counts.items()) + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=DATASETS + ("weights",),
                        help="a dataset, or 'weights' followed by the name of pretrained backbone weights")
    parser.add_argument("name", nargs="?", help="weights: " + " | ".join(load_weight_sources()))
    parser.add_argument("--root", default=None, help="the data root (synth: where to generate, default the cache dir; "
                                                     "weights: where to write, default $CISDQ_BENCH_WEIGHTS or "
                                                     "<cache dir>/weights)")
    parser.add_argument("--download", action="store_true", help="fetch, verify, extract and convert what is missing")
    parser.add_argument("--verify", action="store_true", help="also read every annotation once")
    parser.add_argument("--sources", default=str(SOURCES), help="archive list (default: benchmark/data/sources.json; "
                                                                "weights: benchmark/data/weights.json)")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded archives after extraction")
    parser.add_argument("--num-classes", type=int, default=20, help="synth: number of classes K")
    parser.add_argument("--seed", type=int, default=0, help="synth: dataset seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "weights":
            if args.name is None:
                parser.error("weights: name the weights, e.g. `weights r50` (" + ", ".join(load_weight_sources()) + ")")
            prepare_weights(args.name, args.root, sources_path=Path(args.sources) if args.sources != str(SOURCES)
                            else WEIGHT_SOURCES, keep_download=args.keep_archives, progress=not args.quiet)
            return 0
        if args.name is not None:
            parser.error(f"unexpected argument {args.name!r} after {args.dataset}")
        if args.dataset == "synth":
            spec = SynthSpec(num_classes=args.num_classes, seed=args.seed)
            folder = ensure_synth(spec, args.root, progress=not args.quiet)
            print(f"synth: ok at {folder} ({spec.train_images} train, {spec.val_images} val images, "
                  f"{spec.num_classes} classes)")
            return 0
        if args.root is None:
            parser.error("--root DIR is required for real datasets")
        return prepare(args.dataset, Path(args.root).expanduser(), download_missing=args.download, verify=args.verify,
                       sources_path=Path(args.sources), keep_archives=args.keep_archives, progress=not args.quiet)
    except UserError as err:
        return err.report()


if __name__ == "__main__":
    sys.exit(main())
