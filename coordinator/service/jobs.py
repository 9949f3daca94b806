"""Training jobs: checking a request, running it on its own thread, and its events for watchers.

The towers train one job at a time. A job's events (state changes, steps, validations, published
versions) go to a bounded log that any number of watchers follow.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from coordinator.data import check_folder, open_dataset, patterns
from coordinator.engine import error_summary
from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed
from coordinator.service.metrics import Metrics
from coordinator.service.serving import ModelVersion
from coordinator.training import Progress, Recipe, recipe, train

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    PENDING = "pending"  # accepted, preparing data and towers
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop; ends at the next step boundary
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


ACTIVE = frozenset({JobState.PENDING, JobState.RUNNING, JobState.STOPPING})


@dataclass(frozen=True)
class TrainingRequest:
    """What StartTraining asked for, as given."""

    builtin: bool = False
    data_dir: str = ""
    val_dir: str = ""
    class_names_file: str = ""
    preset: str = ""  # "": the demo preset
    overrides: dict = field(default_factory=dict)
    checkpoint_dir: str = ""


@dataclass(frozen=True)
class JobPlan:
    """A request once checked: the parsed recipe and the paths to use."""

    recipe: Recipe
    train_dir: Optional[Path]  # None: the built-in dataset
    val_dir: Optional[Path]
    class_names: Optional[Path]
    checkpoint_dir: Optional[Path]


def check_request(request: TrainingRequest) -> JobPlan:
    """The request's plan, or InvalidRequest saying what to fix."""
    if not request.builtin and not request.data_dir:
        raise InvalidRequest("no dataset: set data_dir to an ImageFolder training folder, or builtin for the built-in one")
    train_dir = None if request.builtin else Path(request.data_dir)
    val_dir = Path(request.val_dir) if request.val_dir else None
    try:
        for folder in (train_dir, val_dir):
            if folder is not None:
                check_folder(folder)
        plan = recipe(request.preset or "demo", request.overrides)
    except ValueError as exc:  # DatasetError is one
        raise InvalidRequest(str(exc)) from None
    class_names = Path(request.class_names_file) if request.class_names_file else None
    if class_names is not None and not class_names.is_file():
        raise InvalidRequest(f"class_names_file {class_names} does not exist")
    checkpoint_dir = Path(request.checkpoint_dir) if request.checkpoint_dir else None
    if checkpoint_dir is not None:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            probe = checkpoint_dir / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InvalidRequest(f"checkpoint_dir {checkpoint_dir} is not writable: {exc.strerror or exc}") from None
    return JobPlan(plan, train_dir, val_dir, class_names, checkpoint_dir)


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


class Job:
    """One training job: its state, latest progress, and a bounded log of events for watchers."""

    HISTORY = 4096

    def __init__(self, request: TrainingRequest, plan: JobPlan):
        self.id = uuid.uuid4().hex[:12]
        self.request, self.plan = request, plan
        self.state, self.error = JobState.PENDING, ""
        self.progress: Optional[Progress] = None
        self.top1, self.top5 = math.nan, math.nan
        self.model_version, self.created, self.ended = 0, time.time(), 0.0
        self.stop_event = threading.Event()
        self._events: collections.deque = collections.deque(maxlen=self.HISTORY)
        self._seq = 0
        self._cv = threading.Condition()
        self.thread: Optional[threading.Thread] = None

    def status(self) -> JobStatus:
        with self._cv:
            return JobStatus(self.id, self.state, self.request, self.progress, self.top1, self.top5, self.error,
                             self.model_version, self.created, self.ended)  # fmt: skip

    def _event(self, kind: str, message: str = "") -> JobEvent:
        return JobEvent(kind, self.state, self.progress, self.top1, self.top5, self.model_version, message)

    def _append(self, kind: str, message: str = "") -> None:
        """Record an event (caller holds the lock)."""
        self._seq += 1
        self._events.append((self._seq, self._event(kind, message)))
        self._cv.notify_all()

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
                self._cv.wait_for(lambda: self._seq > last, timeout=1.0)
                fresh = [(seq, event) for seq, event in self._events if seq > last]
            for seq, event in fresh:
                last = seq
                yield event
                if event.kind == "state" and event.state not in ACTIVE:
                    return


class JobManager:
    """The job table, and the thread that runs each job. It publishes versions through `publish`."""

    def __init__(self, metrics: Metrics, publish: Callable[[ModelVersion], int], data_root: Path):
        self.metrics, self.publish, self.data_root = metrics, publish, data_root
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job:
        if not job_id:
            raise InvalidRequest("job_id is empty: pass the id StartTraining returned")
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r}; ListTrainings shows them all")
        return job

    def list(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def start(self, request: TrainingRequest) -> Job:
        plan = check_request(request)
        with self._lock:
            running = [job for job in self._jobs.values() if job.state in ACTIVE]
            if running:
                raise PreconditionFailed(
                    f"job {running[0].id} is still {running[0].state.name}: the towers train one job at a time; "
                    "stop it (StopTraining) or wait for it to end"
                )
            job = Job(request, plan)
            self._jobs[job.id] = job
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"train-{job.id}", daemon=True)
            job.thread.start()
        return job

    def _run(self, job: Job) -> None:
        plan = job.plan
        try:
            if plan.train_dir is None:
                job.set_state(JobState.PENDING, "generating the built-in dataset (first use only)")
                root = patterns.generate(self.data_root)
                train_dir, val_dir, names = root / "train", root / "val", None
            else:
                train_dir, val_dir, names = plan.train_dir, plan.val_dir, plan.class_names
            job.set_state(JobState.PENDING, "reading the dataset and its colour statistics")
            dataset = open_dataset(train_dir, val_dir, val_fraction=plan.recipe.val_fraction, class_names=names)
            if job.stop_event.is_set():
                job.set_state(JobState.STOPPED, "stopped before training began")
                return
            job.set_state(JobState.RUNNING, f"training on {len(dataset.train)} images of {dataset.num_classes} classes")
            net = dict(num_classes=dataset.num_classes, width=plan.recipe.width)

            def on_event(event: Progress) -> None:
                if event.kind == "step":
                    self.metrics.observe_step(event, event.batch, event.step_seconds)
                elif event.kind == "recovered":
                    self.metrics.tower_restarts.labels("training").inc(event.replaced)
                    self.metrics.recovery_seconds.labels("training").inc(event.step_seconds)
                else:
                    self.metrics.observe_validation(event)
                job.on_progress(event)

            def on_publish(step: int, state: dict) -> None:
                version = ModelVersion(0, state, dataset.labels, dataset.stats, plan.recipe.normalise, net)
                job.on_published(self.publish(version))

            result = train(
                dataset,
                plan.recipe,
                on_event=on_event,
                stop=job.stop_event,
                on_publish=on_publish,
                on_stats=self.metrics.observe_engine,
                checkpoint_dir=plan.checkpoint_dir,
            )
            final = JobState.STOPPED if result.state == "stopped" else JobState.FINISHED
            job.set_state(final, f"{result.state} after {result.steps} steps, top-1 {result.top1:.1%}")
        except Exception as exc:  # the job fails; the server and its other jobs carry on
            log.exception("training job %s failed", job.id)  # the whole traceback goes to the log
            job.set_state(JobState.FAILED, "failed", error=error_summary(exc))  # one line, without Ray's wrapping

    def stop_all(self, timeout: float = 60) -> None:
        jobs = self.list()
        for job in jobs:
            job.request_stop()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout)
