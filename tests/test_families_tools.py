"""The new families through every tool: INT8 export (batch-invariant, gated), bench and the HTTP server."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import imgembed
from imgembed.cli import app
from imgembed.gate.samples import parity_images
from imgembed.serve.app import create_app
from imgembed.serve.client import encode_multipart
from imgembed.serve.config import ServeConfig
from imgembed.serve.models import ServedModel

from .helpers import cosine, manifest_json

NEW_TINY = ("test-siglip-tiny", "test-dinov3-tiny", "test-dinov2-reg-tiny")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.parametrize("name", NEW_TINY)
def test_int8_export_passes_the_gate_and_matches_the_original(artifact_dir, name):
    m = manifest_json(artifact_dir(name, "int8"))
    assert m["status"] == "passed" and m["batch_invariant"] is True
    assert m["parity"]["metrics"]["min_cosine"] >= 0.99 and m["parity"]["metrics"]["batch_variation"] <= 1e-4
    images = [img for _, img in parity_images()[:5]]
    ref = imgembed.load(name, random_init=True, workers=0).embed(images)
    assert cosine(imgembed.load(artifact_dir(name, "int8")).embed(images), ref).min() >= 0.99


@pytest.mark.parametrize("name", NEW_TINY)
def test_bench_runs_the_artifact_beside_its_original(artifact_dir, name, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(artifact_dir(name, "int8")), "--batch-sizes", "2", "--max-seconds",
                                   "0.1", "--window-seconds", "0.05", "--threads", "1", "--engines", "onnxruntime",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "r" / "bench.json").read_text())["results"]
    assert {r["variant"] for r in rows} == {"torch-fp32", "onnxruntime-int8"}
    assert all(r["throughput_ips"] > 0 and r["model"] == name for r in rows)


@pytest.mark.parametrize("name", NEW_TINY)
def test_served_vectors_equal_the_offline_runtime(artifact_dir, name):
    path = artifact_dir(name, "int8")
    images = [img for _, img in parity_images()[:3]]
    payload = [(f"{i}.jpg", _jpeg(img)) for i, img in enumerate(images)]
    offline = imgembed.load(path).embed([data for _, data in payload])
    served = ServedModel(name, (), path, imgembed.load(path, workers=0))
    body, ctype = encode_multipart(payload)
    with TestClient(create_app([served], ServeConfig(max_delay_ms=0))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:   # warm-up runs in the background
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        models = client.get("/v1/models").json()["models"]
        assert [m["id"] for m in models] == [name] and models[0]["backend"] == "onnxruntime"
        res = client.post("/v1/embeddings", content=body, headers={"content-type": ctype})
    assert res.status_code == 200, res.text
    got = np.asarray([d["embedding"] for d in res.json()["data"]], np.float32)
    np.testing.assert_allclose(got, offline, rtol=0, atol=1e-5)
