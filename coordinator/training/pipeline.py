"""Steps in a pipeline: the next batch is checked and uploaded while the towers run the step before."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional


@dataclass
class FinishedStep:
    loss: float
    stats: dict  # the towers' timings (ModelParallelAlexNet.take_stats)
    images: int
    seconds: float  # its own time, not its wait in line behind the step before it


class StepPipeline:
    """One step in flight while this process checks and uploads the next batch, so the towers never wait for it."""

    def __init__(self, engine):
        self.engine = engine
        self.pending = None  # (ObjectRef to (loss, stats), images, submitted at)
        self.last_done = 0.0

    def submit(self, images, labels) -> Optional[FinishedStep]:
        """Start a step on this batch; returns the step that was in flight, now finished (None if none was)."""
        step = self.engine.submit_step(images, labels, with_stats=True)
        # The new step is pending before the old one is waited for: if that fails, abandon() finds this one.
        previous, self.pending = self.pending, (step, len(labels), time.perf_counter())
        return self._wait(previous)

    def finish(self) -> Optional[FinishedStep]:
        """Wait for the step in flight, if any."""
        previous, self.pending = self.pending, None
        return self._wait(previous)

    def _wait(self, pending) -> Optional[FinishedStep]:
        if pending is None:
            return None
        step, images, submitted = pending
        loss, stats = step.result()
        done = time.perf_counter()
        seconds, self.last_done = done - max(submitted, self.last_done), done
        return FinishedStep(loss, stats, images, seconds)

    def abandon(self, wait: float = 2.0) -> None:
        """Drop the step in flight after a failure. Its error, when it comes within `wait` seconds, is
        read here, so that Ray does not log it as unhandled with a second traceback."""
        if self.pending is None:
            return
        step, self.pending = self.pending[0], None
        step.discard(wait)
