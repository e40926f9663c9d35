"""Pretrained ImageNet backbones by name: ``python -m benchmark.data.prepare weights r50|r101|swin-t|swin-b``.

The sources (URL, checksum, which paper preset they fit) are data: ``benchmark/data/weights.json``. The
download resumes and is checked (sha256, full or torchvision's 8-digit prefix); the file is then loaded
into the preset's backbone with the strict loader of :mod:`benchmark.engine.backbone_weights` (every
tensor accounted for) and saved once as ``<weights dir>/<name>.safetensors`` in transformers' key names,
with ``<name>.json`` beside it (source URL, sha256, load report). ``--backbone-weights r50`` then finds
it there. The weights dir is ``$CISDQ_BENCH_WEIGHTS`` when set, else ``<cache>/weights``
(``$CISDQ_BENCH_CACHE``, default ``~/.cache/cisdq-bench``); ``prepare weights --root DIR`` writes to DIR
instead, which ``--backbone-weights DIR/r50.safetensors`` (or ``CISDQ_BENCH_WEIGHTS=DIR``) then reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import ConfigError, DataError

from .cache import cache_root
from .download import Source, download, file_sha256

WEIGHTS_ENV = "CISDQ_BENCH_WEIGHTS"
SOURCES = Path(__file__).with_name("weights.json")


@dataclass(frozen=True)
class WeightSource:
    name: str
    preset: str
    file: str
    url: str
    sha256: str | None
    note: str = ""


def load_weight_sources(path: str | os.PathLike = SOURCES) -> dict[str, WeightSource]:
    try:
        data = json.loads(Path(path).read_text())
        return {name: WeightSource(name, e["preset"], e["file"], e["url"], e.get("sha256"), e.get("note", ""))
                for name, e in data.items() if not name.startswith("_")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"cannot read the weight list {path}: {err}",
                        hint="restore benchmark/data/weights.json") from None


def weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else cache_root() / "weights"


def converted_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    return weights_dir(folder) / f"{name}.safetensors"


def resolve_backbone_weights(value: str | None, preset: str) -> str | None:
    """``--backbone-weights``: a path as given, or a name of weights.json looked up in the weights dir.

    A name of other weights than the preset's, or one not prepared yet, is a ConfigError naming the
    command that fixes it.
    """
    if value is None or Path(value).expanduser().exists():
        return value
    sources = load_weight_sources()
    if value not in sources:
        raise ConfigError(f"--backbone-weights {value}: no such file, and not a known weight name",
                          hint=f"pass a file or folder, or one of {', '.join(sources)} after "
                               f"`python -m benchmark.data.prepare weights NAME`")
    source = sources[value]
    if source.preset != preset:
        raise ConfigError(f"--backbone-weights {value} are the {source.preset} preset's weights, "
                          f"but the model preset is {preset}", hint=f"use --engine {source.preset}, or the "
                          f"weights of {preset}" + (f" (--backbone-weights {preset})" if preset in sources else ""))
    path = converted_path(value)
    if not path.is_file():
        raise ConfigError(f"--backbone-weights {value}: {path} does not exist yet",
                          hint=f"run `python -m benchmark.data.prepare weights {value}` first (it downloads "
                               f"{source.file} and converts it), or set ${WEIGHTS_ENV} to where you prepared it")
    return str(path)


def prepare_weights(name: str, root: str | os.PathLike | None = None, *, sources_path=SOURCES,
                    keep_download: bool = False, progress: bool = True, out=print) -> Path:
    """Download, verify and convert the weights called ``name``; returns the converted file."""
    from types import SimpleNamespace

    from safetensors.torch import save_file
    from transformers import AutoBackbone

    from benchmark.engine.backbone_weights import load_backbone_weights
    from benchmark.engine.presets import get_preset

    sources = load_weight_sources(sources_path)
    if name not in sources:
        raise DataError(f"unknown weights {name!r}", hint=f"choose one of {', '.join(sources)}")
    source = sources[name]
    folder = weights_dir(root)
    target = folder / f"{name}.safetensors"
    if target.is_file():
        out(f"{name}: ok at {target}")
        return target
    out(f"fetching {source.url}")
    downloaded = download(Source(source.file, source.url, None, ".", (), sha256=source.sha256),
                          folder / "downloads", progress)
    sha256 = file_sha256(downloaded)
    if not source.sha256:
        out(f"  {source.file}: no published checksum; sha256 {sha256} (recorded in {name}.json)")

    holder = SimpleNamespace(backbone=AutoBackbone.from_config(get_preset(source.preset).backbone.to_config()))
    report = load_backbone_weights(holder, downloaded, strict=True)
    loaded = set(report.loaded)
    state = {k: v.contiguous() for k, v in holder.backbone.state_dict().items() if k in loaded}
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    save_file(state, str(part), metadata={"source": source.url, "sha256": sha256})
    (folder / f"{name}.json").write_text(json.dumps(
        {"name": name, "preset": source.preset, "source": source.url, "file": source.file, "sha256": sha256,
         "published_sha256": source.sha256, "format": report.format, "tensors": len(report.loaded),
         "ignored": report.ignored, "new_layers": report.new_layers, "note": source.note}, indent=2) + "\n")
    os.replace(part, target)
    if not keep_download:
        downloaded.unlink()
    out(f"{name}: {len(report.loaded)} tensors from {source.file} ({report.format} names) -> {target}")
    return target
