"""Protocol names -> Protocol objects: the grammar, aliases, named class orders and the listing.

Grammar (protocols.md), case-insensitive::

    <dataset>-<base>-<increment>[-disjoint][@<order>][~joint][~synth]
    <dataset>-joint[@<order>]             (alias <dataset>-offline: one step with every class)
    <dataset>-<s0>-<s1>-<s2>...           (explicit step sizes, e.g. voc-10-5-5; must add up to the dataset)

- datasets: voc, ade, ade-inst, coco, ade-pan, coco-pan, synth, synth-inst, synth-pan. ``base`` classes are learned at step 0, then
  ``increment`` classes per step until the dataset is exhausted; a combination that does not divide the
  remaining classes is refused. VOC counts the 20 object classes; its background 0 is always added to
  step 0.
- ``-disjoint`` selects the disjoint image filter (default overlap; ``-overlap`` may be spelled out).
- orders: the dataset's default order; a named order of the literature kept as data in
  ``named_orders.json`` (``ade-100-50@b``, ``voc-15-1@b`` .. ``@w``, ...: MiB's tasks 100-50b/c, 100-10b/c,
  50b/c and 19-1b, PLOP's 15-5s_b..w; CoMFormer's ADE "order b" is MiB's "c", i.e. ``@c`` here; named
  orders are per split, as in the original task files); ``@rand<N>``: the dataset's
  non-background class ids (ascending) permuted by ``numpy.random.default_rng(N).permutation``, split
  with the same step sizes.
- ``~joint`` / ``~synth`` derive a protocol (:meth:`Protocol.as_joint`, :meth:`Protocol.on_synthetic`).
- synthetic: ``synth-<b>-<i>`` uses K = b + n*i classes with n = max(1, ceil((20 - b) / i)) increments,
  so the default 20-class synthetic dataset is used whenever b + n*i = 20 (synth-10-2, synth-10-5,
  synth-15-5, ...); otherwise the generator draws K classes (K <= 150). ``synth-joint`` has 20 classes.

Canonical names: the two-number form whenever the increments are uniform (``ade-100-10-10-10-10-10`` is
``ade-100-10``), the literature's spelling where it differs (``voc-10-5-5``, not ``voc-10-5``), the
order suffix omitted for the default order, ``-overlap`` omitted. :func:`get_protocol` always returns
the protocol under its canonical name.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, NoReturn

import numpy as np

from benchmark.errors import ConfigError

from .datasets import DATASETS, SYNTHETIC_DATASETS, DatasetSpec, dataset_spec
from .protocol import Protocol
from .synthetic import DEFAULT_CLASSES, MAX_CLASSES

GRAMMAR = ("protocol names are <dataset>-<base>-<increment>[-disjoint][@<order>] or <dataset>-joint, "
           f"with <dataset> one of {', '.join(DATASETS)}; <order> is a named order (e.g. ade-100-50@b, "
           "voc-15-1@c) or rand<N>; append ~joint or ~synth to derive the joint or synthetic version")

# Protocols of the literature (protocols.md table), as canonical split names.
TABLE = (
    "voc-19-1", "voc-15-5", "voc-15-1", "voc-10-1", "voc-10-5-5",
    "ade-100-50", "ade-100-10", "ade-100-5", "ade-50-50", "ade-50-10", "ade-50-20",
    "ade-inst-50-50", "ade-inst-50-10", "ade-inst-50-5", "ade-inst-25-25",
    "coco-40-40", "coco-40-20", "coco-40-8", "coco-40-4", "coco-60-20",
    # Continual panoptic (CoMFormer, ECLIPSE, BalConpas, SimCIS: ADE20K 100-x / 50-x; ECLIPSE: COCO 83-x).
    "ade-pan-100-50", "ade-pan-100-10", "ade-pan-100-5", "ade-pan-50-50", "ade-pan-50-20", "ade-pan-50-10",
    "coco-pan-83-10", "coco-pan-83-5",
)
# VOC is reported in both modes by MiB and PLOP.
VOC_DISJOINT = ("voc-19-1-disjoint", "voc-15-5-disjoint", "voc-15-1-disjoint", "voc-10-1-disjoint",
                "voc-10-5-5-disjoint")
SYNTHETIC_EXAMPLES = ("synth-10-2", "synth-10-5", "synth-10-10", "synth-15-5",
                      "synth-inst-10-2", "synth-inst-10-5", "synth-inst-10-10",
                      "synth-pan-10-2", "synth-pan-10-5", "synth-pan-10-10")

# Other spellings of a split (MiB/PLOP task names) -> canonical split name.
SPLIT_ALIASES: Mapping[str, str] = {
    "voc-15-5s": "voc-15-1",   # MiB/PLOP task '15-5s' is the 15-1 protocol
    "voc-10-5": "voc-10-5-5",  # MiB's name for base 10 + two steps of 5
    "ade-50": "ade-50-50",     # MiB/PLOP task '50'
}
JOINT_WORDS = ("joint", "offline")

_DATASET_RE = re.compile(r"^(?P<dataset>ade-inst|ade-pan|coco-pan|synth-inst|synth-pan|voc|ade|coco|synth)-(?P<rest>.+)$")
_SIZES_RE = re.compile(r"^\d+(?:-\d+)+$")
_MODE_RE = re.compile(r"^(?P<split>.+?)(?:-(?P<mode>disjoint|overlap))?$")
_ORDER_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_RAND_RE = re.compile(r"^rand(\d+)$")


@dataclass(frozen=True)
class _Split:
    """A parsed split: dataset, step sizes (VOC background not counted) and canonical split name."""

    dataset: DatasetSpec
    sizes: tuple[int, ...]
    name: str


# --------------------------------------------------------------------------------------------- public API
def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (canonical name, alias, or either with ``~joint`` / ``~synth``).

    Raises ConfigError for unknown or malformed names, suggesting the nearest valid names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a protocol name must be a non-empty string, got {name!r}", hint=GRAMMAR)
    return _build(name.strip().lower())


def available_protocols() -> list[str]:
    """Sorted canonical names: the literature's protocols, the joint ones, named orders, synthetic examples."""
    names = set(TABLE) | set(VOC_DISJOINT) | set(SYNTHETIC_EXAMPLES)
    names |= {f"{d}-joint" for d in DATASETS}
    names |= set(_named_orders())
    return sorted(names)


