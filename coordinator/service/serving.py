"""Serving: the serving pair of towers behind a dynamic batcher.

Training publishes a version every `publish_every` steps and at its end; the batcher thread loads
it between two batches, so a classification never waits for a training step and never mixes two
versions.

A serving tower (or the pair's coordinator) that dies or hangs is found by the failure policy's
probe (coordinator.engine.failures) after a batch that fails, or every WATCH_SECONDS when idle.
On its RESTART the batcher refuses requests (UNAVAILABLE, "retry"), reports not serving, replaces
the lost actors and loads the version it was serving into the pair before it serves again.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import numpy as np
import torch

from coordinator.data import to_tensor
from coordinator.engine import ModelParallelAlexNet
from coordinator.engine.failures import FailureDecision, FailurePolicy, Lost, probe, replace
from coordinator.service.errors import DeadlineExceeded, InvalidRequest, ResourceExhausted, Unavailable
from coordinator.service.metrics import Metrics
from coordinator.service.serving_policy import ServingShare
from coordinator.service.versions import ModelVersion, Prediction, check_top_k, top_classes
from towers import NetConfig

log = logging.getLogger(__name__)
# The serving towers' network beside a version's own (its net): dropout only acts in training, and
# "paper" initial weights are what version 0 serves.
SERVING_NET = dict(dropout=0.0, init="paper")

# How often an idle batcher checks that its serving towers are alive.
WATCH_SECONDS = 5.0


@dataclass
class _Request:
    items: list  # ("crop", uint8 HxWx3) or ("tensor", float32 3x227x227)
    deadline: float = math.inf  # perf_counter time after which its answer is of no use
    is_active: Callable[[], bool] = lambda: True  # False once the client has gone (cancelled, or its deadline)
    enqueued: float = field(default_factory=time.perf_counter)
    done: futures.Future = field(default_factory=futures.Future)

    def wanted(self) -> bool:
        return self.is_active() and time.perf_counter() < self.deadline


class Classifier:
    """The serving pair of towers behind a dynamic batcher thread, and the versions it serves."""

    def __init__(
        self,
        max_batch: int,
        max_delay: float,
        metrics: Metrics,
        transport: str = "auto",
        on_serving: Callable[[bool], None] = lambda serving: None,
        max_queue: int = 256,
        nice: int = 0,
        precision: str = "float32",
        share: ServingShare | None = None,
    ):
        self.max_batch, self.max_delay, self.metrics, self.transport = max_batch, max_delay, metrics, transport
        self.max_queue = max_queue  # images waiting, at most; beyond, requests are refused (ResourceExhausted)
        metrics.queue_capacity.set(max_queue)
        self.nice = nice  # the serving towers' CPU priority, lowered by this: training beside them keeps its pace
        self.precision = precision  # the serving towers' arithmetic (towers.precision)
        self.share = share or ServingShare(1.0)  # how much of the time serving may compute while a job trains
        self.on_serving = on_serving  # told False while lost serving actors are replaced, True when it serves again
        self.failures = FailurePolicy()  # a lost serving actor is always replaced: no max_restarts
        self._restarting: str | None = None  # why requests are refused meanwhile
        self.engine: ModelParallelAlexNet | None = None
        self.current: ModelVersion | None = None
        self._next: ModelVersion | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._version_lock = threading.Lock()
        self._last_version = 0

    def start(self, initial: ModelVersion) -> None:
        """Start the serving towers on the initial version, then the batcher."""
        self.engine = self._serving_engine(initial)
        self.current, self._last_version = initial, initial.version  # numbering goes on from a restored version
        self.metrics.version.set(initial.version)
        self._thread = threading.Thread(target=self._loop, name="classify-batcher", daemon=True)
        self._thread.start()

    def serving(self) -> tuple[ModelParallelAlexNet, ModelVersion]:
        """The serving engine and the version it serves now."""
        if self._thread is None:
            raise Unavailable("the serving towers are still starting; retry shortly")
        return self.engine, self.current

    def _serving_engine(self, version: ModelVersion) -> ModelParallelAlexNet:
        """New serving towers with the version's weights; none are left running if that fails."""
        engine = ModelParallelAlexNet(
            **version.net, **SERVING_NET, transport=self.transport, nice=self.nice, precision=self.precision
        )
        try:
            if version.state is not None:
                engine.load_state_dict(version.state)
        except Exception:
            engine.shutdown()
            raise
        return engine

    def classify(
        self, items: list, top_k: int, timeout: float | None = None, is_active: Callable[[], bool] = lambda: True
    ) -> tuple[list[list[Prediction]], ModelVersion]:
        """The top_k classes of each item, most probable first, and the version that answered.
        Waits at most `timeout` seconds; a request whose client left (is_active) is not computed."""
        check_top_k(top_k, len(self.serving()[1].labels))
        probs, version = self.probabilities(items, timeout, is_active)
        return top_classes(probs, version, top_k), version

    def probabilities(
        self, items: list, timeout: float | None = None, is_active: Callable[[], bool] = lambda: True
    ) -> tuple[torch.Tensor, ModelVersion]:
        """Each item's probability for every class ([items, classes]), and the version that answered;
        the batching, limits and deadline of classify()."""
        self.serving()  # refuses while the towers start
        deadline = math.inf if timeout is None else time.perf_counter() + timeout
        request = self._submit(_Request(items, deadline, is_active))
        try:
            return self._answer_to(request)
        except futures.TimeoutError:
            raise DeadlineExceeded(
                f"no answer within the deadline of {timeout:.3g} s; the request was dropped "
                "(a longer deadline, or fewer images per request, may help)"
            ) from None

    def ready(self) -> bool:
        """Serving now: the towers are up, not being replaced, and the server is not closing."""
        return self._thread is not None and not self._restarting and not self._closing

    def _answer_to(self, request: _Request):
        """Waits for the request's answer while its client is there; one that leaves (cancels, or
        its deadline passes) frees this handler thread and its place in the queue within a second."""
        while True:
            remaining = request.deadline - time.perf_counter()
            if remaining > 0 and request.is_active():
                try:
                    return request.done.result(min(remaining, 1.0))
                except futures.TimeoutError:
                    continue
            with self._cv:
                self._drop_unwanted()
            if request.done.done():  # answered meanwhile, or dropped just now
                return request.done.result()
            raise futures.TimeoutError  # taken into a batch already: it is computed, and its answer unread

    def _drop_unwanted(self) -> None:
        """Drops the queued requests whose client left or whose deadline passed (lock held)."""
        for request in [r for r in self._queue if not r.wanted()]:
            self._queue.remove(request)
            request.done.set_exception(DeadlineExceeded("the request expired in the queue"))
        self.metrics.observe_queue(self._queue)

    def check_room(self, images: int) -> None:
        """Refuses now, before its images are decoded, a request that the queue could not take."""
        with self._cv:
            self._refuse_without_room(images)

    def _refuse_without_room(self, images: int) -> None:
        """Raises unless a request of `images` may join the queue now (lock held)."""
        if images > self.max_batch:
            raise InvalidRequest(
                f"{images} images in one request; this server batches at most {self.max_batch}: split the request"
            )
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._restarting:
            raise Unavailable(self._restarting)
        self._drop_unwanted()  # requests whose clients left hold no place
        waiting = sum(len(r.items) for r in self._queue)
        if waiting + images > self.max_queue:
            raise ResourceExhausted(
                f"the classify queue is full ({waiting} images waiting, at most "
                f"{self.max_queue}): retry later, with backoff"
            )

    def _submit(self, request: _Request) -> _Request:
        with self._cv:
            self._refuse_without_room(len(request.items))
            self._queue.append(request)
            self.metrics.observe_queue(self._queue)
            self._cv.notify()
        return request

    def publish(self, version: ModelVersion) -> int:
        """Number a new model version and hand it to the batcher; returns its number."""
        with self._version_lock:
            self._last_version += 1
            version.version = self._last_version
        with self._cv:
            self._next = version
            self._cv.notify()
        return version.version

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for request in self._queue:
            request.done.set_exception(Unavailable("the server is shutting down"))
        if self.engine is not None:
            self.engine.shutdown()

    def _take_batch(self) -> list[_Request]:
        """The oldest requests that fit in one batch, waiting up to max_delay for more to arrive."""
        with self._cv:
            deadline = self._queue[0].enqueued + self.max_delay
            while sum(len(r.items) for r in self._queue) < self.max_batch and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            self._drop_unwanted()  # a client that gave up, or whose deadline passed: not computed
            batch, size = [], 0
            while self._queue and size + len(self._queue[0].items) <= self.max_batch:
                request = self._queue.popleft()
                size += len(request.items)
                batch.append(request)
            self.metrics.observe_queue(self._queue)
            return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._queue and self._next is None and not self._closing:
                    self._cv.wait(WATCH_SECONDS)
                if self._closing:
                    return
                idle = not self._queue and self._next is None
                version, self._next = self._next, None
            if idle:
                self._after_failure(None, [])  # a probe: a tower may have died meanwhile
                continue
            if version is not None:
                self._activate(version)  # between batches: no batch ever sees two versions
            if self._queue and not self._rested():
                continue  # closing, or a new version: seen above before the batch
            if self._queue:
                batch = self._take_batch()
                if batch:
                    self._run(batch)

    def _rested(self) -> bool:
        """Waits out the serving share's rest; False if closing or a new version came meanwhile."""
        with self._cv:
            while (rest := self.share.rest()) > 0 and not self._closing and self._next is None:
                self._cv.wait(rest)
            return not self._closing and self._next is None

    def _activate(self, version: ModelVersion) -> None:
        try:
            if NetConfig(**version.net) != NetConfig(**self.current.net):
                self._rebuild(version)  # another network: other classes, another width or variant
            if version.state is not None:
                self.engine.load_state_dict(version.state)
            self.current = version
            self.metrics.version.set(version.version)
        except Exception:
            log.exception(
                "could not load model version %d; still serving version %d", version.version, self.current.version
            )

    def _rebuild(self, version: ModelVersion) -> None:
        """The serving towers as the version's network: the same actors rebuilt in place, or a new pair
        where that fails (an actor lost meanwhile, say)."""
        try:
            self.engine.rebuild(NetConfig(**version.net, **SERVING_NET))
        except Exception:
            log.warning("could not rebuild the serving towers in place; starting a new pair", exc_info=True)
            old, self.engine = self.engine, self._serving_engine(version)
            old.shutdown()

    def _run(self, batch: list[_Request]) -> None:
        version, started = self.current, time.perf_counter()
        try:
            inputs = []
            for request in batch:
                self.metrics.queue_seconds.observe(started - request.enqueued)
                for kind, value in request.items:
                    if kind == "crop":
                        inputs.append(to_tensor(value[None], np.zeros((1, 3)), version.stats, version.normalise)[0])
                    else:
                        inputs.append(value)
            self.metrics.batch_size.observe(len(inputs))
            probs = self.engine.predict(torch.stack(inputs)).softmax(dim=1)
            self.share.spent(time.perf_counter() - started)  # before any answer: the next request sees the rest
        except Exception as exc:
            self._after_failure(exc, batch)
            return
        offset = 0
        for request in batch:
            n = len(request.items)
            request.done.set_result((probs[offset : offset + n], version))
            offset += n

    def _after_failure(self, error: Exception | None, batch: list[_Request]) -> None:
        """The failure policy after a batch failed with `error` (None: an idle check): RESTART replaces
        the lost actors, RAISE gives the batch its error, NOOP leaves all as it is."""
        lost = probe(self.engine, error)
        decision = self.failures.decide(error, lost)
        if decision is FailureDecision.RESTART:
            self._restart(lost, batch)
        elif decision is FailureDecision.RAISE:
            for request in batch:
                request.done.set_exception(error)  # the batch's own error: nothing was lost

    def _restart(self, lost: Lost, batch: list[_Request]) -> None:
        """Serving actors were lost: refuse requests, replace the lost actors, and load the version served.

        Until the pair is whole and loaded, requests are refused at once, never queued behind it."""
        version, start, replaced = self.current, time.perf_counter(), len(lost.names)
        what = "a serving tower" if lost.towers else "the serving towers' coordinator"
        reason = (
            f"{what} was lost ({lost.phrase()}); the server is starting new serving "
            f"towers with model version {version.version}: retry in a few seconds"
        )
        log.error("%s", reason)
        self._refuse_all(reason, batch)
        while not self._closing:
            try:
                replace(self.engine, lost)
                if version.state is not None:  # else the initial weights, which new towers start from
                    self.engine.load_state_dict(version.state)
                break
            except Exception:
                log.exception(
                    "could not start new serving towers with version %d; trying again in %g s",
                    version.version,
                    WATCH_SECONDS,
                )
                time.sleep(WATCH_SECONDS)
                lost = probe(self.engine)
        self.metrics.tower_restarts.labels("serving").inc(replaced)
        self.metrics.recovery_seconds.labels("serving").inc(time.perf_counter() - start)
        with self._cv:
            self._restarting = None
        if not self._closing:
            self.on_serving(True)
            log.warning(
                "serving again: model version %d on new towers, after %.1f s",
                version.version,
                time.perf_counter() - start,
            )

    def _refuse_all(self, reason: str, batch: list[_Request]) -> None:
        """Until the serving actors are replaced: the batch and every queued request are refused, and
        so are those that come meanwhile; health says not serving."""
        with self._cv:
            self._restarting = reason
            refused, self._queue = [*batch, *self._queue], collections.deque()
            self.metrics.observe_queue(self._queue)
        self.on_serving(False)
        for request in refused:
            request.done.set_exception(Unavailable(reason))
