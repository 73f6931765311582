"""The measurement loop: warm-up, then interleaved measurement windows until stable or a time cap.

Several configurations that will be compared (the PyTorch original and its artifacts at one batch size) are
measured *together*: each round gives every configuration one window (forward order on even rounds,
reverse order on odd ones), so drift on a shared machine — another process, thermal or turbo changes —
hits every side alike. Windows are time slices (at least one call each), not single calls, so one backend's
spinning worker threads do not bleed into the next backend's timings.

A configuration is *done* when its last windows pass the stability rule (:func:`stats.is_stable`) or when
its measured time reaches ``max_seconds``; rounds continue until every configuration is done. Reported
figures cover every measured window (warm-up calls excluded); ``stable`` says whether the last windows
passed the rule when measurement stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from imgembed.bench.stats import (
    STABILITY_TOLERANCE,
    STABILITY_WINDOWS,
    LatencySummary,
    is_stable,
    summarize_latencies,
    throughput,
)

Clock = Callable[[], float]
BatchFn = Callable[[], int]  # runs one batch, returns the number of images it processed


@dataclass(frozen=True)
class MeasureSettings:
    """How long and how carefully to measure each configuration."""

    warmup: int = 2                      # calls per configuration before measuring
    window_seconds: float = 1.0          # length of one measurement window (at least one call)
    max_seconds: float = 10.0            # measurement time cap per configuration
    stability_windows: int = STABILITY_WINDOWS
    tolerance: float = STABILITY_TOLERANCE

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 calls, got {self.warmup}")
        if self.window_seconds <= 0 or self.max_seconds <= 0:
            raise ValueError(f"window_seconds and max_seconds must be > 0, got {self.window_seconds} "
                             f"and {self.max_seconds}")
        if self.stability_windows < 1:
            raise ValueError(f"stability_windows must be >= 1, got {self.stability_windows}")

    @property
    def effective_window(self) -> float:
        """The window length, shortened so that the stability windows fit inside the time cap."""
        return min(self.window_seconds, self.max_seconds / self.stability_windows)

    def to_dict(self) -> dict:
        return {"warmup_calls": self.warmup, "window_seconds": round(self.effective_window, 6),
                "max_seconds": self.max_seconds, "stability_windows": self.stability_windows,
                "stability_tolerance": self.tolerance}


@dataclass
class Window:
    """One measurement window: per-call latencies (s), images processed, wall time (s)."""

    latencies: list[float]
    images: int
    seconds: float

    @property
    def throughput(self) -> float:
        return throughput(self.images, self.seconds)


@dataclass(frozen=True)
class Measurement:
    """The figures of one configuration."""

    latency: LatencySummary
    throughput_ips: float
    window_throughputs: tuple[float, ...]
    stable: bool
    stop_reason: str          # "stable" | "time-cap"
    calls: int
    images: int
    seconds: float
    warmup_calls: int

    def to_dict(self) -> dict:
        return {"latency_ms": self.latency.to_dict(), "throughput_ips": round(self.throughput_ips, 4),
                "window_throughputs": [round(w, 4) for w in self.window_throughputs], "stable": self.stable,
                "stop_reason": self.stop_reason,
                "samples": {"calls": self.calls, "images": self.images, "windows": len(self.window_throughputs),
                            "seconds": round(self.seconds, 4), "warmup_calls": self.warmup_calls}}


@dataclass
class Trial:
    """One configuration under measurement."""

    key: str
    fn: BatchFn
    clock: Clock
    windows: list[Window] = field(default_factory=list)
    warmup_calls: int = 0

    def call(self) -> tuple[int, float]:
        """Run one batch; returns (images, seconds)."""
        t0 = self.clock()
        images = self.fn()
        elapsed = self.clock() - t0
        if not isinstance(images, int) or images < 1:
            raise ValueError(f"{self.key}: a batch function must return the number of images (>= 1), got {images!r}")
        return images, elapsed

    def run_window(self, seconds: float) -> Window:
        """Call the batch function until ``seconds`` have passed (at least once); record the window."""
        latencies, images, start = [], 0, self.clock()
        while not latencies or self.clock() - start < seconds:
            n, elapsed = self.call()
            latencies.append(elapsed)
            images += n
        window = Window(latencies, images, max(self.clock() - start, sum(latencies)))
        self.windows.append(window)
        return window

    @property
    def measured_seconds(self) -> float:
        return sum(w.seconds for w in self.windows)

    def stable(self, s: MeasureSettings) -> bool:
        return is_stable([w.throughput for w in self.windows], s.stability_windows, s.tolerance)

    def done(self, s: MeasureSettings) -> bool:
        """Stable, or measured for the whole time cap."""
        return self.stable(s) or self.measured_seconds >= s.max_seconds

    def result(self, s: MeasureSettings) -> Measurement:
        """The figures over every measured window."""
        lat = [x for w in self.windows for x in w.latencies]
        images, secs = sum(w.images for w in self.windows), self.measured_seconds
        stable = self.stable(s)
        return Measurement(summarize_latencies(lat), throughput(images, secs),
                           tuple(w.throughput for w in self.windows), stable, "stable" if stable else "time-cap",
                           len(lat), images, secs, self.warmup_calls)


def measure_interleaved(fns: Mapping[str, BatchFn], settings: MeasureSettings = MeasureSettings(), *,
                        clock: Clock = time.perf_counter,
                        on_window: Callable[[str, Window], None] | None = None) -> dict[str, Measurement]:
    """Measure every configuration in ``fns`` (key -> batch function) in alternating rounds; see module doc."""
    if not fns:
        raise ValueError("nothing to measure: no configurations given")
    trials = [Trial(key, fn, clock) for key, fn in fns.items()]
    for _ in range(settings.warmup):
        for t in trials:
            t.call()
            t.warmup_calls += 1
    rounds = 0
    while not all(t.done(settings) for t in trials):
        active = [t for t in trials if t.measured_seconds < settings.max_seconds]
        for t in (active if rounds % 2 == 0 else active[::-1]):
            window = t.run_window(settings.effective_window)
            if on_window is not None:
                on_window(t.key, window)
        rounds += 1
    return {t.key: t.result(settings) for t in trials}
