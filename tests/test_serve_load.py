"""Bounded load test: many concurrent clients, a small queue, a fixed number of requests.

Every request must get exactly one answer -- its own vectors (equal to the offline runtime's) or an
explicit 429 -- and the server's own counters must agree with what the clients saw (nothing lost, nothing
counted twice). Performance targets live in benchmarks/serve_load.py, not here.
"""
from __future__ import annotations

import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import imgembed
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.gate.samples import parity_images
from imgembed.serve.client import EmbeddingClient
from imgembed.serve.testing import ServerProcess

CLIENTS, PER_CLIENT = 16, 15
MODEL = "test-dinov2-tiny"
pytestmark = pytest.mark.timeout(180)


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGES = [jpeg(img) for _, img in parity_images()]


def plan(client: int, k: int) -> list[int]:
    """Image indices of request k of a client: 1 to 3 images, a fixed pattern."""
    n = 1 + (client + k) % 3
    return [(client * 7 + k * 3 + j) % len(IMAGES) for j in range(n)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / f"{MODEL}-fp32"
    return export_model(MODEL, path, ExportOptions(precision="fp32", random_init=True, speed_check=False)).path


def counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def run_client(url: str, client: int) -> list[tuple[list[int], int, dict, dict]]:
    """PER_CLIENT sequential requests on one connection; (images, status, headers, body) of each."""
    out = []
    with EmbeddingClient(url, timeout=60) as c:
        for k in range(PER_CLIENT):
            idx = plan(client, k)
            status, headers, body = c.post_images([IMAGES[i] for i in idx])
            out.append((idx, status, headers, json.loads(body)))
            if status == 429:
                time.sleep(0.01)  # back off a little (a real client would honour Retry-After)
    return out


def test_every_request_gets_exactly_one_answer_and_the_right_vectors(artifact):
    reference = imgembed.load(artifact).embed(IMAGES)
    with ServerProcess([artifact], "--max-batch", "8", "--max-delay-ms", "2", "--max-queue", "16",
                       "--max-images", "4", "--timeout", "30") as server:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for batch in pool.map(lambda c: run_client(server.url, c), range(CLIENTS)) for r in batch]
        with EmbeddingClient(server.url) as c:
            metrics = c.request("GET", "/metrics")[2].decode()

    assert len(results) == CLIENTS * PER_CLIENT
    statuses = [status for _, status, _, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    accepted = [(idx, body) for idx, status, _, body in results if status == 200]
    rejected = [(headers, body) for _, status, headers, body in results if status == 429]
    assert len(accepted) >= len(results) // 5 and rejected, f"{len(accepted)} accepted, {len(rejected)} rejected"
    for idx, body in accepted:  # each answer carries exactly its own images, in order
        assert [d["index"] for d in body["data"]] == list(range(len(idx)))
        got = np.asarray([d["embedding"] for d in body["data"]], np.float32)
        np.testing.assert_allclose(got, reference[idx], rtol=1e-5, atol=1e-5)
    for headers, body in rejected:
        assert body["error"] == "queue_full" and headers["retry-after"] == "1"

    # The server saw exactly the requests the clients sent: no loss, no duplicates.
    assert counter(metrics, "imgembed_requests_total", model=MODEL, code="200") == len(accepted)
    assert counter(metrics, "imgembed_requests_total", model=MODEL, code="429") == len(rejected)
    assert counter(metrics, "imgembed_requests_total") == len(results)
    assert counter(metrics, "imgembed_images_total", model=MODEL, outcome="ok") == sum(len(i) for i, _ in accepted)
    assert counter(metrics, "imgembed_batch_size_sum", model=MODEL) == sum(len(i) for i, _ in accepted)
    assert counter(metrics, "imgembed_queue_depth", model=MODEL) == 0
    print(f"\n{len(accepted)} accepted, {len(rejected)} rejected (429), "
          f"{counter(metrics, 'imgembed_batch_size_count', model=MODEL):.0f} batches")
