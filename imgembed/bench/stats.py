"""Benchmark statistics: latency percentiles, the stability rule, speed-up ratios, achieved GFLOP/s.

Pure functions over plain numbers, so every figure in a report can be checked against numpy by a test.

Stability follows Triton's perf_analyzer: a configuration is *stable* when the throughput of each of the
last ``windows`` (3) measurement windows is within ``tolerance`` (10 %) of the mean of those windows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)
STABILITY_WINDOWS = 3
STABILITY_TOLERANCE = 0.10


@dataclass(frozen=True)
class LatencySummary:
    """Per-call latency figures in milliseconds, and how many calls they rest on."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    samples: int

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize_latencies(seconds: Sequence[float]) -> LatencySummary:
    """Percentiles (numpy's default linear interpolation), mean, std, min and max of per-call wall times
    given in seconds, reported in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.ndim != 1 or ms.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of latencies, got shape {ms.shape}")
    if not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise ValueError(f"latencies must be finite and >= 0, got min {ms.min()} max {ms.max()}")
    p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
    return LatencySummary(p50=p50, p90=p90, p99=p99, mean=float(ms.mean()), std=float(ms.std()),
                          min=float(ms.min()), max=float(ms.max()), samples=int(ms.size))


def throughput(images: int, seconds: float) -> float:
    """Images per second; ``seconds`` must be positive."""
    if seconds <= 0:
        raise ValueError(f"throughput needs a positive duration, got {seconds!r} s for {images} images")
    return images / seconds


def is_stable(window_throughputs: Sequence[float], windows: int = STABILITY_WINDOWS,
              tolerance: float = STABILITY_TOLERANCE) -> bool:
    """True when each of the last ``windows`` throughputs is within ``tolerance`` of their mean.

    Fewer than ``windows`` measurements are never stable.
    """
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if len(window_throughputs) < windows:
        return False
    last = np.asarray(window_throughputs[-windows:], dtype=np.float64)
    mean = float(last.mean())
    if mean <= 0:
        return False
    return bool(np.all(np.abs(last - mean) <= tolerance * mean + 1e-12 * mean))


def speedup(candidate_ips: float, baseline_ips: float) -> float:
    """How many times faster the candidate is than the baseline, by throughput (images/s)."""
    for label, value in (("candidate", candidate_ips), ("baseline", baseline_ips)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"speed-up needs positive finite throughputs; {label} is {value!r} images/s")
    return candidate_ips / baseline_ips


def achieved_gflops(gflops_per_image: float | None, images_per_second: float) -> float | None:
    """GFLOP/s actually achieved: model GFLOPs per image x images per second (None if GFLOPs unknown)."""
    if gflops_per_image is None:
        return None
    if gflops_per_image <= 0:
        raise ValueError(f"gflops per image must be positive, got {gflops_per_image!r}")
    return gflops_per_image * images_per_second
