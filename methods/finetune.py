"""Fine-tuning: the engine's set loss on the step's ground truth only (the lower bound, methods.md).

New class rows of the head get the engine's default initialisation; nothing protects old classes, so
their queries are pushed to no-object wherever old objects appear unlabeled in the new step's images.
"""

from __future__ import annotations

from methods.base import Method


class Finetune(Method):
    name = "finetune"
