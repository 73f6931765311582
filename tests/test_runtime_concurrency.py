"""Concurrency: one embedder shared by many threads gives the serial vectors; concurrent writers of one
artifact directory (export subprocesses, raw staged writers) leave exactly one complete artifact."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_hardening_support import REPO, cli_env, hidden_leftovers, start_cli  # noqa: E402

import imgembed  # noqa: E402
from imgembed import artifact as A  # noqa: E402

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
    for got, want in zip(_run_threads(emb, chunks), serial * 3):
        assert got.indices == want.indices and got.errors == want.errors
        np.testing.assert_allclose(got.vectors, want.vectors, rtol=0, atol=1e-6)


def test_threads_on_the_artifact_match_the_torch_original(artifact_dir, tmp_path):
    """Cross-check under concurrency: threaded ORT vectors agree with threaded torch vectors."""
    ort_emb, torch_emb = imgembed.load(artifact_dir(MODEL)), imgembed.load(MODEL, random_init=True)
    chunks = [[it] for it in _items(tmp_path, 16) if not isinstance(it, bytes) or not it.startswith(b"broken")]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        a = list(pool.map(lambda c: ort_emb.embed(c)[0], chunks))
        b = list(pool.map(lambda c: torch_emb.embed(c)[0], chunks))
    cos = (np.sum(np.array(a) * np.array(b), axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99999


def _ops(model: Path) -> Counter:
    """Node count per op type of an ONNX file."""
    return Counter(n.op_type for n in onnx.load(str(model)).graph.node)


def test_two_exports_to_one_directory_at_once(tmp_path):
    """fp32 and int8 exports of one model race to the same directory: both succeed and the result is one
    complete, verified artifact whose manifest describes the model file beside it."""
    out = tmp_path / "D"
    procs = [start_cli("export", MODEL, "--random-init", "--out", str(out), *extra)
             for extra in ([], ["--int8", "--no-speed-check"])]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    manifest = A.verify(out)
    ops = _ops(out / A.MODEL_FILE)
    assert dict(ops) == manifest["export"]["op_counts"]
    quantized = ops["DynamicQuantizeLinear"] + ops["MatMulInteger"] > 0
    assert quantized == (manifest["precision"] == "int8")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert not [n for n in hidden_leftovers(out) if ".staging-" in n or ".old-" in n]
    assert imgembed.load(out).embed([np.zeros((64, 64, 3), np.uint8)]).shape == (1, 24)


WRITER = r"""
import json, os, sys
from pathlib import Path
import imgembed.artifact as A
out, wid, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for r in range(rounds):
    with A.staged_directory(out) as stage:
        payload = os.urandom(200_000) + f"{wid}-{r}".encode()
        (stage / "model.onnx").write_bytes(payload)
        A.write_json_atomic(stage / "manifest.json", {"model": {}, "name": "m", "precision": "fp32", "input": {},
                                                      "output": {"dim": 1}, "preprocess": {},
                                                      "writer": f"{wid}-{r}",
                                                      "files": A.file_checksums(stage)})
print("done")
"""


def test_many_processes_writing_one_artifact(tmp_path):
    """6 processes x 5 staged writes to one directory: every write succeeds (the lock keeps each writer's
    cleanup away from the others' staging dirs), the survivor is complete and consistent, no leftovers."""
    out = tmp_path / "D"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(w), "5"], cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(6)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-1500:] for _, err in outputs]
    manifest = A.verify(out)
    assert (out / "model.onnx").read_bytes().endswith(manifest["writer"].encode())
    assert hidden_leftovers(out) == []
    assert json.loads((out / "manifest.json").read_text())["writer"] in {f"{w}-{r}" for w in range(6)
                                                                         for r in range(5)}
