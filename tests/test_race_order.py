"""The speed-first engine race (:func:`imgembed.export.engines.run`): every candidate is built and timed briefly,
then gated fastest first; the race stops once no untried candidate can beat the fastest passing one by more than
the brief timing's noise (and a portable engine passed beside a winner that is not portable). Runners, timings and
parity reports are stand-ins here, so the order is checked exactly; the real race runs in tests/test_engines.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from imgembed.export import engines
from imgembed.export.engines import LAST_RESORT, Candidate


class _Runner:
    def __init__(self, cid: str) -> None:
        self.id = cid

    def activate(self):
        return self

    def deactivate(self) -> None:
        pass


@pytest.fixture
def race(monkeypatch, tmp_path):
    """``race(table, **run_kwargs)`` runs the race over ``table`` rows ``(id, seconds per batch, passes, portable,
    fallback_for, precision)`` and returns (outcomes by id, built ids, gated ids, timed ids) in order."""

    def run(table, precision="int8", **kw):
        speed = {row[0]: row[1] for row in table}
        passes = {row[0]: row[2] for row in table}
        built, gated, timed = [], [], []

        def builder(cid):
            def build(inputs, directory):
                built.append(cid)
                return {}, {}
            return build

        def medians(runners, batch, **opts):
            if opts.get("rounds") != engines.QUICK_ROUNDS:
                timed.extend(runners)
            return {k: speed[k] for k in runners}

        def report(reference, runner, inputs, thresholds, prec, names):
            gated.append(runner.id)
            ok = passes[runner.id]
            return SimpleNamespace(passed=ok, metrics={"min_cosine": 0.999 if ok else 0.9},
                                   failures=[] if ok else ["min_cosine 0.9 < 0.99"])

        monkeypatch.setattr(engines, "_runner", lambda inputs, outcome: _Runner(outcome.candidate.id))
        monkeypatch.setattr(engines, "interleaved_medians", medians)
        monkeypatch.setattr(engines, "parity_report", report)
        monkeypatch.setattr(engines, "gate_thresholds", lambda t, invariant: t)
        candidates = [Candidate(row[0], "fake", row[5] if len(row) > 5 else precision, builder(row[0]), True,
                                portable=row[3], fallback_for=row[4], same_speed_as=row[6] if len(row) > 6 else None)
                      for row in table]
        parity = SimpleNamespace(reference=None, names=[], inputs=lambda runner: np.zeros((8, 3, 4, 4), np.float32))
        inputs = SimpleNamespace(parity=parity, work=Path(tmp_path), threads=1)
        outcomes = engines.run(candidates, inputs, {}, lambda s: None, **kw)
        return {o.candidate.id: o for o in outcomes}, built, gated, timed

    return run


def test_the_fastest_passing_engine_is_gated_first_and_slower_ones_are_not_gated(race):
    table = [("ort-8bit", 0.100, True, False, None), ("ort-7bit", 0.105, True, True, None),
             ("ov", 0.050, True, False, None), ("ov-bf16", 0.040, True, False, None)]
    out, built, gated, timed = race(table)
    assert built == ["ort-8bit", "ort-7bit", "ov", "ov-bf16"]        # every candidate is built
    # fastest first; the winner is not portable, so the fastest portable one is gated too
    assert gated == ["ov-bf16", "ort-7bit"]
    assert sorted(timed) == ["ort-7bit", "ov-bf16"]                         # only the passing ones are timed at length
    assert out["ov"].error == ("not needed: ov-bf16 passed the gate and is faster here (200.0 vs 160.0 img/s, "
                               "brief timing)")
    assert out["ort-8bit"].error.startswith("not needed: ov-bf16 passed the gate")
    winner, kept = engines.choose(list(out.values()), keep_all=False)
    assert winner.candidate.id == "ov-bf16" and [o.candidate.id for o in kept] == ["ov-bf16", "ort-7bit"]


def test_a_failing_fastest_engine_hands_the_race_to_the_next_fastest(race):
    table = [("a", 0.10, True, True, None), ("b", 0.05, False, False, None), ("c", 0.07, True, False, None)]
    out, _, gated, _ = race(table)
    assert gated == ["b", "c", "a"]                   # b failed; c passed but is not portable: a is the portable
    assert not out["b"].passed and out["b"].report.failures == ["min_cosine 0.9 < 0.99"]
    winner, _ = engines.choose(list(out.values()), keep_all=False)
    assert winner.candidate.id == "c"


def test_untried_engines_within_the_brief_timings_noise_are_gated_too(race):
    near = 0.050 * (1 + engines.QUICK_NOISE * 0.5)    # could be the faster one in the final timing
    far = 0.050 * (1 + engines.QUICK_NOISE * 2)
    table = [("best", 0.050, True, True, None), ("near", near, True, True, None), ("far", far, True, True, None)]
    out, _, gated, timed = race(table)
    assert gated == ["best", "near"] and sorted(timed) == ["best", "near"]
    assert out["far"].error.startswith("not needed: best passed the gate and is faster here")


def test_a_fallback_is_built_only_when_its_own_candidate_failed_and_its_turn_came(race):
    table = [("plain", 0.03, False, True, None), ("plain-fix", 0.035, True, True, "plain"),
             ("other", 0.04, True, True, None), ("other-fix", 0.03, True, True, "other")]
    out, built, gated, _ = race(table)
    # plain (fastest) fails: plain-fix enters the race at plain's speed and is built when its turn comes
    assert built == ["plain", "other", "plain-fix"] and gated == ["plain", "plain-fix"]
    assert out["plain-fix"].passed
    assert out["other"].error.startswith("not needed: plain-fix passed the gate and is faster here")
    assert out["other-fix"].error == "not needed: built only when other fails its gate, and other was not needed"


def test_a_fallback_slower_than_a_passing_engine_is_never_built(race):
    table = [("plain", 0.10, False, True, None), ("plain-fix", 0.09, True, True, "plain"),
             ("fast", 0.02, True, True, None), ("fast-fix", 0.01, True, True, "fast"),
             ("fastest", 0.01, False, True, None)]
    out, built, gated, _ = race(table)
    assert gated == ["fastest", "fast"] and built == ["plain", "fast", "fastest"]
    assert out["fast-fix"].error == "not needed: fast passed the gate"
    assert out["plain-fix"].error == "not needed: built only when plain fails its gate, and plain was not needed"


def test_a_fallback_of_a_candidate_the_race_did_not_need_says_so(race):
    table = [("fast", 0.02, True, True, None), ("slow", 0.10, True, True, None), ("slow-fix", 0.09, True, True,
                                                                                    "slow")]
    out, built, gated, _ = race(table)
    assert gated == ["fast"] and "slow-fix" not in built
    assert out["slow-fix"].error == "not needed: built only when slow fails its gate, and slow was not needed"


def test_the_last_resort_is_built_when_nothing_else_passed(race):
    table = [("a", 0.05, False, True, None), ("b", 0.04, False, True, None),
             ("mixed", 0.06, True, True, LAST_RESORT)]
    out, built, gated, _ = race(table)
    assert built == ["a", "b", "mixed"] and gated == ["b", "a", "mixed"]
    assert out["mixed"].passed
    out, built, gated, _ = race([("a", 0.05, True, True, None), ("mixed", 0.06, True, True, LAST_RESORT)])
    assert "mixed" not in built and out["mixed"].error == "not needed: a full-INT8 candidate passed the gate"


def test_keep_candidates_and_no_speed_check_gate_every_candidate_in_plan_order(race):
    table = [("slow", 0.10, True, True, None), ("fast", 0.02, True, False, None), ("mid", 0.05, False, True, None)]
    _, _, gated, timed = race(table, gate_all=True)
    assert gated == ["slow", "fast", "mid"] and sorted(timed) == ["fast", "slow"]
    _, _, gated, timed = race(table, speed_check=False)
    assert gated == ["slow", "fast", "mid"] and timed == []


def test_an_engine_at_another_precision_does_not_end_the_race_for_the_asked_one(race):
    # a BF16 export races OpenVINO BF16 and the portable ONNX Runtime FP32 graph: FP32 passing first must not
    # stop the race before a BF16 engine was gated
    table = [("ov-bf16", 0.05, True, False, None, "bf16"), ("ort-fp32", 0.04, True, True, None, "fp32")]
    out, _, gated, _ = race(table, precision="bf16")
    assert gated == ["ort-fp32", "ov-bf16"]
    winner, kept = engines.choose(list(out.values()), keep_all=False)
    assert winner.candidate.id == "ov-bf16" and [o.candidate.id for o in kept] == ["ov-bf16", "ort-fp32"]


def test_an_engine_that_runs_its_twins_kernels_is_built_only_when_it_could_win(race):
    # the 8-bit preset runs the kernels of its portable 7-bit twin: raced at the twin's brief speed
    table = [("8bit", 0.10, True, False, None, "int8", "7bit"), ("7bit", 0.10, True, True, None),
             ("ov", 0.05, True, False, None)]
    out, built, gated, _ = race(table)
    assert built == ["7bit", "ov"] and gated == ["ov", "7bit"]
    assert out["8bit"].error == ("not needed: ov passed the gate and is faster here (160.0 vs 80.0 img/s, brief "
                                 "timing) (runs the kernels of 7bit: not built)")
    # the twin fails: the 8-bit engine enters at its speed, is built, timed and gated
    table = [("8bit", 0.10, True, False, None, "int8", "7bit"), ("7bit", 0.10, False, True, None),
             ("ov", 0.05, False, False, None)]
    out, built, gated, _ = race(table)
    assert built == ["7bit", "ov", "8bit"] and gated == ["ov", "7bit", "8bit"] and out["8bit"].passed


def test_a_build_error_becomes_one_line_of_the_row_even_without_a_message(tmp_path):
    from imgembed.errors import ExportError

    def failing(message):
        def build(inputs, directory):
            raise ExportError(message)
        return build

    inputs = SimpleNamespace(work=Path(tmp_path))
    for message, row in (("", "ExportError: "), ("first line\nsecond line", "ExportError: first line")):
        outcome = engines.Outcome(Candidate("x", "fake", "int8", failing(message), True))
        assert engines._build(outcome, inputs, lambda s: None) is False
        assert outcome.error == row
