"""Decode in parallel threads, overlapped with inference, in input order, with bounded memory.

    items ──> [decode workers: load_crop] ──> ordered window of at most ``prefetch`` items
          ──> batch assembly (batch_size crops) ──> runner.infer (the consumer's thread) ──> Embeddings

Threads suffice: PIL releases the GIL while it decodes and resizes, and ONNX Runtime / PyTorch release it
while they compute, so decoding of the next images overlaps inference of the current batch. ``items`` is
consumed lazily and at most ``prefetch`` items are in flight or decoded-but-unconsumed at any time (each a
model-size uint8 crop once decoded), so memory is bounded whatever the number of inputs. Order is preserved
(results are taken from the window in submission order). An item that fails is reported in its batch's
``errors`` and never stops the stream.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from imgembed.errors import ImageDecodeError
from imgembed.runtime.results import Embeddings


def default_workers() -> int:
    """Decode threads when none are given: every core (decode and inference share them; see docs/performance.md)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _attempt(fn: Callable[[Any], Any], item: Any, catch: tuple) -> tuple[bool, Any]:
    """(True, fn(item)) or (False, the exception) for the exception types in ``catch``."""
    try:
        return True, fn(item)
    except catch as e:
        return False, e


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int, prefetch: int,
                catch: tuple = (ImageDecodeError,)) -> Iterator[tuple[int, bool, Any]]:
    """Yield ``(index, ok, result_or_exception)`` for each item in input order; ``fn`` runs on ``workers``
    threads (``workers=0``: in the caller's thread) with at most ``prefetch`` items submitted ahead.

    Exceptions of the types in ``catch`` are yielded as values; any other exception propagates to the
    consumer when its item's turn comes. Closing the generator early cancels the items not yet started.
    """
    if workers <= 0:
        for index, item in enumerate(items):
            yield (index, *_attempt(fn, item, catch))
        return
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="imgembed-decode")
    window: deque[tuple[int, Future]] = deque()
    try:
        for index, item in enumerate(items):
            window.append((index, pool.submit(_attempt, fn, item, catch)))
            if len(window) >= prefetch:
                i, fut = window.popleft()
                yield (i, *fut.result())
        while window:
            i, fut = window.popleft()
            yield (i, *fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pipelined_batches(prepare: Callable[[Any], np.ndarray], infer: Callable[[list[np.ndarray]], np.ndarray],
                      items: Iterable[Any], *, batch_size: int, workers: int, prefetch: int | None = None,
                      catch: tuple = (ImageDecodeError,), dim: int = 0) -> Iterator[Embeddings]:
    """Batches of ``batch_size`` successfully prepared items, inferred in order (see module doc), each an
    :class:`~imgembed.runtime.results.Embeddings` whose errors are (input index, exception).

    ``prepare(item)`` -> one model input (a uint8 crop); ``infer(list of inputs)`` -> (n, dim) vectors.
    Failed items are attached to the batch being assembled when they fail; a final batch may carry only
    errors (then ``vectors`` is ``(0, dim)``). ``prefetch`` defaults to ``2 * batch_size + 2 * workers``:
    one batch decoding while the previous one runs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefetch = prefetch or 2 * batch_size + 2 * max(workers, 1)
    indices: list[int] = []
    inputs: list[np.ndarray] = []
    errors: list[tuple[int, BaseException]] = []
    for index, ok, value in ordered_map(prepare, items, workers=workers, prefetch=prefetch, catch=catch):
        if ok:
            indices.append(index)
            inputs.append(value)
        else:
            errors.append((index, value))
        if len(inputs) == batch_size:
            yield Embeddings(indices, infer(inputs), errors)
            indices, inputs, errors = [], [], []
    if inputs or errors:
        vectors = infer(inputs) if inputs else np.zeros((0, dim), np.float32)
        yield Embeddings(indices, vectors, errors)
