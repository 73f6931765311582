"""The parity gate: compare an artifact's runner with the PyTorch original on the fixed image set.

Metrics (per batch size, then the worst over batch sizes):
  max_abs        largest absolute element difference of the embeddings
  min_cosine     smallest per-image cosine similarity between reference and candidate embedding
  mean_cosine    mean of the per-image cosine similarities
  knn_agreement  mean over images of |top-5 neighbours (reference) ∩ top-5 neighbours (candidate)| / 5,
                 neighbours ranked by cosine similarity within the set, excluding the image itself
  batch_variation  max |v(batch 1) - v(batch 8)| / max |v(batch 1)|: how much an image's vector depends on
                 its batch-mates (0 up to float rounding for static quantization; dynamic INT8 quantizes
                 activations per batch). Gated for engines that claim batch invariance.
Thresholds come from the registry (``ModelSpec.thresholds(precision)``); ``max_abs`` is reported and only
gated when a threshold is given for it. Every failing metric is collected before one ParityError is raised.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from imgembed.errors import ParityError

if TYPE_CHECKING:  # core does not import runtime; a runner is only called here
    from imgembed.runtime.base import Runner

BATCH_SIZES = (1, 3, 8)
KNN_K = 5
# A metric passes when value >= threshold, except max_abs where value <= threshold.
_LOWER_IS_BETTER = {"max_abs", "batch_variation"}
# Engines that claim batch invariance are gated at this batch_variation (float rounding of batched kernels).
BATCH_INVARIANCE_LIMIT = 1e-4


def gate_thresholds(thresholds: dict[str, float], batch_invariant: bool) -> dict[str, float]:
    """``thresholds`` plus the batch-variation limit for an engine that claims batch invariance."""
    return {**thresholds, "batch_variation": BATCH_INVARIANCE_LIMIT} if batch_invariant else dict(thresholds)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_agreement(ref: np.ndarray, cand: np.ndarray, k: int = KNN_K) -> float:
    """Mean fraction of each item's top-k cosine neighbours (self excluded) shared by both embeddings."""
    n = ref.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return 1.0

    def topk(x: np.ndarray) -> np.ndarray:
        sim = _unit(x) @ _unit(x).T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = topk(ref), topk(cand)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))


def compare(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """All parity metrics of ``cand`` against ``ref`` (both (N, D))."""
    if ref.shape != cand.shape:
        raise ParityError(f"embedding shapes differ: reference {ref.shape}, candidate {cand.shape}")
    if not np.all(np.isfinite(cand)):
        bad = int(np.sum(~np.isfinite(cand).all(axis=1)))
        return {"max_abs": float("inf"), "min_cosine": -1.0, "mean_cosine": -1.0, "knn_agreement": 0.0,
                "non_finite_rows": bad}
    cos = np.sum(_unit(ref) * _unit(cand), axis=1)
    return {
        "max_abs": float(np.max(np.abs(ref.astype(np.float64) - cand))),
        "min_cosine": float(np.min(cos)),
        "mean_cosine": float(np.mean(cos)),
        "knn_agreement": knn_agreement(ref, cand),
    }


def run_batched(runner: Runner, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner.infer(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def _worst(per_batch: dict[int, dict[str, float]]) -> dict[str, float]:
    keys = ("max_abs", "min_cosine", "mean_cosine", "knn_agreement")
    return {k: (max if k in _LOWER_IS_BETTER else min)(m[k] for m in per_batch.values()) for k in keys}


def batch_variation(outputs: dict[int, np.ndarray]) -> float:
    """max |v(smallest batch) - v(largest batch)| / max |v(smallest batch)| over the images (0 for one size)."""
    small, large = outputs[min(outputs)], outputs[max(outputs)]
    if not (np.all(np.isfinite(small)) and np.all(np.isfinite(large))):
        return float("inf")
    return float(np.max(np.abs(small.astype(np.float64) - large)) / max(float(np.max(np.abs(small))), 1e-12))


def check(metrics: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Failure lines ("metric value vs threshold") for every metric outside its threshold."""
    failures = []
    for key, limit in thresholds.items():
        value = metrics[key]
        ok = value <= limit if key in _LOWER_IS_BETTER else value >= limit
        if not ok:
            op = "<=" if key in _LOWER_IS_BETTER else ">="
            failures.append(f"{key} = {value:.6g}, required {op} {limit}")
    return failures


@dataclass(frozen=True)
class ParityReport:
    """The verdict of one parity gate. Manifests store :meth:`to_dict` under ``"parity"`` (JSON)."""

    precision: str
    passed: bool
    failures: list[str]                        # one "metric value, required op limit" line per failing metric
    thresholds: dict[str, float]
    metrics: dict[str, float]                  # the worst over batch sizes, plus batch_variation
    by_batch_size: dict[str, dict[str, float]]  # batch size (as a string, as in JSON) -> metrics
    images: list[str]
    knn_k: int = KNN_K
    engine: str | None = None                  # the artifact engine checked (recheck), when known

    def to_dict(self) -> dict:
        """The JSON form (the manifest's ``"parity"``); ``engine`` only when set."""
        out = {"precision": self.precision, "passed": self.passed, "failures": list(self.failures),
               "thresholds": dict(self.thresholds), "metrics": dict(self.metrics),
               "by_batch_size": {b: dict(m) for b, m in self.by_batch_size.items()}, "images": list(self.images),
               "knn_k": self.knn_k}
        return out if self.engine is None else {**out, "engine": self.engine}

    @classmethod
    def from_dict(cls, d: dict) -> "ParityReport":
        return cls(d["precision"], bool(d["passed"]), list(d["failures"]), dict(d["thresholds"]), dict(d["metrics"]),
                   {str(b): dict(m) for b, m in d["by_batch_size"].items()}, list(d["images"]),
                   int(d.get("knn_k", KNN_K)), d.get("engine"))

    def with_engine(self, engine: str) -> "ParityReport":
        return replace(self, engine=engine)


def parity_report(reference: np.ndarray, runner: Runner, pixels: np.ndarray, thresholds: dict[str, float],
                  precision: str, image_names: Sequence[str], batch_sizes: Sequence[int] = BATCH_SIZES
                  ) -> ParityReport:
    """Run ``runner`` over ``pixels`` at each batch size, compare with ``reference`` and judge the result."""
    outputs = {int(b): run_batched(runner, pixels, b) for b in batch_sizes}
    per_batch = {b: compare(reference, out) for b, out in outputs.items()}
    worst = {**_worst(per_batch), "batch_variation": batch_variation(outputs)}
    failures = check(worst, thresholds)
    return ParityReport(precision, not failures, failures, dict(thresholds), worst,
                        {str(b): m for b, m in per_batch.items()}, list(image_names), KNN_K)


def format_report(report: ParityReport) -> str:
    """Human-readable lines: each metric against its threshold, PASS/FAIL."""
    lines = [f"parity ({report.precision}) over {len(report.images)} images at batch sizes "
             f"{', '.join(report.by_batch_size)}: {'PASS' if report.passed else 'FAIL'}"]
    for key, value in report.metrics.items():
        limit = report.thresholds.get(key)
        if limit is None:
            lines.append(f"  {key:<14} {value:.6g}")
        else:
            op = "<=" if key in _LOWER_IS_BETTER else ">="
            mark = "ok  " if not check({key: value}, {key: limit}) else "FAIL"
            lines.append(f"  {key:<14} {value:.6f}  (required {op} {limit})  {mark}")
    return "\n".join(lines)
