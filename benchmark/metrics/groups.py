"""Class groups of a continual protocol at step t (protocols.md, "Evaluation and metric conventions").

With ``s(c)`` the step that introduces class c:

- ``base``  : s(c) = 0                 (the papers' "1-100" / "0-15" column)
- ``novel`` : 1 <= s(c) <= t           (the papers' "101-150" column, restricted to what is learned)
- ``old``   : s(c) < t
- ``new``   : s(c) = t
- ``seen``  : s(c) <= t                (at the final step: every class, the papers' "all")

VOC's background (native id 0, a real class learned at step 0) is counted like any base class by default
(PLOP's "0-15" tables); ``voc_background="exclude"`` removes it from every group, which reproduces MiB's
"1-15 / 16-20 / all" tables (their "all" leaves the background out too: Joint 15-5 = (15 x 79.1 + 5 x
72.6) / 20 = 77.4). In every dataset's native id space only VOC has a class 0 (ADE and synthetic use 0 as
void, COCO has no category 0), so a table can recognise the background by its id alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from benchmark.errors import ConfigError

GROUPS = ("base", "novel", "old", "new", "seen")
VOC_BACKGROUND = 0
VOC_BACKGROUND_OPTIONS = ("base", "exclude")


def check_voc_background(option: str) -> str:
    if option not in VOC_BACKGROUND_OPTIONS:
        raise ConfigError(f"unknown VOC background convention {option!r}",
                          hint=f"use one of {', '.join(VOC_BACKGROUND_OPTIONS)} (base = PLOP's '0-15', "
                               "exclude = MiB's '1-15')")
    return option


def group_member(group: str, class_step, step: int):
    """Whether classes introduced at ``class_step`` (scalar or array) belong to ``group`` at ``step``."""
    s = np.asarray(class_step)
    if group == "base":
        out = s == 0
    elif group == "novel":
        out = (s >= 1) & (s <= step)
    elif group == "old":
        out = s < step
    elif group == "new":
        out = s == step
    elif group == "seen":
        out = s <= step
    else:
        raise ValueError(f"unknown class group {group!r}; groups are {GROUPS}")
    return out if out.ndim else bool(out)


def groups_from_class_steps(class_steps: Mapping[int, int], step: int, voc_background: str = "base",
                            background: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every group at ``step`` from ``{class id: introducing step}`` (classes keep the mapping's order).

    ``background`` is the id of the background class, if the dataset has one; ``"exclude"`` drops it.
    """
    check_voc_background(voc_background)
    ids = [c for c in class_steps if not (voc_background == "exclude" and background is not None and c == background)]
    return {g: tuple(c for c in ids if group_member(g, class_steps[c], step)) for g in GROUPS}


def class_groups(protocol, step: int, voc_background: str = "base") -> dict[str, tuple[int, ...]]:
    """The groups of a :class:`protocols.Protocol` at ``step``, in the protocol's class order."""
    if not 0 <= step < len(protocol.steps):
        raise ConfigError(f"protocol {protocol.name!r} has steps 0..{len(protocol.steps) - 1}, not {step}")
    steps = {c: t for t, classes in enumerate(protocol.steps) for c in classes}
    return groups_from_class_steps(steps, step, voc_background, protocol.background)


def range_label(positions: Sequence[int]) -> str:
    """'1-100' for positions 1..100, '20' for a single one, '0-15' when the background (0) leads."""
    if not positions:
        return ""
    lo, hi = min(positions), max(positions)
    return str(lo) if lo == hi else f"{lo}-{hi}"
