"""The training loop: a recipe and a dataset driving the two towers, step by step, epoch by epoch.

    result = train(open_dataset("imagenet/train"), run_spec("paper", {"epochs": 10}), on_event=print)

`train` reports Progress events to a callback, publishes the weights every `publish_every`
steps, checkpoints after every epoch, and stops cleanly at a step boundary when `stop` is set.
Each pass over the data starts before the towers need it (EarlyStart): the validation pass
during the last training step, the next training pass during validation.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import threading
import time
from contextlib import closing
from typing import Callable, Optional

from coordinator.data import ColourStats, Dataset, open_dataset
from coordinator.data.loader import EarlyStart, check_room_for_loading
from coordinator.engine import ModelParallelAlexNet, error_summary
from coordinator.engine.failures import FailureDecision, FailurePolicy, Lost, probe, replace
from coordinator.training.board import TrainingBoard
from coordinator.training.checkpoints import check_resumable, load_checkpoint, save_checkpoint, snapshot_of
from coordinator.training.passes import SkipLog, evaluate, training_pass, validation_pass
from coordinator.training.pipeline import FinishedStep, StepPipeline
from coordinator.training.recipe import Recipe, RunOptions, RunSpec, schedule_for
from coordinator.training.recovery import Snapshot, restore, take_snapshot
from coordinator.training.reports import Progress, Result
from towers import NetConfig, frozen_layers
from towers.figures import colour_specialisation

log = logging.getLogger(__name__)


class Trainer:
    """One run of `train`: its counters as attributes, its phases as methods.

    The run's place is (epoch, position): epochs completed, and batches of this epoch's training
    pass read. A snapshot (recovery.py) records it, so going back to one, after lost actors or
    from a checkpoint, replays the same batches with the same random draws.
    """

    def __init__(
        self,
        dataset: Dataset,
        spec: RunSpec,
        engine,
        stop: threading.Event,
        checkpoint_dir,
        on_event,
        on_publish,
        on_stats,
        resume: Optional[Snapshot] = None,
        meta: Optional[dict] = None,
        board: Optional[TrainingBoard] = None,
    ):
        self.dataset, self.engine, self.stop, self.checkpoint_dir = dataset, engine, stop, checkpoint_dir
        self.spec, self.recipe, self.options = spec, spec.recipe, spec.options
        self.board = board
        self.on_event, self.on_publish, self.on_stats, self.meta = on_event, on_publish, on_stats, meta
        self.schedule = schedule_for(self.recipe)
        self.failures = FailurePolicy(self.options.max_restarts)  # what a failed step leads to (_recover)
        engine.lr = self.recipe.lr
        self.per_epoch = math.ceil(len(dataset.train) / self.recipe.batch_size)
        if self.recipe.steps_per_epoch:
            self.per_epoch = min(self.per_epoch, self.recipe.steps_per_epoch)
        self.pipeline = StepPipeline(engine)
        self.in_flight: collections.deque[int] = collections.deque()  # places of the batches whose steps run
        self.upcoming: Optional[tuple[int, int, EarlyStart]] = (
            None  # (epoch, from batch, pass) started before it is read
        )
        self.validation: Optional[EarlyStart] = None  # this epoch's validation pass, likewise
        self.skips = SkipLog()
        self.step, self.epoch, self.position, self.restarts = 0, 0, 0, 0
        self.loss = self.top1 = self.top5 = math.nan
        self.snapshot: Optional[Snapshot] = None
        if resume is not None:
            self._go_back_to(resume)
        self.published = self.step  # a resumed run's weights at its start were published by the run before
        self.started = self.window_started = time.perf_counter()
        self.window_images = 0  # this epoch's, for its throughput

    def run(self) -> Result:
        stopped = False
        try:
            self.snapshot = self.snapshot or self._snapshot()
            if self.board:
                self._kernels()  # where the run starts from
            while self.epoch < self.options.epochs and not stopped:
                try:
                    self._train_epoch()
                    stopped = self.stop.is_set()
                    if not stopped:
                        self._validate()
                except Exception as error:
                    self._recover(error)
            if stopped and self.checkpoint_dir and self.step:
                self._checkpoint()
            if self._weights_wanted(self.step):
                self._publish()
        finally:
            self.pipeline.abandon()  # an error's traceback keeps this frame: let go of the step's ObjectRef now
            self._close_passes()  # an error or a stop must end Ray Data's pipelines now, not at garbage collection
        return Result(
            "stopped" if stopped else "finished",
            self.step,
            self.epoch,
            self.top1,
            self.top5,
            self.loss,
            len(self.skips),
            self._elapsed(),
            self.restarts,
        )

    def _train_epoch(self) -> None:
        """Train on the rest of this epoch's pass; as it ends, start the validation pass beside the last step."""
        self.window_started, self.window_images = time.perf_counter(), 0
        with closing(self._training_pass()) as loader:
            for batch in loader:
                if self.stop.is_set():
                    break
                self.skips.add(batch.bad_paths)
                if len(batch.labels) == 0:
                    self.position += 1
                    continue
                if self._weights_due(self.step + 1):
                    # A published version or a snapshot holds exactly that step's weights: no step may run past it.
                    self._completed(self.pipeline.finish())
                self.in_flight.append(self.position)  # its place in the pass, should its step fail
                self.position += 1
                self._completed(self.pipeline.submit(batch.crops, batch.labels))
            else:
                self.validation = EarlyStart(validation_pass(self.dataset, self.recipe))
        self._completed(self.pipeline.finish())

    def _training_pass(self) -> EarlyStart:
        """This epoch's pass from the current position: the one started early, if it is that."""
        upcoming, self.upcoming = self.upcoming, None
        if upcoming is not None:
            if upcoming[:2] == (self.epoch, self.position):
                return upcoming[2]
            upcoming[2].close()
        return self._start_pass(self.epoch, self.position)[2]

    def _start_pass(self, epoch: int, from_batch: int) -> tuple[int, int, EarlyStart]:
        """That epoch's training pass from that batch, started now: (epoch, from_batch, the pass)."""
        return (
            epoch,
            from_batch,
            EarlyStart(training_pass(self.dataset, self.recipe, epoch, self.per_epoch, from_batch)),
        )

    def _completed(self, finished: Optional[FinishedStep]) -> None:
        if finished is None:
            return
        self.in_flight.popleft()
        if not math.isfinite(finished.loss):
            raise FloatingPointError(
                f"the loss became {finished.loss} at step {self.step + 1}: lower lr and start again"
            )
        self.step, self.loss = self.step + 1, finished.loss
        self.window_images += finished.images
        if self.on_stats:
            self.on_stats(finished.stats)
        rate = self.window_images / (time.perf_counter() - self.window_started)
        self._report("step", self.epoch, images_per_second=rate, batch=finished.images, step_seconds=finished.seconds)
        if self.board:
            self.board.step(self.step, self.loss, self.engine.lr, rate, finished.seconds, finished.stats)
        if self._publish_due(self.step):
            self._publish()
        if self._checkpoint_due(self.step):
            self._checkpoint()
        elif self.step % self.options.snapshot_every == 0:
            self.snapshot = self._snapshot()

    def _recover(self, error: Exception) -> None:
        """After a failed step, the failure policy (coordinator.engine.failures) probes the engine's
        actors and decides: RAISE re-raises, or says that max_restarts recoveries were made already;
        RESTART replaces the lost actors and goes on from a healthy replica group's state, or from
        the last snapshot."""
        start = time.perf_counter()
        self.pipeline.abandon()
        self._close_passes()  # the data goes back too: its pass starts while actors are replaced
        lost = probe(self.engine, error)
        if self.failures.decide(error, lost, self.restarts) is FailureDecision.RAISE:
            raise self.failures.raised(error, lost, self.restarts)
        group = self.failures.healthy_group(error, lost, self.engine.replicas, self.engine.config.towers)
        message = self._restart_from_snapshot(lost) if group is None else self._restart_from_group(group, lost)
        self.restarts += 1
        self.in_flight.clear()
        log.warning("recovery %d: %s (%s)", self.restarts, message, error_summary(error))
        if self.board:
            self.board.went_back(self.step)
        self._report(
            "recovered",
            self.epoch,
            recovery_seconds=time.perf_counter() - start,
            replaced=len(lost.names),
            message=message,
        )

    def _restart_from_group(self, group: int, lost: Lost) -> str:
        """Replace the lost actors, and every group takes that group's weights and momentum: only the
        failed steps (those in flight) are redone. Returns what was done, for the report."""
        redo_from = self.in_flight[0] if self.in_flight else self.position
        self.upcoming = self._start_pass(self.epoch, redo_from)  # it starts while the actors are replaced
        replaced = replace(self.engine, lost)
        self.engine.steps -= len(self.in_flight)  # the failed steps draw their dropout masks again
        state = take_snapshot(self.engine, self.step, self.epoch, redo_from, self.schedule, self.top1, self.top5, group)
        self._go_back_to(state)
        return (
            f"replaced {', '.join(replaced)}; every group took group {group}'s weights and momentum: "
            f"no step lost, {len(self.in_flight)} failed step(s) to redo from step {self.step}"
        )

    def _restart_from_snapshot(self, lost: Lost) -> str:
        """Replace the lost actors and go back to the last snapshot, replaying the batches since it.
        Returns what was done, for the report."""
        self.upcoming = self._start_pass(self.snapshot.epoch, self.snapshot.position)  # while actors are replaced
        replaced = replace(self.engine, lost)
        redone = self.step - self.snapshot.step
        self._go_back_to(self.snapshot)
        return (
            f"replaced {', '.join(replaced)}; went back to the snapshot at step {self.step} "
            f"(epoch {self.epoch + 1}, batch {self.position} of {self.per_epoch}): {redone} steps to redo"
        )

    def _validate(self) -> None:
        """Validate this epoch (its pass started beside the last step), step the schedule, checkpoint."""
        if self.epoch + 1 < self.options.epochs and self.upcoming is None:  # the next pass starts while this one runs
            self.upcoming = self._start_pass(self.epoch + 1, 0)
        validation, self.validation = self.validation or EarlyStart(validation_pass(self.dataset, self.recipe)), None
        self.top1, self.top5 = evaluate(self.engine, validation, self.skips)
        colours = self._kernels()  # reported with the rate this epoch used:
        self._report("epoch", self.epoch + 1, top1=self.top1, top5=self.top5, colour_specialisation=colours)
        if self.board:
            self.board.validation(self.step, self.top1, self.top5)
        self.engine.lr = self.schedule.update(self.epoch, 1 - self.top1)
        self.epoch, self.position = self.epoch + 1, 0
        if self.checkpoint_dir:
            self._checkpoint()

    def _kernels(self) -> tuple[float, ...]:
        """Each tower's colour specialisation now, and Figure 3 on the board."""
        per_tower = self.engine.tower_weights("conv1")
        colours = tuple(colour_specialisation(weight) for weight in per_tower)
        if self.board:
            self.board.kernels(self.step, per_tower, colours)
        return colours

    def _snapshot(self) -> Snapshot:
        return take_snapshot(self.engine, self.step, self.epoch, self.position, self.schedule, self.top1, self.top5)

    def _go_back_to(self, snapshot: Snapshot) -> None:
        restore(self.engine, snapshot)
        self.step, self.epoch, self.position = snapshot.step, snapshot.epoch, snapshot.position
        self.top1, self.top5 = snapshot.top1, snapshot.top5
        vars(self.schedule).update(copy.deepcopy(snapshot.schedule))
        self.snapshot = snapshot

    def _checkpoint(self) -> None:
        self.snapshot = self._snapshot()  # nothing is in flight, and it is fresher than the last
        save_checkpoint(self.checkpoint_dir, self.snapshot, self.dataset, self.spec, meta=self.meta)

    def _close_passes(self) -> None:
        for loader in (self.upcoming and self.upcoming[2], self.validation):
            if loader is not None:
                loader.close()
        self.upcoming = self.validation = None

    def _checkpoint_due(self, step: int) -> bool:
        return bool(self.checkpoint_dir and self.options.checkpoint_every) and step % self.options.checkpoint_every == 0

    def _publish_due(self, step: int) -> bool:
        return step % self.options.publish_every == 0 and self._weights_wanted(step)

    def _weights_wanted(self, step: int) -> bool:
        """Whether anything takes that step's weights when published: a publisher, or the board's histograms."""
        return self.on_publish is not None or (self.board is not None and self.board.histograms_due(step))

    def _weights_due(self, step: int) -> bool:
        """Whether that step's weights will be read: published, or kept as a snapshot."""
        return self._publish_due(step) or step % self.options.snapshot_every == 0 or self._checkpoint_due(step)

    def _publish(self) -> None:
        if self.step and self.published != self.step:
            state = self.engine.state_dict()
            if self.on_publish:
                self.on_publish(self.step, state)
            if self.board:
                self.board.weights(self.step, state)
            self.published = self.step

    def _report(self, kind: str, epochs_done: int, **values) -> None:
        self.on_event(
            Progress(
                kind,
                self.step,
                epochs_done,
                loss=self.loss,
                lr=self.engine.lr,
                skipped=len(self.skips),
                steps_per_epoch=self.per_epoch,
                epochs=self.options.epochs,
                elapsed=self._elapsed(),
                restarts=self.restarts,
                **values,
            )
        )

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started


