"""Micro-batching: many clients, one model instance, batches as large as the traffic allows.

A detector scores a batch of images in little more time than one image when the per-call overhead (Python,
kernel launches, small matrix shapes) dominates, which is the case on GPUs and for small models. A server
that called the model once per request would leave that throughput unused, and one that let requests call
the model concurrently would need a model copy per thread. So each detector gets one worker thread that
owns the model: requests put their images in a queue, the worker takes up to ``batch_size`` of them, waiting
at most ``max_wait_s`` after the oldest arrived for more to join, runs one forward pass and hands each
image's result back through a :class:`concurrent.futures.Future` (which an ``asyncio`` handler awaits
without blocking its event loop).

How much work may wait is not decided here but at the door (:class:`Gate`): a server refuses a request
before reading its body once ``max_queue`` requests are admitted, so memory stays bounded whatever the
traffic, and a refused client is told when to come back (:meth:`MicroBatcher.retry_after`).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """Work submitted after :meth:`MicroBatcher.close` (the server is shutting down)."""


@dataclass
class BatcherStats:
    """What a detector's worker has done: for the listing endpoint, the benchmark and the tests."""

    batches: int = 0
    images: int = 0
    failed_batches: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.images,
            "failed_batches": self.failed_batches,
            "largest_batch": self.largest_batch,
            "mean_batch": round(self.images / self.batches, 3) if self.batches else 0.0,
            "busy_seconds": round(self.busy_seconds, 3),
        }


class MicroBatcher(Generic[T, R]):
    """One worker thread calling ``run_batch(items) -> results`` (one result per item, in order) on batches
    of up to ``batch_size`` items; an item waits at most ``max_wait_s`` after it arrived (when the worker
    is free) for others to fill its batch.

    ``run_batch`` is only ever called from the worker thread, so it may use a model that is not
    thread-safe. An exception fails every item of that batch (and only that batch).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        batch_size: int,
        max_wait_s: float,
        name: str = "detector",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self._run = run_batch
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.name = name
        self.stats = BatcherStats()
        # (arrival time, item, future); deque + condition instead of queue.Queue: the worker needs to look at
        # the queue's length and oldest arrival while it waits for a batch to fill
        self._queue: collections.deque[tuple[float, T, Future[R]]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # items in the batch being computed
        #: seconds per image, smoothed over batches: what a refused client is told to wait (Retry-After)
        self._seconds_per_image: float | None = None
        self._thread = threading.Thread(target=self._loop, name=f"clipfusion-batcher-{name}", daemon=True)
        self._thread.start()

    # -- the clients' side --------------------------------------------------------------------------------
    def submit(self, items: Sequence[T]) -> list[Future[R]]:
        """Queue ``items``; one future per item, resolved by the worker."""
        now = time.monotonic()
        futures: list[Future[R]] = [Future() for _ in items]
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name}: shutting down, not accepting work")
            self._queue.extend((now, item, fut) for item, fut in zip(items, futures, strict=True))
            self._cond.notify()
        return futures

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the batch being computed)."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> int:
        """Items in the batch being computed now."""
        return self._busy

    def retry_after(self) -> int:
        """Whole seconds until the work in hand is likely done (at least 1): the ``Retry-After`` a refused
        client gets, from the measured time per image."""
        per_image = self._seconds_per_image or 1.0
        return max(1, math.ceil((self.queued + self._busy) * per_image))

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, stop the worker (waiting up to ``timeout`` seconds)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the worker ---------------------------------------------------------------------------------------
    def _next_batch(self) -> list[tuple[float, T, Future[R]]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            # the oldest item's deadline, not the worker's: an item that already waited while the previous
            # batch ran is not held back again
            deadline = self._queue[0][0] + self.max_wait_s
            while len(self._queue) < self.batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._busy = count
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # a future whose client went away (cancelled) is skipped, not computed
            live = [(item, fut) for _, item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._compute(live)
            self._busy = 0

    def _compute(self, live: list[tuple[T, Future[R]]]) -> None:
        start = time.perf_counter()
        try:
            results = list(self._run([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # every waiting client gets the error; the worker keeps serving
            self.stats.failed_batches += 1
            log.debug("%s: batch of %d failed: %s", self.name, len(live), exc)
            for _, fut in live:
                fut.set_exception(exc)
            return
        took = time.perf_counter() - start
        per_image = took / len(live)
        self._seconds_per_image = (
            per_image if self._seconds_per_image is None else 0.7 * self._seconds_per_image + 0.3 * per_image
        )
        self.stats.batches += 1
        self.stats.images += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        self.stats.busy_seconds += took
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)


class Gate:
    """At most ``limit`` requests inside at once; the rest are refused (not queued) at the door, before their
    body is read, so that a burst costs neither memory nor time."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.inside = 0
        self.admitted = 0
        self.refused = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.inside >= self.limit:
                self.refused += 1
                return False
            self.inside += 1
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


__all__ = ["BatcherClosed", "BatcherStats", "Gate", "MicroBatcher"]
