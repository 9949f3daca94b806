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
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from coordinator.data import open_dataset, patterns
from coordinator.engine import error_summary
from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed
from coordinator.service.metrics import Metrics
from coordinator.service.priority import ThreadStarter
from coordinator.service.requests import OPEN, JobPlan, Roots, TrainingRequest, check_request, make_checkpoint_dir
from coordinator.service.versions import ModelVersion
from coordinator.service.state import StateStore
from coordinator.training import CheckpointError, Progress, train
from coordinator.training.checkpoints import find_checkpoint

log = logging.getLogger(__name__)


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


class Job:
    """One training job: its state, latest progress, and a bounded log of events for watchers."""

    HISTORY = 4096
    SAVE_EVERY = 10.0  # seconds between saved records while only steps happen

    def __init__(self, request: TrainingRequest, plan: Optional[JobPlan], on_change: Callable[[dict], None] = None,
                 job_id: str = ""):  # fmt: skip
        self.id = job_id or uuid.uuid4().hex[:12]
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
            return JobStatus(self.id, self.state, self.request, self.progress, self.top1, self.top5, self.error,
                             self.model_version, self.created, self.ended, checkpoint)  # fmt: skip

    def record(self) -> dict:
        """The job as plain values, for the server's state dir (caller holds the lock)."""
        return {
            "job_id": self.id, "state": self.state.name, "request": dataclasses.asdict(self.request),
            "progress": dataclasses.asdict(self.progress) if self.progress else None, "top1": self.top1,
            "top5": self.top5, "error": self.error, "model_version": self.model_version, "created": self.created,
            "ended": self.ended, "saved": time.time(),
        }  # fmt: skip

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
            job.error = (f"the server stopped while this job ran (last seen at step {step}); "
                         + (f"resume it: alexnet-mp train --resume {job.id}" if job.request.checkpoint_dir
                            else "it wrote no checkpoints (no checkpoint_dir), so it cannot be resumed"))  # fmt: skip
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
                self._cv.wait_for(lambda: self._seq > last, timeout=1.0)
                fresh = [(seq, event) for seq, event in self._events if seq > last]
            for seq, event in fresh:
                last = seq
                yield event
                if event.kind == "state" and event.state not in ACTIVE:
                    return


class JobManager:
    """The job table, and the thread that runs each job. It publishes versions through `publish`.
    With a StateStore, every job's record is kept there and the table is read back at start."""

    def __init__(self, metrics: Metrics, publish: Callable[[ModelVersion], int], data_root: Path,
                 store: Optional[StateStore] = None, roots: Roots = OPEN):  # fmt: skip
        self.metrics, self.publish, self.data_root, self.store, self.roots = metrics, publish, data_root, store, roots
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._threads = ThreadStarter()  # a job trains at the server's priority, not its caller's
        if store is not None:
            for record in store.load_jobs():
                try:
                    job = Job.restored(record)
                except Exception as exc:  # a record from another version, or damaged: never stops the server
                    log.warning("skipping job record %s: %s", str(record.get("job_id"))[:40], exc)
                    continue
                job.on_change = store.save_job
                self._jobs[job.id] = job
                store.save_job(job.record())  # INTERRUPTED from now on
            ended = sorted((j for j in self._jobs.values() if j.state not in ACTIVE), key=lambda j: j.created)
            store.prune_jobs([j.id for j in ended])

    def get(self, job_id: str) -> Job:
        if not job_id:
            raise InvalidRequest("job_id is empty: pass the id StartTraining returned")
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r}; ListTrainings shows them all")
        return job

    def _training_engine(self):
        """The running job's ModelParallelAlexNet, or None."""
        with self._lock:
            return next((job.engine for job in self._jobs.values() if job.engine is not None), None)

    def training_towers(self) -> Optional[tuple[list[dict], int]]:
        """The running job's towers (kept current through repairs) and its replica groups, or None."""
        engine = self._training_engine()
        return None if engine is None else (list(engine.towers), engine.replicas)

    def training(self) -> bool:
        """A job has its towers up: serving keeps to its share (serving_policy.ServingShare)."""
        return self._training_engine() is not None

    def list(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def start(self, request: TrainingRequest) -> Job:
        plan = check_request(request, self._resume_source(request.resume_from), self.roots)
        with self._lock:
            running = [job for job in self._jobs.values() if job.state in ACTIVE]
            if running:
                raise PreconditionFailed(
                    f"job {running[0].id} is still {running[0].state.name}: the towers train one job at a time; "
                    "stop it (StopTraining) or wait for it to end"
                )
            make_checkpoint_dir(plan)  # only now that the request is accepted
            job = Job(plan.request, plan, self.store.save_job if self.store else None)
            self._jobs[job.id] = job
            job.thread = self._threads.start(self._run, (job,), name=f"train-{job.id}")
        return job

    def _resume_source(self, resume_from: str) -> Optional[Path]:
        """The checkpoint folder of the job that resume_from names; None when it names no job (then it is a path)."""
        with self._lock:
            job = self._jobs.get(resume_from) if resume_from else None
        if job is None:
            return None
        if job.state in ACTIVE:
            raise PreconditionFailed(f"job {job.id} is still {job.state.name}: resume it once it has ended")
        if not job.request.checkpoint_dir:
            raise PreconditionFailed(f"job {job.id} wrote no checkpoints (it had no checkpoint_dir), so it cannot be resumed")
        return Path(job.request.checkpoint_dir)

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
            resumed = f", resumed from step {plan.resume['step']} of {plan.resume['path']}" if plan.resume else ""
            job.set_state(JobState.RUNNING, f"training on {len(dataset.train)} images of {dataset.num_classes} classes{resumed}")
            self.metrics.running.set(1)
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
                resume=plan.resume,
                checkpoint_meta={"request": dataclasses.asdict(plan.request)},
                on_engine=lambda engine: setattr(job, "engine", engine),
            )
            final = JobState.STOPPED if result.state == "stopped" else JobState.FINISHED
            job.set_state(final, f"{result.state} after {result.steps} steps, top-1 {result.top1:.1%}")
        except Exception as exc:  # the job fails; the server and its other jobs carry on
            log.exception("training job %s failed", job.id)  # the whole traceback goes to the log
            if isinstance(exc, FloatingPointError):  # the loop fails a diverged job before it reports that step:
                self.metrics.loss.set(math.nan)  # show the loss as NaN, for the loss-NaN alert
            job.set_state(JobState.FAILED, "failed", error=error_summary(exc))  # one line, without Ray's wrapping
        finally:
            job.engine = None
            self.metrics.running.set(0)  # one job at a time: none trains now

    def stop_all(self, timeout: float = 60) -> None:
        jobs = self.list()
        for job in jobs:
            job.request_stop()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout)
