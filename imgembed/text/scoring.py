"""Scoring in a shared image-text space: cosine similarity, ranking, and zero-shot label probabilities.

The space is the artifact manifest's ``space`` entry (written by ``export --text``): ``scores`` "softmax"
(CLIP: logits = logit_scale * cosine, a softmax over the labels gives one distribution per image) or
"sigmoid" (SigLIP: logits = logit_scale * cosine + logit_bias, an independent probability per label).
Everything here is numpy; vectors need not be normalised (cosines are computed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

SCORES = ("softmax", "sigmoid")


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) array of vectors, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix ``(len(a), len(b))`` of two sets of vectors of the same dimension."""
    ua, ub = _unit(a, "a"), _unit(b, "b")
    if ua.shape[1] != ub.shape[1]:
        raise ValueError(f"vectors of dimension {ua.shape[1]} and {ub.shape[1]} are not in one space")
    return ua @ ub.T


@dataclass(frozen=True)
class Ranking:
    """For each query, the candidates' indices best first and their cosine similarities."""

    indices: np.ndarray   # (Q, k) int
    scores: np.ndarray    # (Q, k) float32 cosine

    def __len__(self) -> int:
        return len(self.indices)


def rank(queries: np.ndarray, candidates: np.ndarray, k: int | None = None) -> Ranking:
    """Rank ``candidates`` for each of ``queries`` by cosine similarity (ties: lower index first)."""
    sims = similarity(queries, candidates)
    k = sims.shape[1] if k is None else max(0, min(int(k), sims.shape[1]))
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return Ranking(order, np.take_along_axis(sims, order, axis=1))


def logits(image_vecs: np.ndarray, text_vecs: np.ndarray, space: Mapping) -> np.ndarray:
    """The model's (image, text) logits ``(N_images, N_texts)`` in ``space`` (the manifest's entry)."""
    scale = float(space.get("logit_scale") or 1.0)
    bias = space.get("logit_bias")
    out = scale * similarity(image_vecs, text_vecs)
    return out + float(bias) if bias is not None else out


def probabilities(image_vecs: np.ndarray, text_vecs: np.ndarray, space: Mapping) -> np.ndarray:
    """Zero-shot label probabilities ``(N_images, N_labels)`` as the model defines them: a softmax over the
    labels (CLIP) or an independent sigmoid per label (SigLIP)."""
    kind = space.get("scores")
    if kind not in SCORES:
        raise ValueError(f"space.scores {kind!r}; expected one of {list(SCORES)}")
    z = logits(image_vecs, text_vecs, space).astype(np.float64)
    if kind == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