def engine_for(recipe: Recipe, options: RunOptions, num_classes: int, reuse=None) -> ModelParallelAlexNet:
    """The towers a recipe trains (its network, optimiser and seed), placed and computing as the run
    options say: new ones, or `reuse`'s actors rebuilt in place for the recipe (engine.rebuild)."""
    if reuse is not None:
        return rebuilt_for(reuse, recipe, options, num_classes)
    return ModelParallelAlexNet(
        num_classes=num_classes,
        dropout=recipe.dropout,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        seed=recipe.seed,
        init=recipe.init,
        width=recipe.width,
        network=recipe.network,
        transport=options.transport,
        replicas=options.replicas,
        precision=options.precision,
        freeze=recipe.freeze,
    )


def rebuilt_for(engine, recipe: Recipe, options: RunOptions, num_classes: int) -> ModelParallelAlexNet:
    """`engine` rebuilt for the recipe's network, seed and freeze, where it already computes as the
    recipe's optimiser and the run options need (else a ValueError: those take new towers)."""
    wanted = dict(
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        replicas=options.replicas,
        precision=options.precision,
    )
    has = dict(engine.tower_args, replicas=engine.replicas, precision=engine.precision)
    differ = [f"{name} {has[name]} (the recipe's {value})" for name, value in wanted.items() if has[name] != value]
    if differ:
        raise ValueError(f"the engine's towers keep their {', '.join(differ)}: make new ones with engine_for")
    config = NetConfig(num_classes, recipe.dropout, recipe.width, init=recipe.init, network=recipe.network)
    engine.rebuild(config, seed=recipe.seed, freeze=recipe.freeze)
    return engine