def describe_protocols() -> list[dict[str, Any]]:
    """One row per available protocol (for ``run_benchmark.py --list protocols``).

    Keys: name, dataset, task, mode, order, steps (the native ids of each step, lists), num_steps,
    classes and num_classes (both the number of classes: ``classes`` as the spec names it,
    ``num_classes`` as benchmark/cli.py reads it), sizes (classes per step, e.g. '100+10x5', VOC's
    background counted) and aliases (other accepted spellings, comma-separated).
    """
    rows = []
    for name in available_protocols():
        p = get_protocol(name)
        rows.append({
            "name": p.name, "dataset": p.dataset, "task": p.task, "mode": p.mode, "order": p.order,
            "steps": [list(step) for step in p.steps], "num_steps": p.num_steps,
            "classes": len(p.all_classes), "num_classes": len(p.all_classes),
            "sizes": _format_sizes(p.step_sizes), "aliases": ", ".join(_aliases_of(p.name)),
        })
    return rows


# --------------------------------------------------------------------------------------------- building
@lru_cache(maxsize=512)
def _build(name: str) -> Protocol:
    root, *derivations = name.split("~")
    protocol = _build_root(root, name)
    for derivation in derivations:
        if derivation == "joint":
            protocol = protocol.as_joint()
        elif derivation == "synth":
            protocol = protocol.on_synthetic()
        else:
            _unknown(name, f"'~{derivation}' is not a derivation (use ~joint or ~synth)")
    return protocol


