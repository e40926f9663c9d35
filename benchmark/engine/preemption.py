"""Stopping a job at a safe point when the cluster says it must go (SLURM: USR2 before the time limit or
on preemption, ``--signal=USR2@<delay>`` as submitit asks for).

submitit's own handler checkpoints the job's callable and requeues it at once, by raising ``SystemExit``
wherever the main thread happens to be. In the middle of ``torch.save`` that exception is replaced by
torch's "unexpected pos" error from the half-written zip, and the job fails instead of being requeued
(measured: tests/test_runner.py, before this module). So the signal is only recorded while the trainer
is inside its loop (or results are being written) and acted upon at the next iteration boundary, after
the in-step checkpoint is saved; elsewhere (evaluation, data loading) the previous handler runs at once,
since nothing is lost there. ``Preempted`` carries the stop from the trainer to the job's callable, which
then calls the previous handler itself (benchmark.parallel.RequeueableRun).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator


class Preempted(Exception):
    """Raised at a safe point after the stop signal; what was done is on disk (the in-step checkpoint)."""


class PreemptionSignal:
    """Context manager owning ``signum``'s handler for its duration (restored at exit).

    ``requested`` turns true when the signal arrives. Inside :meth:`deferred` blocks that is all the
    handler does; outside them it hands the signal to the previous handler (:meth:`act`) immediately.
    """

    def __init__(self, signum: int = signal.SIGUSR2):
        self.signum = signum
        self.requested = False
        self._depth = 0
        self._previous = None

    def __enter__(self) -> "PreemptionSignal":
        self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._depth == 0:
            self.act()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, the signal is recorded only (the code inside checks ``requested`` at safe points)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def act(self) -> None:
        """Do what the signal would have done without us: submitit's checkpoint-and-requeue (it exits)."""
        previous = self._previous
        if callable(previous):
            previous(self.signum, None)
        elif previous in (None, signal.SIG_DFL):
            signal.signal(self.signum, signal.SIG_DFL)
            os.kill(os.getpid(), self.signum)
