"""Joint training: one step on every class of the protocol (the upper bound, methods.md).

The runner trains it on ``protocol.as_joint()`` with the schedule's ``joint`` row (the papers'
published "offline"/"joint" settings; the CPU schedule gives it more iterations than step 0, since it
learns twice the classes) and reports it under the continual protocol, at the protocol's final step,
with the protocol's base/novel grouping.
"""

from __future__ import annotations

from methods.base import Method


class Joint(Method):
    name = "joint"
    joint = True
    shares_standard_step0 = False
