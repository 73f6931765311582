"""Dynamic batching: concurrent submissions for one model are grouped into one inference call.

One :class:`Batcher` per model and tower owns one worker thread. Submissions (arrays of at most
``max_batch`` rows: float32 NCHW pixels, uint8 crops, or a 1-d object array of texts) wait in a FIFO queue;
the worker takes the oldest ones, up to ``max_batch`` rows, as soon as the queue holds a full batch or the
oldest submission has waited ``max_delay_s`` -- whichever comes first -- runs ``infer`` once on their rows
concatenated, and answers every submission with its own rows. Inference never runs on the event loop:
``await batcher.infer(pixels)`` only enqueues and waits on a future.

Bounded: :meth:`Batcher.admit` counts a request's images from admission to answer and raises
:class:`QueueFullError` beyond ``max_queue`` -- and, with ``max_wait_s``, when the pending images would
take longer than that to infer at the measured speed -- so decode work, queue, memory and queueing time
stay bounded under overload (the excess gets 429 at once instead of a 504 later).
A submission whose caller gave up (timeout, disconnect) is cancelled and skipped if not yet running.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from imgembed.serve.errors import QueueFullError, UnavailableError

log = logging.getLogger("imgembed.serve")


@dataclass(frozen=True)
class BatchStats:
    """What one inference call did, for metrics."""

    size: int                          # images in the batch
    submissions: int                   # submissions answered by it
    queue_wait_s: tuple[float, ...]    # per submission: enqueue -> batch start
    infer_s: float                     # wall time of the inference call


@dataclass
class _Item:
    pixels: np.ndarray
    future: Future
    enqueued: float

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])


class Batcher:
    """Groups submissions for one model into batches of at most ``max_batch`` rows; one worker thread."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_delay_s: float,
                 max_queue: int, max_wait_s: float | None = None, name: str = "model",
                 on_batch: Callable[[BatchStats], None] | None = None, unit: str = "images"):
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1, "
                             f"max_delay_s={max_delay_s} >= 0")
        self.name = name
        self.unit = unit  # what a row is, in messages: "images" or "texts"
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._infer = infer
        self._sec_per_image = 0.0  # moving average of inference seconds per image (0 before the first batch)
        self._pre_sec_per_image = 0.0  # moving average of decode + preprocess seconds per image
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._pending = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Batcher":
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"batcher[{self.name}]", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new submissions, finish the queued ones, join the worker. True if it exited in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- admission ---------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Images admitted and not yet answered (decoding, queued or running)."""
        return self._pending

    @property
    def queued(self) -> int:
        """Images waiting in the queue (not yet running)."""
        return self._queued_rows

    @property
    def seconds_per_image(self) -> float:
        """Recent inference + decode/preprocess seconds per image (both share the CPU on a CPU server)."""
        return self._sec_per_image + self._pre_sec_per_image

    @property
    def estimated_wait_s(self) -> float:
        """Seconds the images pending now will take, at the recent seconds per image."""
        return self._pending * self.seconds_per_image

    def record_preprocess(self, seconds: float, n: int) -> None:
        """Report that decoding + preprocessing ``n`` images took ``seconds`` (feeds the wait estimate)."""
        if n > 0:
            per_image = seconds / n
            old = self._pre_sec_per_image
            self._pre_sec_per_image = per_image if not old else 0.7 * old + 0.3 * per_image

    def _refusal(self, n: int) -> str | None:
        """Why ``n`` more images cannot be admitted now (caller holds the lock), or None."""
        if self._pending + n > self.max_queue:
            return f"queue full ({self._pending} of {self.max_queue} {self.unit} pending, this request has {n})"
        per_image = self.seconds_per_image
        wait = (self._pending + n) * per_image
        if self.max_wait_s is not None and self._pending and wait > self.max_wait_s:
            return (f"queue too slow: {self._pending} {self.unit} pending at {per_image * 1e3:.0f} ms each "
                    f"= {wait:.2f} s estimated wait with this request > max_wait_s={self.max_wait_s:g}")
        return None

    def check_capacity(self, n: int = 1) -> None:
        """QueueFullError if ``n`` more images could not be admitted now (nothing is reserved): lets a
        server refuse a request before spending time on reading its body."""
        with self._cond:
            reason = self._refusal(n)
        if reason:
            raise QueueFullError(f"model {self.name!r}: {reason}; retry later")

    @contextlib.contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """Hold ``n`` images of capacity for the duration of the block; QueueFullError if the queue is full
        or (with ``max_wait_s``) if the pending images would take longer than that to infer."""
        if not 1 <= n <= self.max_queue:
            raise ValueError(f"cannot admit {n} {self.unit}: expected 1..max_queue={self.max_queue}")
        with self._cond:
            reason = self._refusal(n)
            if reason is None:
                self._pending += n
        if reason:
            raise QueueFullError(f"model {self.name!r}: {reason}; retry later")
        try:
            yield
        finally:
            with self._cond:
                self._pending -= n

    # -- submission --------------------------------------------------------------------------------
    def submit(self, pixels: np.ndarray) -> Future:
        """Queue ``pixels`` (1..max_batch rows); the future resolves to their (rows, dim) embeddings."""
        rows = int(pixels.shape[0]) if pixels.ndim else 0
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"a submission must have 1..max_batch={self.max_batch} rows, got {rows}")
        item = _Item(pixels, Future(), time.monotonic())
        with self._cond:
            if self._stopping or self._thread is None:
                raise UnavailableError(f"model {self.name!r} is not accepting work (batcher "
                                       f"{'stopped' if self._stopping else 'not started'})")
            self._queue.append(item)
            self._queued_rows += rows
            self._cond.notify_all()
        return item.future

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Embed any number of rows from the event loop: split into max_batch chunks, await every chunk.

        Cancelling the awaiting task (a timeout) cancels the chunks that have not started running.
        """
        step = self.max_batch
        futures = [self.submit(pixels[i:i + step]) for i in range(0, len(pixels), step)]
        try:
            parts = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            for f in futures:
                f.cancel()  # no-op for finished or running chunks
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- worker ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._execute(batch)

    def _take_batch(self) -> list[_Item] | None:
        """Block until a batch is due (full, oldest item past its delay, or stopping); None when done."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].enqueued + self.max_delay_s
            while self._queued_rows < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._pop_batch()

    def _pop_batch(self) -> list[_Item]:
        """Oldest items first, up to max_batch rows; cancelled items are dropped (caller holds the lock)."""
        items: list[_Item] = []
        rows = 0
        while self._queue and rows + self._queue[0].rows <= self.max_batch:
            item = self._queue.popleft()
            self._queued_rows -= item.rows
            if item.future.set_running_or_notify_cancel():
                items.append(item)
                rows += item.rows
        return items

    def _execute(self, items: list[_Item]) -> None:
        """Run one inference call and answer each item with its rows (or all with the exception)."""
        if not items:
            return
        started = time.monotonic()
        x = items[0].pixels if len(items) == 1 else np.concatenate([i.pixels for i in items])
        try:
            out = self._infer(x)
        except Exception as e:  # a failed batch fails its submissions, never the worker
            log.exception("batch of %d %s for %s failed", len(x), self.unit, self.name)
            for item in items:
                item.future.set_exception(e)
            return
        elapsed = time.monotonic() - started
        per_image = elapsed / len(x)
        self._sec_per_image = per_image if not self._sec_per_image else 0.7 * self._sec_per_image + 0.3 * per_image
        offset = 0
        for item in items:
            item.future.set_result(out[offset:offset + item.rows])
            offset += item.rows
        self._report(BatchStats(len(x), len(items), tuple(started - i.enqueued for i in items), elapsed))

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(stats)
            except Exception:  # metrics must never break serving
                log.exception("batch observer failed for %s", self.name)
