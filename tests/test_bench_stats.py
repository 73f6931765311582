"""imgembed.bench.stats and .measure: percentiles, the stability rule, the time cap, ratios, GFLOP/s.

The measurement loop runs on a fake clock, so window throughputs are exact and the tests deterministic.
"""
from __future__ import annotations

import numpy as np
import pytest

from imgembed.bench.measure import MeasureSettings, measure_interleaved
from imgembed.bench.stats import achieved_gflops, is_stable, speedup, summarize_latencies, throughput


# -- percentiles -------------------------------------------------------------------------------------------
def test_percentiles_of_1_to_100_ms_match_hand_computed_values_and_numpy():
    seconds = np.arange(1, 101) / 1000.0  # 1 ms .. 100 ms
    s = summarize_latencies(seconds)
    assert (s.p50, s.p90, s.p99) == pytest.approx((50.5, 90.1, 99.01))  # linear interpolation
    assert (s.p50, s.p90, s.p99) == pytest.approx(tuple(np.percentile(seconds * 1e3, [50, 90, 99])))
    assert s.mean == pytest.approx(50.5) and s.min == pytest.approx(1.0) and s.max == pytest.approx(100.0)
    assert s.std == pytest.approx(np.std(seconds * 1e3)) and s.samples == 100


def test_percentiles_of_a_skewed_sample_match_numpy():
    rng = np.random.default_rng(0)
    seconds = rng.lognormal(-4, 0.8, size=997)
    s = summarize_latencies(list(seconds))
    expected = np.percentile(seconds * 1e3, [50, 90, 99])
    assert [s.p50, s.p90, s.p99] == pytest.approx(list(expected), rel=1e-12)
    assert s.p50 < s.p90 < s.p99 < s.max


def test_single_sample_gives_that_value_for_every_percentile():
    s = summarize_latencies([0.25])
    assert s.p50 == s.p90 == s.p99 == s.mean == pytest.approx(250.0) and s.samples == 1


@pytest.mark.parametrize("bad, message", [([], "non-empty"), ([0.1, -0.2], ">= 0"), ([0.1, float("nan")], "finite")])
def test_bad_latencies_raise_naming_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        summarize_latencies(bad)


# -- stability rule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("windows, stable", [
    ([100, 105, 95], True),            # all within 10 % of the mean (100)
    ([90, 100, 110], True),            # exactly 10 % off: still stable
    ([89, 100, 111], False),           # 11 % off
    ([100, 100, 125], False),          # 125 is 15 % above the mean of 108.3
    ([10, 500, 100, 104, 96], True),   # only the last three count
    ([100, 101, 99, 300], False),      # a late jump breaks it
    ([100, 100], False),               # fewer than three windows is never stable
])
def test_stability_rule_on_synthetic_windows(windows, stable):
    assert is_stable(windows) is stable


def test_stability_window_count_and_tolerance_are_parameters():
    assert is_stable([100, 120], windows=2, tolerance=0.10) is True     # mean 110, both 9.1 % off
    assert is_stable([100, 130], windows=2, tolerance=0.10) is False
    assert is_stable([100, 130], windows=2, tolerance=0.20) is True
    with pytest.raises(ValueError, match="windows must be >= 1"):
        is_stable([1.0], windows=0)
    with pytest.raises(ValueError, match="tolerance"):
        is_stable([1.0], tolerance=1.5)


# -- ratios and efficiency ---------------------------------------------------------------------------------
def test_speedup_is_the_throughput_ratio():
    assert speedup(250.0, 100.0) == pytest.approx(2.5)
    assert speedup(80.0, 100.0) == pytest.approx(0.8)


@pytest.mark.parametrize("cand, base, who", [(0.0, 1.0, "candidate"), (1.0, float("nan"), "baseline"),
                                             (1.0, -3.0, "baseline")])
def test_speedup_rejects_non_positive_throughputs_naming_the_side(cand, base, who):
    with pytest.raises(ValueError, match=who):
        speedup(cand, base)


def test_achieved_gflops_and_throughput():
    assert achieved_gflops(8.8, 125.0) == pytest.approx(1100.0)
    assert achieved_gflops(None, 125.0) is None
    with pytest.raises(ValueError, match="-1"):
        achieved_gflops(-1.0, 10.0)
    assert throughput(64, 0.5) == pytest.approx(128.0)
    with pytest.raises(ValueError, match="positive duration"):
        throughput(8, 0.0)


