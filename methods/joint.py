"""Joint training: one step on every class of the protocol (the upper bound, methods.md).

The runner trains it on ``protocol.as_joint()`` with the schedule's step-0 settings and reports it
under the continual protocol, at the protocol's final step, with the protocol's base/novel grouping.
Decision: joint uses the step-0 (base) iteration budget, as the papers' "offline"/"joint" rows do
(trained like a base step on all classes).
"""

from __future__ import annotations

from methods.base import Method


class Joint(Method):
    name = "joint"
    joint = True
    shares_standard_step0 = False
