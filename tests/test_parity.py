"""Parity metrics on controlled inputs: each number checked against a hand computation."""
from __future__ import annotations

import numpy as np
import pytest

from imgembed.errors import ParityError
from imgembed.gate.parity import check, compare, format_report, knn_agreement, parity_report
from imgembed.runtime.base import InputSpec, Runner


def test_identical_embeddings_are_perfect():
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    m = compare(x, x.copy())
    assert m == {"max_abs": 0.0, "min_cosine": pytest.approx(1.0), "mean_cosine": pytest.approx(1.0),
                 "knn_agreement": 1.0}


def test_cosine_and_max_abs_by_hand():
    ref = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    cand = np.array([[1, 0], [1, 1], [2, 2]], np.float32)  # row 1 rotated 45°, row 2 scaled
    m = compare(ref, cand)
    assert m["min_cosine"] == pytest.approx(np.cos(np.pi / 4))
    assert m["mean_cosine"] == pytest.approx((1 + np.cos(np.pi / 4) + 1) / 3)
    assert m["max_abs"] == pytest.approx(1.0)


def test_knn_agreement_counts_shared_neighbours():
    # 4 points on a line of angles; k=1: neighbour of each point is its closest angle.
    angles = np.array([0.0, 0.1, 1.0, 1.1])
    ref = np.stack([np.cos(angles), np.sin(angles)], 1)
    assert knn_agreement(ref, ref, k=1) == 1.0
    swapped = ref[[0, 2, 1, 3]]  # now 0's neighbour is row 1 (angle 1.0)? recompute by hand:
    # swapped angles [0, 1.0, 0.1, 1.1]: nn(0)=2, nn(1)=3, nn(2)=0, nn(3)=1 ; ref: nn=1,0,3,2
    assert knn_agreement(ref, swapped, k=1) == 0.0
    assert knn_agreement(ref[:1], ref[:1]) == 1.0  # a single item has no neighbours


def test_non_finite_candidate_fails_every_metric():
    ref = np.ones((3, 4), np.float32)
    cand = ref.copy()
    cand[1, 2] = np.nan
    m = compare(ref, cand)
    assert m["non_finite_rows"] == 1 and m["min_cosine"] == -1.0
    assert check(m, {"min_cosine": 0.9}) == ["min_cosine = -1, required >= 0.9"]


def test_shape_mismatch_is_parity_error():
    with pytest.raises(ParityError, match=r"reference \(2, 3\), candidate \(2, 4\)"):
        compare(np.zeros((2, 3)), np.zeros((2, 4)))


def test_check_reports_every_failing_metric_against_its_threshold():
    failures = check({"min_cosine": 0.98, "mean_cosine": 0.999, "knn_agreement": 0.5, "max_abs": 0.2},
                     {"min_cosine": 0.99, "mean_cosine": 0.995, "knn_agreement": 0.9, "max_abs": 0.1})
    assert failures == ["min_cosine = 0.98, required >= 0.99", "knn_agreement = 0.5, required >= 0.9",
                        "max_abs = 0.2, required <= 0.1"]


class _NoisyRunner(Runner):
    """Returns the reference plus noise that grows with the batch size (to see per-batch reporting)."""

    backend = "fake"

    def __init__(self, table: np.ndarray):
        super().__init__(InputSpec("pixel_values", "float32", (None, 1, 1, 1)), table.shape[1], "noisy")
        self.table = table

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        idx = x[:, 0, 0, 0].astype(int)
        return self.table[idx] + 0.05 * (len(idx) == 8)


def test_report_is_worst_over_batch_sizes_and_judged():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(16, 6)).astype(np.float32)
    pixels = np.arange(16, dtype=np.float32).reshape(16, 1, 1, 1)
    with _NoisyRunner(ref) as r:
        rep = parity_report(ref, r, pixels, {"max_abs": 0.01}, "fp32", [str(i) for i in range(16)])
    assert rep.by_batch_size["1"]["max_abs"] == 0.0
    assert rep.by_batch_size["8"]["max_abs"] == pytest.approx(0.05, abs=1e-6)
    assert rep.metrics["max_abs"] == pytest.approx(0.05, abs=1e-6)
    assert not rep.passed and rep.failures[0].startswith("max_abs = 0.05")
    text = format_report(rep)
    assert "FAIL" in text and "required <= 0.01" in text


def test_held_out_images_are_in_neither_the_parity_nor_the_calibration_set():
    from imgembed.gate.samples import calibration_images, heldout_images, parity_images

    held = heldout_images()
    names = [n for n, _ in held]
    assert len(held) == 53 and len(set(names)) == len(names)
    assert not set(names) & {n for n, _ in parity_images()}
    seen = {np.asarray(im.convert("RGB")).tobytes() for _, im in parity_images()}
    seen |= {np.asarray(im.convert("RGB")).tobytes() for im in calibration_images()}
    for name, im in held:
        assert im.mode in ("RGB", "L") and min(im.size) >= 25, name
        assert np.asarray(im.convert("RGB")).tobytes() not in seen, name