# -- the measurement loop on a fake clock ------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def batch(clock: FakeClock, seconds, images: int = 4, log: list | None = None, key: str = ""):
    """A batch function taking ``seconds(call_index)`` of fake time per call."""
    calls = [0]

    def fn() -> int:
        clock.t += seconds(calls[0])
        calls[0] += 1
        if log is not None:
            log.append(key)
        return images

    return fn


def test_constant_speed_is_stable_after_three_windows():
    clock = FakeClock()
    # binary-exact times (1/8 s per call, 3/8 s windows), so every window holds exactly three calls
    settings = MeasureSettings(warmup=2, window_seconds=0.375, max_seconds=10.0)
    m = measure_interleaved({"a": batch(clock, lambda i: 0.125)}, settings, clock=clock)["a"]
    assert m.stable is True and m.stop_reason == "stable"
    assert len(m.window_throughputs) == 3 and m.warmup_calls == 2
    assert m.calls == 9 and m.images == 36                        # 3 windows x 3 calls x 4 images
    assert m.throughput_ips == pytest.approx(32.0)               # 4 images / 0.125 s
    assert m.latency.p50 == pytest.approx(125.0) and m.latency.samples == 9
    assert m.seconds == pytest.approx(1.125)


def test_unstable_speed_stops_at_the_time_cap_and_says_so():
    clock = FakeClock()
    # calls alternate 0.1 s and 0.4 s, a window is 1 call: window throughputs 40, 10, 40, 10 ...
    settings = MeasureSettings(warmup=0, window_seconds=0.05, max_seconds=2.0)
    m = measure_interleaved({"a": batch(clock, lambda i: 0.1 if i % 2 == 0 else 0.4)}, settings, clock=clock)["a"]
    assert m.stable is False and m.stop_reason == "time-cap"
    assert 2.0 <= m.seconds < 2.0 + 0.4
    assert m.window_throughputs[:4] == pytest.approx((40.0, 10.0, 40.0, 10.0))
    assert m.calls == len(m.window_throughputs) == 8


def test_windows_shrink_so_three_fit_in_a_short_cap():
    assert MeasureSettings(window_seconds=1.0, max_seconds=0.3).effective_window == pytest.approx(0.1)
    assert MeasureSettings(window_seconds=0.5, max_seconds=30).effective_window == pytest.approx(0.5)


def test_configurations_are_interleaved_in_alternating_order():
    clock, log, order = FakeClock(), [], []
    fns = {k: batch(clock, lambda i: 0.1, log=log, key=k) for k in ("orig", "fp32", "int8")}
    settings = MeasureSettings(warmup=1, window_seconds=0.1, max_seconds=10.0)
    measure_interleaved(fns, settings, clock=clock, on_window=lambda key, w: order.append(key))
    assert log[:3] == ["orig", "fp32", "int8"]                   # warm-up, round robin
    assert order == ["orig", "fp32", "int8", "int8", "fp32", "orig", "orig", "fp32", "int8"]


def test_a_stable_config_keeps_alternating_with_an_unstable_one_until_the_cap():
    clock = FakeClock()
    fns = {"steady": batch(clock, lambda i: 0.1),
           "noisy": batch(clock, lambda i: 0.1 if i % 2 == 0 else 0.3)}
    settings = MeasureSettings(warmup=0, window_seconds=0.05, max_seconds=1.0)
    res = measure_interleaved(fns, settings, clock=clock)
    assert res["steady"].stable is True and res["noisy"].stable is False
    assert res["noisy"].seconds >= 1.0
    # the steady side was measured over the same period, not stopped after its first three windows
    assert len(res["steady"].window_throughputs) >= len(res["noisy"].window_throughputs)


def test_bad_batch_functions_and_settings_raise():
    with pytest.raises(ValueError, match="number of images"):
        measure_interleaved({"zero": lambda: 0}, MeasureSettings(warmup=1))
    with pytest.raises(ValueError, match="nothing to measure"):
        measure_interleaved({})
    with pytest.raises(ValueError, match="warmup"):
        MeasureSettings(warmup=-1)
    with pytest.raises(ValueError, match="max_seconds"):
        MeasureSettings(max_seconds=0)
