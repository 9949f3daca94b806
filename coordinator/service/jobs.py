"""The job table: checking a request, running each job on its own thread, keeping the records.

The towers train one job at a time. A job (job.py) keeps its state and a bounded log of events
that any number of watchers follow; job_metrics.py turns what it reports into metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Callable, Optional

from coordinator.data import open_dataset, patterns
from coordinator.engine import error_summary
from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed
from coordinator.service.job import ACTIVE, Job, JobState, new_job_id
from coordinator.service.job_metrics import JobMetrics
from coordinator.service.metrics import Metrics
from coordinator.service.priority import ThreadStarter
from coordinator.service.requests import OPEN, Roots, TrainingRequest, check_request, make_output_dirs
from coordinator.service.state import StateStore
from coordinator.service.versions import ModelVersion
from coordinator.training import Progress, train

log = logging.getLogger(__name__)


class JobManager:
    """The job table, and the thread that runs each job. It publishes versions through `publish`.
    With a StateStore, every job's record is kept there and the table is read back at start.
    Each job writes its TensorBoard log to the folder its request names, else to log_root/<job id>."""

    def __init__(
        self,
        metrics: Metrics,
        publish: Callable[[ModelVersion], int],
        data_root: Path,
        log_root: Path,
        store: Optional[StateStore] = None,
        roots: Roots = OPEN,
        model_weights: Optional[Callable[[int], tuple[dict, str]]] = None,
    ):
        self.metrics, self.publish, self.data_root, self.store, self.roots = metrics, publish, data_root, store, roots
        self.log_root = log_root
        self.model_weights = model_weights  # a model version's (state, description), for init_from version:N
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
        return None if engine is None else (list(engine.tower_info), engine.replicas)

    def training(self) -> bool:
        """A job has its towers up: serving keeps to its share (serving_policy.ServingShare)."""
        return self._training_engine() is not None

    def list(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def start(self, request: TrainingRequest) -> Job:
        resume, init = self._resume_source(request.resume_from), self._init_source(request.init_from)
        plan = check_request(request, resume, self.roots, init)
        with self._lock:
            running = [job for job in self._jobs.values() if job.state in ACTIVE]
            if running:
                raise PreconditionFailed(
                    f"job {running[0].id} is still {running[0].state.name}: the towers train one job at a time; "
                    "stop it (StopTraining) or wait for it to end"
                )
            job_id = new_job_id()
            log_dir = plan.log_dir or self.log_root / job_id
            request = dataclasses.replace(plan.request, log_dir=str(log_dir))
            plan = dataclasses.replace(plan, log_dir=log_dir, request=request)
            make_output_dirs(plan)  # only now that the request is accepted
            job = Job(plan.request, plan, self.store.save_job if self.store else None, job_id)
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
            raise PreconditionFailed(
                f"job {job.id} wrote no checkpoints (it had no checkpoint_dir), so it cannot be resumed"
            )
        return Path(job.request.checkpoint_dir)

    def _init_source(self, init_from: str):
        """What init_from names when it is no path: a job's checkpoint folder, or a model version's
        (state, description); None when it is a path (or empty)."""
        if init_from.startswith("version:"):
            number = init_from.removeprefix("version:")
            if not number.isdigit() or self.model_weights is None:
                raise InvalidRequest("init_from version:N takes a model version number, e.g. version:12")
            return self.model_weights(int(number))
        with self._lock:
            job = self._jobs.get(init_from) if init_from else None
        if job is None:
            return None
        if not job.request.checkpoint_dir:
            raise PreconditionFailed(
                f"job {job.id} wrote no checkpoints (it had no checkpoint_dir): start from one "
                "of its model versions instead (version:N)"
            )
        return Path(job.request.checkpoint_dir)

    def _run(self, job: Job) -> None:
        plan, watched = job.plan, JobMetrics(self.metrics)
        try:
            if plan.train_dir is None:
                job.set_state(JobState.PENDING, "generating the built-in dataset (first use only)")
                root = patterns.generate(self.data_root)
                train_dir, val_dir, names = root / "train", root / "val", None
            else:
                train_dir, val_dir, names = plan.train_dir, plan.val_dir, plan.class_names
            job.set_state(JobState.PENDING, "reading the dataset and its colour statistics")
            dataset = open_dataset(train_dir, val_dir, val_fraction=plan.spec.recipe.val_fraction, class_names=names)
            if job.stop_event.is_set():
                job.set_state(JobState.STOPPED, "stopped before training began")
                return
            resumed = f", resumed from step {plan.resume['step']} of {plan.resume['path']}" if plan.resume else ""
            resumed += f"; {plan.init.note(dataset.num_classes)}" if plan.init else ""
            job.set_state(
                JobState.RUNNING, f"training on {len(dataset.train)} images of {dataset.num_classes} classes{resumed}"
            )
            watched.started()
            net = dict(num_classes=dataset.num_classes, width=plan.spec.recipe.width, network=plan.spec.recipe.network)

            def on_event(event: Progress) -> None:
                watched.progress(event)
                job.on_progress(event)

            def on_publish(step: int, state: dict) -> None:
                version = ModelVersion(0, state, dataset.labels, dataset.stats, plan.spec.recipe.normalise, net)
                job.on_published(self.publish(version))

            result = train(
                dataset,
                plan.spec,
                on_event=on_event,
                stop=job.stop_event,
                on_publish=on_publish,
                on_stats=watched.engine_stats,
                checkpoint_dir=plan.checkpoint_dir,
                resume=plan.resume,
                checkpoint_meta={"request": dataclasses.asdict(plan.request)},
                on_engine=lambda engine: setattr(job, "engine", engine),
                log_dir=plan.log_dir,
                init_state=plan.init.state if plan.init else None,
            )
            final = JobState.STOPPED if result.state == "stopped" else JobState.FINISHED
            job.set_state(final, f"{result.state} after {result.steps} steps, top-1 {result.top1:.1%}")
        except Exception as exc:  # the job fails; the server and its other jobs carry on
            log.exception("training job %s failed", job.id)  # the whole traceback goes to the log
            watched.failed(exc)
            job.set_state(JobState.FAILED, "failed", error=error_summary(exc))  # one line, without Ray's wrapping
        finally:
            job.engine = None
            watched.ended()  # one job at a time: none trains now

    def stop_all(self, timeout: float = 60) -> None:
        jobs = self.list()
        for job in jobs:
            job.request_stop()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout)
