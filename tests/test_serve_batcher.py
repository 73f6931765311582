"""Unit tests of the dynamic batcher with a fake runner (no model, no server)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from imgembed.serve.batcher import Batcher, BatchStats
from imgembed.serve.errors import QueueFullError, UnavailableError


class FakeRunner:
    """Returns ``x * 10`` for a (n, 2) batch, records every batch, can be held by a gate or made to fail."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.started.set()
        self.gate.wait(10)
        self.batches.append(x.copy())
        if (x < 0).any():
            raise RuntimeError(f"negative input in a batch of {len(x)}")
        return x * 10.0

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def rows(start: int, n: int = 1) -> np.ndarray:
    """n distinct rows [[start, start + .5], ...] so every answer can be traced to its submission."""
    v = np.arange(start, start + n, dtype=np.float32)
    return np.stack([v, v + 0.5], axis=1)


@pytest.fixture
def runner():
    return FakeRunner()


def make(runner, **kw) -> Batcher:
    opts = dict(max_batch=4, max_delay_s=0.05, max_queue=64, name="fake")
    opts.update(kw)
    return Batcher(runner, **opts).start()


def hold_worker(b: Batcher, runner: FakeRunner):
    """Occupy the worker with one running batch; returns its future (release with runner.gate.set())."""
    runner.gate.clear()
    fut = b.submit(rows(1000))
    assert runner.started.wait(5)
    return fut


def test_concurrent_submissions_are_grouped_up_to_max_batch(runner):
    b = make(runner, max_batch=4, max_delay_s=0.2)
    first = hold_worker(b, runner)
    futures = [b.submit(rows(i)) for i in range(10)]  # queued while the worker is busy
    assert b.queued == 10
    runner.gate.set()
    for i, f in enumerate(futures):
        np.testing.assert_array_equal(f.result(5), rows(i) * 10)  # each gets its own rows back
    np.testing.assert_array_equal(first.result(5), rows(1000) * 10)
    assert runner.sizes == [1, 4, 4, 2]
    b.stop(5)


def test_batches_take_whole_submissions_in_order(runner):
    b = make(runner, max_batch=4, max_delay_s=0.2)
    hold_worker(b, runner)
    futures = [b.submit(rows(0, 3)), b.submit(rows(10, 2)), b.submit(rows(20, 1))]
    runner.gate.set()
    results = [f.result(5) for f in futures]
    assert runner.sizes == [1, 3, 3]  # 3 | 2+1: never split a submission, never reorder
    np.testing.assert_array_equal(results[1], rows(10, 2) * 10)
    np.testing.assert_array_equal(runner.batches[2], np.concatenate([rows(10, 2), rows(20, 1)]))
    b.stop(5)


def test_partial_batch_is_flushed_after_max_delay(runner):
    b = make(runner, max_batch=8, max_delay_s=0.15)
    t0 = time.monotonic()
    out = b.submit(rows(7, 2)).result(5)
    waited = time.monotonic() - t0
    np.testing.assert_array_equal(out, rows(7, 2) * 10)
    assert runner.sizes == [2]
    assert 0.14 <= waited < 3.0, waited  # not before the delay (nothing else came), and not stuck


def test_full_batch_does_not_wait_for_the_delay(runner):
    b = make(runner, max_batch=2, max_delay_s=30.0)
    t0 = time.monotonic()
    futures = [b.submit(rows(0)), b.submit(rows(1))]
    [f.result(5) for f in futures]
    assert time.monotonic() - t0 < 5.0
    assert runner.sizes == [2]
    b.stop(5)


def test_admission_rejects_beyond_max_queue_and_releases(runner):
    b = make(runner, max_queue=5)
    with b.admit(3):
        assert b.pending == 3
        with pytest.raises(QueueFullError, match=r"3 of 5 images pending, this request has 3") as err:
            with b.admit(3):
                pass
        assert err.value.status == 429 and err.value.kind == "queue_full"
        with b.admit(2):
            assert b.pending == 5
    assert b.pending == 0
    with b.admit(5):
        with pytest.raises(QueueFullError, match=r"5 of 5 images pending, this request has 1"):
            b.check_capacity()
    b.check_capacity(5)
    with pytest.raises(ValueError, match="expected 1..max_queue=5"):
        with b.admit(6):
            pass


def test_timed_out_submission_is_cancelled_and_never_computed(runner):
    b = make(runner, max_batch=4, max_delay_s=0.0)
    first = hold_worker(b, runner)

    async def call():
        return await asyncio.wait_for(b.infer(rows(5, 2)), timeout=0.1)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(call())
    runner.gate.set()
    first.result(5)
    np.testing.assert_array_equal(b.submit(rows(9)).result(5), rows(9) * 10)
    assert runner.sizes == [1, 1]  # the timed-out rows 5..6 were skipped, not run
    assert runner.batches and all(5 not in batch[:, 0] for batch in runner.batches)


