"""The serving policy: how much of the machine classification may take while a job trains."""

from __future__ import annotations

import time
from collections.abc import Callable

BURST_SECONDS = 0.0  # serving compute lent ahead of the share (0: each batch is paid for after it)


class ServingShare:
    """How much of the time the serving towers may compute while a job trains: the serving policy.

    A bucket of compute seconds that fills at `share` seconds per second, up to `burst`; each
    batch takes its duration from it, and the next batch waits while it is below zero. With the
    default burst of 0, a batch that took d seconds is followed by d * (1 - share) / share seconds
    in which serving waits: a lone request is answered at once, requests that come meanwhile
    gather into the next batch (which classifies more images per second of compute), and under
    saturation serving computes `share` of the time while training keeps the rest. The bounded
    queue refuses the overflow (RESOURCE_EXHAUSTED). With no job training, nothing is counted:
    serving has the whole machine. A burst lets a light load run several batches back to back,
    at the price of training's pace (docs/performance.md, "Serving beside training", measures both)."""

    def __init__(self, share: float, training: Callable[[], bool] = lambda: False, burst: float = BURST_SECONDS):
        if not 0 < share <= 1:
            raise ValueError(f"the serving share must be in (0, 1], got {share}")
        self.share, self.training, self.burst = share, training, burst
        self._seconds, self._at = burst, time.perf_counter()  # the bucket, and when it was last filled

    def _fill(self) -> None:
        now = time.perf_counter()
        self._seconds = min(self.burst, self._seconds + (now - self._at) * self.share)
        self._at = now

    def rest(self) -> float:
        """Seconds the next batch should still wait (0 when it may run now)."""
        if self.share >= 1 or not self.training():
            return 0.0
        self._fill()
        return max(0.0, -self._seconds / self.share)

    def spent(self, seconds: float) -> None:
        """A batch just took `seconds`: counted while a job trains."""
        self._fill()
        if self.training():
            self._seconds -= seconds
