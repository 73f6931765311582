"""Small, honest timing of a runner on a fixed batch: warm-up, then the median of repeated runs.

Used by the export (which engine is fastest here?) and by the benchmarks.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from imgembed.runtime.base import Runner


def interleaved_medians(runners: Mapping[str, Runner], batch: np.ndarray, *, warmup: int = 2, rounds: int = 7,
                        max_seconds: float = 20.0) -> dict[str, float]:
    """Median wall time of each runner on ``batch``, timed in interleaved rounds (one call of each runner per
    round), so load from other processes hits every runner alike and the ratios stay fair. Stops after
    ``rounds`` rounds, or earlier (but after at least 3) once ``max_seconds`` have elapsed."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.infer(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    for i in range(rounds):
        if i >= 3 and time.perf_counter() - start > max_seconds:
            break
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.infer(batch)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}
