"""The decode/inference pipeline: order, bounded memory, errors that never stop it, same vectors as serial."""
from __future__ import annotations

import itertools
import random
import threading
import time

import numpy as np
import pytest

import imgembed
from imgembed.errors import ImageDecodeError
from imgembed.gate.samples import parity_images
from imgembed.runtime.pipeline import ordered_map, pipelined_batches


def slow_square(x: int) -> int:
    time.sleep(random.Random(x).random() * 0.005)  # workers finish out of order
    if x % 7 == 3:
        raise ImageDecodeError(f"item {x}: bad")
    return x * x


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_ordered_map_keeps_input_order_and_reports_errors(workers):
    out = list(ordered_map(slow_square, range(40), workers=workers, prefetch=6))
    assert [i for i, _, _ in out] == list(range(40))
    assert [v for i, ok, v in out if ok] == [x * x for x in range(40) if x % 7 != 3]
    errors = [(i, str(v)) for i, ok, v in out if not ok]
    assert errors == [(x, f"item {x}: bad") for x in range(40) if x % 7 == 3]


def test_memory_is_bounded_on_an_endless_input():
    pulled = itertools.count()
    items = (next(pulled) for _ in itertools.count())  # never ends: only a bounded window may be taken
    stream = ordered_map(lambda x: x, items, workers=3, prefetch=5)
    got = [next(stream) for _ in range(20)]
    time.sleep(0.05)
    assert [g[0] for g in got] == list(range(20))
    assert next(pulled) <= 20 + 5 + 1  # at most `prefetch` items ahead of the consumer
    stream.close()  # cancels what was submitted and not started; the pool shuts down


def test_unexpected_exceptions_propagate_to_the_consumer():
    def boom(x):
        if x == 5:
            raise RuntimeError("bug in a decoder")
        return x

    with pytest.raises(RuntimeError, match="bug in a decoder"):
        list(ordered_map(boom, range(10), workers=2, prefetch=3))
    caught = list(ordered_map(boom, range(10), workers=2, prefetch=3, catch=(Exception,)))
    assert [i for i, ok, _ in caught if not ok] == [5]


def test_batches_are_assembled_in_order_with_their_errors():
    seen = []

    def infer(inputs):
        seen.append(len(inputs))
        return np.asarray(inputs, np.float32)[:, None]

    def prepare(x):
        if x in (2, 9):
            raise ImageDecodeError(f"bad {x}")
        return x

    batches = list(pipelined_batches(prepare, infer, range(10), batch_size=3, workers=2, dim=1))
    assert seen == [3, 3, 2]  # 8 good items
    assert [b.indices for b in batches] == [[0, 1, 3], [4, 5, 6], [7, 8]]
    assert [[i for i, _ in b.errors] for b in batches] == [[2], [], [9]]
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in batches])[:, 0], [0, 1, 3, 4, 5, 6, 7, 8])
    only_bad = list(pipelined_batches(prepare, infer, [2], batch_size=3, workers=1, dim=4))
    assert only_bad[0].vectors.shape == (0, 4) and only_bad[0].errors[0][0] == 0
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(pipelined_batches(prepare, infer, [1], batch_size=0, workers=1))


def test_decode_overlaps_inference():
    """Items of the next batch are decoded while the first batch is being inferred: decoding of item 4 waits
    for inference to start, and inference waits for item 4 -- both finish only if they overlap. (Events, no
    clock; the wall-time version is in benchmarks/speed_bounds.py.)"""
    inferring, next_decoded = threading.Event(), threading.Event()
    overlapped: list[bool] = []

    def prepare(x):
        if x >= 4:
            inferring.wait(10)
            next_decoded.set()
        return x

    def infer(inputs):
        if not overlapped:
            inferring.set()
            overlapped.append(next_decoded.wait(10))
        return np.zeros((len(inputs), 1), np.float32)

    batches = list(pipelined_batches(prepare, infer, range(24), batch_size=4, workers=2))
    assert [b.indices for b in batches] == [list(range(i, i + 4)) for i in range(0, 24, 4)]
    assert overlapped == [True]


def test_embedder_pipeline_gives_the_serial_vectors(artifact_dir, tmp_path):
    paths = []
    for i, (_, img) in enumerate(parity_images()[:11]):
        paths.append(tmp_path / f"{i}.jpg")
        img.convert("RGB").save(paths[-1], quality=90)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    items = paths[:4] + [bad] + paths[4:]
    emb = imgembed.load(artifact_dir("test-vit-tiny"), batch_size=4)
    serial = emb.embed(items, on_error="report", workers=0)
    threaded = emb.embed(items, on_error="report", workers=3)
    assert serial.indices == threaded.indices == [0, 1, 2, 3] + list(range(5, 12))
    assert [i for i, _ in threaded.errors] == [4] and "bad.jpg" in threaded.errors[0][1]
    np.testing.assert_array_equal(serial.vectors, threaded.vectors)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        emb.embed(items, workers=2)
    assert threading.active_count() < 10  # decode pools are shut down after each call