def _build_root(root: str, full_name: str) -> Protocol:
    head, has_order, order = root.partition("@")
    if has_order and not _ORDER_RE.match(order):
        _unknown(full_name, f"'@{order}' is not an order name (use a letter name such as @b, or @rand<N>)")
    order = order if has_order else "default"
    seeded = _RAND_RE.match(order)
    if seeded:
        order = f"rand{int(seeded.group(1))}"   # rand03 -> rand3: one name per permutation
    mode_match = _MODE_RE.match(head)
    split_text, mode = mode_match.group("split"), mode_match.group("mode") or "overlap"
    split = _parse_split(SPLIT_ALIASES.get(split_text, split_text), full_name)
    if mode == "disjoint" and len(split.sizes) == 1:
        _unknown(full_name, "a one-step (joint) protocol has no future classes, so '-disjoint' does not apply")

    steps = _steps(split, order, full_name)
    canonical = split.name + ("-disjoint" if mode == "disjoint" else "") + ("" if order == "default" else f"@{order}")
    spec = split.dataset
    return Protocol(name=canonical, dataset=spec.name, task=spec.task, mode=mode, order=order, steps=steps,
                    class_names=spec.class_names, num_dataset_classes=spec.num_classes)


def _parse_split(text: str, full_name: str) -> _Split:
    match = _DATASET_RE.match(text)
    if not match:
        _unknown(full_name, f"it does not start with a dataset name ({', '.join(DATASETS)})")
    dataset, rest = match.group("dataset"), match.group("rest")
    synthetic = dataset in SYNTHETIC_DATASETS

    if rest in JOINT_WORDS:
        spec = dataset_spec(dataset)
        return _Split(spec, (len(spec.default_order),), f"{dataset}-joint")
    if not _SIZES_RE.match(rest):
        _unknown(full_name, f"'{rest}' is not <base>-<increment>, explicit step sizes, or 'joint'")

    numbers = tuple(int(n) for n in rest.split("-"))
    if any(n == 0 for n in numbers):
        _unknown(full_name, "every step needs at least one class (a size is 0)")
    if len(numbers) == 2:
        sizes = _uniform_sizes(dataset, *numbers, full_name)
    else:
        sizes = numbers
        if not synthetic:
            _check_total(dataset, sizes, full_name)
    if synthetic and sum(sizes) > MAX_CLASSES:
        raise ConfigError(f"protocol {full_name!r} needs {sum(sizes)} synthetic classes, at most {MAX_CLASSES} exist",
                          hint=f"choose sizes adding up to at most {MAX_CLASSES}")
    spec = dataset_spec(dataset, sum(sizes) if synthetic else None)
    split_name = _canonical_split(dataset, sizes)
    return _Split(spec, sizes, SPLIT_ALIASES.get(split_name, split_name))