def resumed(resume, dataset: Dataset) -> tuple[Dataset, Snapshot]:
    """The checkpoint's snapshot (`resume`: a path or a loaded payload), and the dataset with the
    colour statistics the run had; ResumeMismatch if it was taken on other data."""
    payload = resume if isinstance(resume, dict) else load_checkpoint(resume)
    check_resumable(payload, dataset)
    return dataclasses.replace(dataset, stats=ColourStats(**payload["stats"])), snapshot_of(payload)


def fitting(engine: ModelParallelAlexNet, recipe: Recipe) -> ModelParallelAlexNet:
    """An engine passed in, if its towers freeze what the recipe does (their optimisers hold the rest)."""
    if engine.frozen != frozen_layers(recipe.freeze):
        raise ValueError(
            f"the engine freezes {', '.join(engine.frozen) or 'no layer'}, the recipe {recipe.freeze or 'none'}: "
            "make the engine with engine_for(recipe, options, classes)"
        )
    return engine


def train(
    dataset,
    spec: RunSpec,
    *,
    on_event: Optional[Callable[[Progress], None]] = None,
    stop: Optional[threading.Event] = None,
    on_publish: Optional[Callable[[int, dict], None]] = None,
    on_stats: Optional[Callable[[dict], None]] = None,
    checkpoint_dir=None,
    engine=None,
    resume=None,
    checkpoint_meta: Optional[dict] = None,
    on_engine: Optional[Callable] = None,
    log_dir=None,
    init_state: Optional[dict] = None,
) -> Result:
    """Train the two-tower network on `dataset` (a Dataset or a training folder path) by `spec`.

    on_event gets a Progress after every step and every validation; on_publish(step, state_dict)
    gets the weights every `publish_every` steps and at the end; setting `stop` ends the run at
    the next step boundary. on_stats gets each step's tower timings (ModelParallelAlexNet.take_stats).
    With a checkpoint_dir, the run's state is saved there after every epoch, every `checkpoint_every`
    steps and when stopped (checkpoints.py), with `checkpoint_meta`. `resume` (a checkpoint file,
    a folder meaning its latest, or a loaded payload) goes on from where that run was, exactly: pass
    the spec `resume_spec` gives. An engine may be passed in to reuse its actors; on_engine gets it.
    With a log_dir, the run writes its TensorBoard log there (board.py). `init_state`: canonical
    weights to start from instead of the recipe's initialisation (all, or some: fine-tuning)."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec (run_spec(preset, overrides) makes one), got {type(spec).__name__}")
    if not isinstance(dataset, Dataset):
        dataset = open_dataset(dataset, val_fraction=spec.recipe.val_fraction)
    dataset, snapshot = resumed(resume, dataset) if resume is not None else (dataset, None)
    own_engine = engine is None
    engine = engine_for(spec.recipe, spec.options, dataset.num_classes) if own_engine else fitting(engine, spec.recipe)
    board = None
    try:
        (on_engine or (lambda e: None))(engine)
        if init_state is not None:
            engine.load_state_dict({**engine.state_dict(), **init_state})
        check_room_for_loading()
        board = TrainingBoard(log_dir, engine.config, snapshot.step if snapshot else 0) if log_dir else None
        trainer = Trainer(
            dataset,
            spec,
            engine,
            stop or threading.Event(),
            checkpoint_dir,
            on_event or (lambda e: None),
            on_publish,
            on_stats,
            snapshot,
            checkpoint_meta,
            board,
        )
        return trainer.run()
    finally:
        if board is not None:
            board.close()
        if own_engine:
            engine.shutdown()
