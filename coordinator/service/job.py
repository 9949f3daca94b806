"""A training job: its state machine, its latest progress, and the bounded log of events its watchers follow."""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from coordinator.service.requests import JobPlan, TrainingRequest
from coordinator.training import CheckpointError, Progress
from coordinator.training.checkpoints import find_checkpoint


class JobState(enum.Enum):
    PENDING = "pending"  # accepted, preparing data and towers
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop; ends at the next step boundary
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the server stopped while it ran: resume it from its last checkpoint


ACTIVE = frozenset({JobState.PENDING, JobState.RUNNING, JobState.STOPPING})


@dataclass(frozen=True)
class JobEvent:
    kind: str  # "state", "step", "epoch" (a validation finished), "published" or "recovered"
    state: JobState
    progress: Optional[Progress]  # the latest
    top1: float  # of the last validation
    top5: float
    model_version: int
    message: str = ""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    request: TrainingRequest
    progress: Optional[Progress]
    top1: float
    top5: float
    error: str  # why it failed
    model_version: int  # the last version it published (0: none yet)
    created: float
    ended: float  # 0 while it runs
    checkpoint: str  # its latest checkpoint file ("": none)
    log_dir: str  # its TensorBoard folder


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


class Job:
    """One training job: its state, latest progress, and a bounded log of events for watchers."""

    HISTORY = 4096
    SAVE_EVERY = 10.0  # seconds between saved records while only steps happen

    def __init__(
        self,
        request: TrainingRequest,
        plan: Optional[JobPlan],
        on_change: Callable[[dict], None] = None,
        job_id: str = "",
    ):
        self.id = job_id or new_job_id()
        self.request, self.plan = request, plan  # plan: None for a job restored from its record
        self.on_change, self._saved = on_change, 0.0  # on_change(record): the server keeps it
        self.state, self.error = JobState.PENDING, ""
        self.progress: Optional[Progress] = None
        self.top1, self.top5 = math.nan, math.nan
        self.model_version, self.created, self.ended = 0, time.time(), 0.0
        self.stop_event = threading.Event()
        self.engine = None  # the running job's ModelParallelAlexNet, while it runs
        self._events: collections.deque = collections.deque(maxlen=self.HISTORY)
        self._seq = 0
        self._cv = threading.Condition()
        self.thread: Optional[threading.Thread] = None

    def status(self) -> JobStatus:
        checkpoint = ""
        if self.request.checkpoint_dir:
            try:
                checkpoint = str(find_checkpoint(self.request.checkpoint_dir))
            except (CheckpointError, OSError):
                pass  # none written yet
        with self._cv:
            return JobStatus(
                self.id,
                self.state,
                self.request,
                self.progress,
                self.top1,
                self.top5,
                self.error,
                self.model_version,
                self.created,
                self.ended,
                checkpoint,
                self.request.log_dir,
            )

    def record(self) -> dict:
        """The job as plain values, for the server's state dir (caller holds the lock)."""
        return {
            "job_id": self.id,
            "state": self.state.name,
            "request": dataclasses.asdict(self.request),
            "progress": dataclasses.asdict(self.progress) if self.progress else None,
            "top1": self.top1,
            "top5": self.top5,
            "error": self.error,
            "model_version": self.model_version,
            "created": self.created,
            "ended": self.ended,
            "saved": time.time(),
        }

    @classmethod
    def restored(cls, record: dict) -> "Job":
        """A job from its record; one that was running when the server went is INTERRUPTED."""
        job = cls(TrainingRequest(**record["request"]), None, job_id=record["job_id"])
        job.state, job.error = JobState[record["state"]], record["error"]
        job.progress = Progress(**record["progress"]) if record["progress"] else None
        job.top1, job.top5, job.model_version = record["top1"], record["top5"], record["model_version"]
        job.created, job.ended = record["created"], record["ended"]
        if job.state in ACTIVE:
            step = job.progress.step if job.progress else 0
            job.state, job.ended = JobState.INTERRUPTED, record["saved"]
            job.error = f"the server stopped while this job ran (last seen at step {step}); " + (
                f"resume it: alexnet-mp train --resume {job.id}"
                if job.request.checkpoint_dir
                else "it wrote no checkpoints (no checkpoint_dir), so it cannot be resumed"
            )
        with job._cv:
            job._append("state", "restored from the server's state dir")
        return job

    def _save(self, kind: str) -> None:
        """Hand the record to on_change: on every event but steps, and on steps every SAVE_EVERY seconds."""
        if self.on_change is not None and (kind != "step" or time.monotonic() - self._saved >= self.SAVE_EVERY):
            self._saved = time.monotonic()
            self.on_change(self.record())

    def _event(self, kind: str, message: str = "") -> JobEvent:
        return JobEvent(kind, self.state, self.progress, self.top1, self.top5, self.model_version, message)

    def _append(self, kind: str, message: str = "") -> None:
        """Record an event (caller holds the lock)."""
        self._seq += 1
        self._events.append((self._seq, self._event(kind, message)))
        self._cv.notify_all()
        self._save(kind)

    def set_state(self, state: JobState, message: str = "", error: str = "") -> None:
        with self._cv:
            if self.state not in ACTIVE:
                return
            self.state, self.error = state, error or self.error
            if state not in ACTIVE:
                self.ended = time.time()
            self._append("state", message)

    def on_progress(self, event: Progress) -> None:
        with self._cv:
            self.progress = event
            if event.kind == "epoch":
                self.top1, self.top5 = event.top1, event.top5
            self._append(event.kind, event.message)

    def on_published(self, version: int) -> None:
        with self._cv:
            self.model_version = version
            self._append("published", f"model version {version} is now served")

    def request_stop(self) -> None:
        self.stop_event.set()
        with self._cv:
            if self.state in (JobState.PENDING, JobState.RUNNING):
                self.state = JobState.STOPPING
                self._append("state", "stopping at the next step boundary")

    def watch(self, is_active: Callable[[], bool] = lambda: True) -> Iterator[JobEvent]:
        """The current state first, then live events, until the job ends (or the watcher leaves)."""
        with self._cv:
            last = self._seq
            yield self._event("state", "current state")
            if self.state not in ACTIVE:
                return
        while is_active():
            with self._cv:
                self._cv.wait_for(lambda seen=last: self._seq > seen, timeout=1.0)
                fresh = [(seq, event) for seq, event in self._events if seq > last]
            for seq, event in fresh:
                last = seq
                yield event
                if event.kind == "state" and event.state not in ACTIVE:
                    return