def _uniform_sizes(dataset: str, base: int, inc: int, full_name: str) -> tuple[int, ...]:
    if dataset in SYNTHETIC_DATASETS:
        # Enough increments to reach the default 20 classes, at least one (protocols.md).
        n = max(1, math.ceil((DEFAULT_CLASSES - base) / inc))
        return (base,) + (inc,) * n
    total = len(dataset_spec(dataset).default_order)
    remaining = total - base
    if remaining <= 0:
        raise ConfigError(
            f"protocol {full_name!r}: a base of {base} leaves no class for later steps "
            f"({dataset} splits {total} classes)",
            hint=f"use a base below {total}, or '{dataset}-joint' for one step with every class")
    if remaining % inc:
        valid = [d for d in range(1, remaining + 1) if remaining % d == 0]
        raise ConfigError(
            f"protocol {full_name!r}: the {remaining} {dataset} classes after a base of {base} cannot be split into "
            f"steps of {inc}",
            hint=f"increments that divide {remaining}: {', '.join(map(str, valid))}; or give explicit step sizes "
                 f"such as {dataset}-{base}-{'-'.join(_greedy_sizes(remaining, inc))}" + _suggest(full_name))
    return (base,) + (inc,) * (remaining // inc)


def _check_total(dataset: str, sizes: tuple[int, ...], full_name: str) -> None:
    total = len(dataset_spec(dataset).default_order)
    if sum(sizes) != total:
        raise ConfigError(
            f"protocol {full_name!r}: explicit step sizes {'+'.join(map(str, sizes))} = {sum(sizes)} classes, "
            f"but {dataset} splits {total} classes" + (" (background 0 excluded)" if dataset == "voc" else ""),
            hint=f"the sizes must add up to {total}; or use <dataset>-<base>-<increment>" + _suggest(full_name))


def _canonical_split(dataset: str, sizes: tuple[int, ...]) -> str:
    """The two-number name if it parses back to the same sizes, else the explicit sizes."""
    if len(sizes) >= 2 and len(set(sizes[1:])) == 1:
        base, inc = sizes[0], sizes[1]
        if dataset not in SYNTHETIC_DATASETS or _uniform_sizes(dataset, base, inc, "") == sizes:
            return f"{dataset}-{base}-{inc}"
    return f"{dataset}-" + "-".join(map(str, sizes))


def _steps(split: _Split, order: str, full_name: str) -> tuple[tuple[int, ...], ...]:
    spec = split.dataset
    if order == "default":
        classes = spec.default_order
    elif _RAND_RE.match(order):
        seed = int(order[4:])
        classes = tuple(int(c) for c in np.random.default_rng(seed).permutation(sorted(spec.default_order)))
    else:
        named = _named_orders()
        key = f"{split.name}@{order}"
        if key not in named:
            here = sorted(k for k in named if k.startswith(split.name + "@"))
            raise ConfigError(
                f"protocol {full_name!r}: {split.name} has no named order '{order}'",
                hint=(f"named orders of {split.name}: {', '.join('@' + k.split('@')[1] for k in here)}" if here else
                      f"named orders exist for {', '.join(sorted({k.split('@')[0] for k in named}))}")
                     + "; any split accepts @rand<N>")
        return named[key]
    steps, start = [], 0
    for size in split.sizes:
        steps.append(classes[start:start + size])
        start += size
    if spec.background is not None:
        steps[0] = (spec.background,) + steps[0]
    return tuple(steps)


@lru_cache(maxsize=1)
def _named_orders() -> Mapping[str, tuple[tuple[int, ...], ...]]:
    """The explicit step lists of named orders (MiB / PLOP task files), read from named_orders.json."""
    text = resources.files("protocols").joinpath("named_orders.json").read_text(encoding="utf-8")
    splits = json.loads(text)["splits"]
    return {name: tuple(tuple(int(c) for c in step) for step in steps) for name, steps in splits.items()}


# --------------------------------------------------------------------------------------------- errors & text
def _close(name: str) -> list[str]:
    return difflib.get_close_matches(name, available_protocols(), n=5, cutoff=0.6)


def _suggest(name: str) -> str:
    close = _close(name)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _unknown(name: str, problem: str) -> NoReturn:
    raise ConfigError(f"unknown protocol {name!r}: {problem}{_suggest(name)}",
                      hint=GRAMMAR + "; run_benchmark.py --list protocols lists them all")


def _greedy_sizes(remaining: int, inc: int) -> list[str]:
    sizes = [inc] * (remaining // inc)
    return [str(s) for s in sizes + ([remaining % inc] if remaining % inc else [])]


def _format_sizes(sizes: tuple[int, ...]) -> str:
    if len(sizes) > 2 and len(set(sizes[1:])) == 1:
        return f"{sizes[0]}+{sizes[1]}x{len(sizes) - 1}"
    return "+".join(map(str, sizes))


def _aliases_of(name: str) -> list[str]:
    root, _, order = name.partition("@")
    suffix = f"@{order}" if order else ""
    aliases = [alias + suffix for alias, target in SPLIT_ALIASES.items() if root == target]
    aliases += [alias + "-disjoint" + suffix for alias, target in SPLIT_ALIASES.items() if root == target + "-disjoint"]
    if root.endswith("-joint"):
        aliases.append(root[: -len("joint")] + "offline" + suffix)
    return aliases
