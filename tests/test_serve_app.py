"""In-process tests of the app's lifecycle (warm-up, readiness, internal errors) with a fake runner."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgembed.models.registry import get_spec
from imgembed.preprocess import load_image, preprocess_batch
from imgembed.runtime.base import InputSpec, Runner
from imgembed.runtime.embedder import Embedder
from imgembed.serve.app import create_app
from imgembed.serve.config import ServeConfig
from imgembed.serve.models import ServedModel

SPEC = get_spec("test-clip-tiny").preprocess


class GatedRunner(Runner):
    """Channel means + overall std as a 4-d 'embedding'; blocks until ``gate`` is set; can be made to fail."""

    backend = "fake"

    def __init__(self, fail_warm_up: bool = False):
        super().__init__(InputSpec("pixel_values", "float32", (None, 3, None, None)), 4, "fake")
        self.gate = threading.Event()
        self.fail_warm_up = fail_warm_up
        self.fail_next = False

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        assert self.gate.wait(10)
        if self.fail_warm_up and not x.any():
            raise RuntimeError("warm-up exploded")
        if self.fail_next:
            raise RuntimeError("inference exploded")
        return fake_embedding(x)


def fake_embedding(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(1, 2, 3))[:, None]], axis=1)


def png_bytes(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_app(runner: GatedRunner):
    emb = Embedder(runner, SPEC, name="fake", precision="fp32", normalized=False)
    return create_app([ServedModel("fake", ("fake-fp32",), Path("."), emb)], ServeConfig(max_delay_ms=0))


@pytest.fixture
def client_and_runner():
    from fastapi.testclient import TestClient

    runner = GatedRunner()
    with TestClient(make_app(runner), raise_server_exceptions=False) as client:
        yield client, runner
        runner.gate.set()


def test_not_ready_until_warm_up_finishes(client_and_runner):
    client, runner = client_and_runner
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert (r.status_code, r.json()["status"], r.json()["models"]) == (503, "warming_up", {"fake": False})
    r = client.post("/v1/embeddings", files=[("image", ("a.png", png_bytes(0)))])
    assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (503, "unavailable", "1")
    runner.gate.set()
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            break
        threading.Event().wait(0.01)
    assert client.get("/readyz").json() == {"ready": True, "status": "ready", "models": {"fake": True},
                                            "message": None}
    r = client.post("/v1/embeddings", files=[("image", ("a.png", png_bytes(0))), ("image", ("b.png", png_bytes(1)))])
    assert r.status_code == 200
    want = fake_embedding(preprocess_batch([load_image(png_bytes(0)), load_image(png_bytes(1))], SPEC))
    np.testing.assert_array_equal(np.asarray([d["embedding"] for d in r.json()["data"]], np.float32), want)


def test_failed_warm_up_keeps_the_server_unready():
    from fastapi.testclient import TestClient

    runner = GatedRunner(fail_warm_up=True)
    runner.gate.set()
    with TestClient(make_app(runner)) as client:
        for _ in range(200):
            if client.get("/readyz").json()["status"] != "warming_up":
                break
            threading.Event().wait(0.01)
        r = client.get("/readyz")
        assert (r.status_code, r.json()["status"], r.json()["message"]) == (503, "failed",
                                                                             "RuntimeError: warm-up exploded")


def test_an_inference_failure_is_a_json_500_and_counted(client_and_runner):
    client, runner = client_and_runner
    runner.gate.set()
    while client.get("/readyz").status_code != 200:
        threading.Event().wait(0.01)
    runner.fail_next = True
    r = client.post("/v1/embeddings", files=[("image", ("a.png", png_bytes(0)))])
    assert (r.status_code, r.json()) == (500, {"error": "internal", "message": "internal server error (RuntimeError)"})
    runner.fail_next = False
    assert client.post("/v1/embeddings", files=[("image", ("a.png", png_bytes(0)))]).status_code == 200
    text = client.get("/metrics").text
    assert 'imgembed_errors_total{kind="internal",model="fake"} 1.0' in text
    assert 'imgembed_requests_total{code="200",model="fake"} 1.0' in text