def test_async_infer_splits_large_requests_and_reassembles(runner):
    b = make(runner, max_batch=4, max_delay_s=0.0)
    x = rows(0, 10)
    out = asyncio.run(b.infer(x))
    np.testing.assert_array_equal(out, x * 10)
    assert sorted(runner.sizes) == [2, 4, 4]
    b.stop(5)


def test_failing_batch_fails_its_submissions_and_the_worker_survives(runner):
    b = make(runner, max_batch=4, max_delay_s=0.2)
    hold_worker(b, runner)
    bad, good = b.submit(-rows(1)), b.submit(rows(2))  # same batch
    runner.gate.set()
    for f in (bad, good):
        with pytest.raises(RuntimeError, match="negative input in a batch of 2"):
            f.result(5)
    np.testing.assert_array_equal(b.submit(rows(3)).result(5), rows(3) * 10)


def test_stop_finishes_queued_work_then_refuses(runner):
    b = make(runner, max_batch=8, max_delay_s=30.0)
    futures = [b.submit(rows(i)) for i in range(3)]
    t0 = time.monotonic()
    assert b.stop(timeout=5)
    assert time.monotonic() - t0 < 5.0  # stopping flushes at once instead of waiting 30 s
    assert [f.result(0).tolist() for f in futures] == [(rows(i) * 10).tolist() for i in range(3)]
    with pytest.raises(UnavailableError, match="'fake' is not accepting work"):
        b.submit(rows(0))


def test_submission_size_is_checked(runner):
    b = make(runner, max_batch=4)
    with pytest.raises(ValueError, match="1..max_batch=4 rows, got 5"):
        b.submit(rows(0, 5))
    with pytest.raises(ValueError, match="got 0"):
        b.submit(rows(0, 0))
    with pytest.raises(ValueError, match="max_batch=0"):
        Batcher(runner, max_batch=0, max_delay_s=0, max_queue=1)


def test_batch_statistics_are_reported(runner):
    seen: list[BatchStats] = []
    b = make(runner, max_batch=4, max_delay_s=0.2, on_batch=seen.append)
    hold_worker(b, runner)
    time.sleep(0.05)
    futures = [b.submit(rows(i)) for i in range(3)]
    runner.gate.set()
    [f.result(5) for f in futures]
    b.stop(5)
    assert [(s.size, s.submissions) for s in seen] == [(1, 1), (3, 3)]
    assert seen[0].queue_wait_s[0] < 1.0 and len(seen[1].queue_wait_s) == 3 and min(seen[1].queue_wait_s) >= 0
    assert seen[1].infer_s >= 0


class SlowRunner(FakeRunner):
    """Takes at least 50 ms per image."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        time.sleep(0.05 * len(x))
        return super().__call__(x)


def test_admission_refuses_when_the_estimated_wait_is_over_max_wait():
    runner = SlowRunner()
    b = make(runner, max_batch=4, max_delay_s=0.0, max_queue=64, max_wait_s=0.12)
    with b.admit(1):  # nothing pending yet: always admitted
        b.submit(rows(0)).result(5)  # measures >= 50 ms per image
    assert b.estimated_wait_s == 0
    with b.admit(2):
        assert b.estimated_wait_s >= 0.1
        with pytest.raises(QueueFullError, match=r"queue too slow: 2 images pending at \d+ ms each = "
                                                 r"0\.\d+ s estimated wait with this request > max_wait_s=0.12"):
            with b.admit(1):
                pass
        with pytest.raises(QueueFullError, match="queue too slow"):
            b.check_capacity()
    with b.admit(3):  # nothing pending: admitted even if the request alone takes longer than max_wait
        pass
    b.stop(5)


def test_decode_time_counts_in_the_wait_estimate(runner):
    b = make(runner, max_wait_s=0.15)
    b.record_preprocess(0.3, 3)
    assert b.seconds_per_image == pytest.approx(0.1)
    with b.admit(1):
        assert b.estimated_wait_s == pytest.approx(0.1)
        with pytest.raises(QueueFullError, match=r"1 images pending at 100 ms each = 0.20 s estimated wait"):
            b.check_capacity()
    b.record_preprocess(0.0, 1)  # moving average: 0.7 x 0.1 + 0.3 x 0
    assert b.seconds_per_image == pytest.approx(0.07)
