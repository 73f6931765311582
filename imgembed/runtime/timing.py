"""Small, honest timing of a runner on a fixed batch: warm-up, then the median of repeated runs.

Used by the export (is INT8 really faster than FP32 here?) and by the benchmarks.
"""
from __future__ import annotations

import time

import numpy as np

from .base import Runner


def median_batch_seconds(runner: Runner, batch: np.ndarray, *, warmup: int = 2, min_runs: int = 5,
                         max_seconds: float = 3.0) -> float:
    """Median wall time of ``runner.infer(batch)`` after ``warmup`` calls, over at least ``min_runs`` runs
    or until ``max_seconds`` elapsed (whichever comes later, capped at 50 runs)."""
    for _ in range(warmup):
        runner.infer(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < max_seconds and len(times) < 50):
        t0 = time.perf_counter()
        runner.infer(batch)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
