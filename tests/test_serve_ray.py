"""``imgembed.serve.ray_app`` on a local Ray cluster: the server's HTTP API behind Ray's proxy, two model
replicas batching with ``@serve.batch``, and a replica killed under load.

Bounded: one local cluster (4 logical CPUs) for the module, requests with timeouts, every wait with a deadline.
"""
from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

import imgembed
from imgembed.gate.samples import parity_images
from imgembed.serve.client import EmbeddingClient
from imgembed.serve.config import ServeConfig

from .helpers import post_json

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


PHOTOS = [jpeg(img) for _, img in parity_images()[:6]]


@pytest.fixture(scope="module")
def url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_until(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:g} s")


def running_model_replicas() -> int:
    app = serve.status().applications.get("imgembed")
    if app is None or "imgembed-model" not in app.deployments:
        return 0
    return app.deployments["imgembed-model"].replica_states.get("RUNNING", 0)


def test_two_replicas_answer_the_offline_vectors_and_survive_a_killed_replica(url, artifact_dir):
    from imgembed.serve.ray import ray_app

    artifact = artifact_dir("test-clip-tiny")
    offline = imgembed.load(artifact).embed(PHOTOS)
    config = ServeConfig(max_batch=4, max_delay_ms=5, timeout_s=60)
    serve.run(ray_app([artifact], config, replicas=2), name="imgembed", route_prefix="/", blocking=False)
    wait_until(lambda: EmbeddingClient(url, timeout=5).ready(), 240, "the Ray application ready")
    wait_until(lambda: running_model_replicas() == 2, 120, "two model replicas running")

    with EmbeddingClient(url, timeout=60) as client:
        np.testing.assert_allclose(client.embed(PHOTOS), offline, rtol=0, atol=1e-5)
        models = client.models()
        assert [m["id"] for m in models] == ["test-clip-tiny"]
        metrics = client.request("GET", "/metrics")[2].decode()
        assert "imgembed_requests_total" in metrics  # the server's own metrics, from an ingress replica

    outcomes: list[tuple[int, dict]] = []

    def load() -> None:
        with EmbeddingClient(url, timeout=90) as c:
            for i in range(12):
                status, _, body = post_json(c, "/v1/embeddings", {"images": [
                    base64.b64encode(p).decode() for p in PHOTOS[i % 3:i % 3 + 3]]})
                outcomes.append((status, body, i % 3))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "imgembed-model" in a["name"]]
    assert len(victims) == 2, victims
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    for t in threads:
        t.join(300)
    assert len(outcomes) == 48  # every request answered
    statuses = sorted({s for s, _, _ in outcomes})
    assert set(statuses) <= {200, 503}, statuses
    for status, body, start in outcomes:
        if status == 503:
            assert body["error"] == "unavailable"
        else:
            np.testing.assert_allclose([d["embedding"] for d in body["data"]], offline[start:start + 3],
                                       rtol=0, atol=1e-5)
    wait_until(lambda: running_model_replicas() == 2, 180, "the killed replica replaced")
