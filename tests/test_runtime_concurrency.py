"""Concurrency: one embedder shared by many threads gives the serial vectors and errors, for the ONNX Runtime
artifact and the torch original alike. (Concurrent writers of one artifact: test_artifact*.py.)"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgembed

from .helpers import cosine

MODEL = "test-clip-tiny"
THREADS = 8


def _items(tmp: Path, n: int = 48) -> list:
    """n inputs of every kind (arrays, PNG/JPEG bytes, PIL images, paths), varied sizes, 1 in 8 broken."""
    rng = np.random.default_rng(42)
    items: list = []
    for i in range(n):
        arr = rng.integers(0, 256, (40 + 7 * (i % 5), 50 + 11 * (i % 3), 3), dtype=np.uint8)
        kind = i % 8
        if kind == 7:
            items.append(b"broken " * i)
            continue
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG" if kind % 2 else "JPEG")
        if kind in (0, 1):
            items.append(arr)
        elif kind in (2, 3):
            items.append(buf.getvalue())
        elif kind == 4:
            items.append(Image.fromarray(arr))
        else:
            path = tmp / f"img{i}.{'png' if kind % 2 else 'jpg'}"
            path.write_bytes(buf.getvalue())
            items.append(path)
    return items


def _run_threads(emb, chunks: list[list]) -> list:
    """Each chunk embedded by a pool of THREADS threads, three rounds, results in chunk order."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(lambda c: emb.embed(c, on_error="report", batch_size=2), chunks * 3))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_one_embedder_many_threads_equals_serial(artifact_dir, tmp_path, backend):
    """8 threads sharing one Embedder (ORT artifact, or the torch original) reproduce the serial vectors
    and the same per-item errors, chunk by chunk."""
    emb = imgembed.load(artifact_dir(MODEL)) if backend == "onnxruntime" else \
        imgembed.load(MODEL, random_init=True)
    items = _items(tmp_path)
    chunks = [items[i:i + 3] for i in range(0, len(items), 3)]
    serial = [emb.embed(c, on_error="report", batch_size=2) for c in chunks]
    assert sum(len(r.indices) for r in serial) == 42 and sum(len(r.errors) for r in serial) == 6
    for got, want in zip(_run_threads(emb, chunks), serial * 3, strict=True):
        assert got.indices == want.indices and got.errors == want.errors
        np.testing.assert_allclose(got.vectors, want.vectors, rtol=0, atol=1e-6)


def test_threads_on_the_artifact_match_the_torch_original(artifact_dir, tmp_path):
    """Cross-check under concurrency: threaded ORT vectors agree with threaded torch vectors."""
    ort_emb, torch_emb = imgembed.load(artifact_dir(MODEL)), imgembed.load(MODEL, random_init=True)
    chunks = [[it] for it in _items(tmp_path, 16) if not isinstance(it, bytes) or not it.startswith(b"broken")]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        a = list(pool.map(lambda c: ort_emb.embed(c)[0], chunks))
        b = list(pool.map(lambda c: torch_emb.embed(c)[0], chunks))
    assert cosine(a, b).min() >= 0.99999
