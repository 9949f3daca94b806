"""A training job as Prometheus metrics: the adapter from what a job reports to the service's metrics.

The job table (jobs.py) hands it the job's start, every report of the loop (training.Progress), the
engine's timings of each step, and the job's end; metrics.py defines the metrics themselves.
"""

from __future__ import annotations

import math

from coordinator.service.metrics import Metrics
from coordinator.training import Progress


class JobMetrics:
    """Observes one job at a time (the towers train one job at a time)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def started(self) -> None:
        self.metrics.running.set(1)

    def ended(self) -> None:
        """Whatever the end: the job's thread is done, so none trains now."""
        self.metrics.running.set(0)

    def failed(self, error: Exception) -> None:
        if isinstance(error, FloatingPointError):  # the loop fails a diverged job before it reports that step:
            self.metrics.loss.set(math.nan)  # show the loss as NaN, for the loss-NaN alert

    def progress(self, event: Progress) -> None:
        """One report of the training loop: a step, a validation ("epoch") or a recovery."""
        if event.kind == "step":
            self._step(event)
        elif event.kind == "recovered":
            self.metrics.tower_restarts.labels("training").inc(event.replaced)
            self.metrics.recovery_seconds.labels("training").inc(event.recovery_seconds)
        else:
            self._validation(event)

    def _step(self, event: Progress) -> None:
        m = self.metrics
        m.steps.inc()
        m.samples.inc(event.batch)
        m.loss.set(event.loss)
        m.lr.set(event.lr)
        m.epoch.set(event.epoch)
        m.images_per_second.set(event.images_per_second)
        m.skipped.set(event.skipped)
        m.step_seconds.observe(event.step_seconds)

    def _validation(self, event: Progress) -> None:
        m = self.metrics
        for tower, value in enumerate(event.colour_specialisation):
            m.colour_specialisation.labels(str(tower)).set(value)
        m.top1.set(event.top1)
        m.top5.set(event.top5)
        m.epoch.set(event.epoch)
        m.skipped.set(event.skipped)

    def engine_stats(self, stats: dict) -> None:
        """One step's timings from ModelParallelAlexNet.take_stats()."""
        m, longest = self.metrics, {}
        per_group = len(stats["towers"]) // stats.get("replicas", 1)
        for i, tower in enumerate(stats["towers"]):
            replica, t = (str(n) for n in divmod(i, per_group))
            for (stage, direction), seconds in tower["compute_seconds"].items():
                m.tower_compute.labels(replica, t, stage, direction).inc(seconds)
            if stats.get("replicas", 1) > 1:
                m.allreduce_seconds.labels(replica, t).inc(tower["allreduce_seconds"])
                m.allreduce_bytes.labels(replica, t).inc(tower["allreduce_bytes"])
            for key, seconds in tower["exchange_seconds"].items():
                longest[key] = max(longest.get(key, 0.0), seconds)
            for (point, direction), n in tower["exchange_bytes"].items():
                m.exchange_bytes.labels(point, direction).inc(n)
        for (point, direction), seconds in longest.items():
            m.exchange_seconds.labels(point, direction).observe(seconds)
