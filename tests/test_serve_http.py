"""Functional tests of ``imgembed serve`` through real server processes on 127.0.0.1.

Every server is a child process (``python -m imgembed.cli serve ... --port 0``) stopped in fixture
teardown; vectors are compared with the offline runtime (``imgembed.load(artifact).embed``).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import imgembed
from imgembed.errors import ImageDecodeError
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.gate.samples import parity_images
from imgembed.preprocess import load_image
from imgembed.serve.client import EmbeddingClient, encode_multipart
from imgembed.serve.testing import ServerProcess

from .helpers import cosine, post_json

pytestmark = pytest.mark.timeout(120)


def encode(img: Image.Image) -> bytes:
    """JPEG for RGB / grey photos, PNG for the other modes (alpha, palette)."""
    buf = io.BytesIO()
    if img.mode in ("RGB", "L"):
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


IMAGES = [(name, encode(img)) for name, img in parity_images()]
BYTES = [data for _, data in IMAGES]


def decode_error(data: bytes, name: str) -> str:
    """The offline decoder's message for ``data``: the server must answer with exactly this."""
    with pytest.raises(ImageDecodeError) as err:
        load_image(data, name=name)
    return str(err.value)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-artifacts")
    out = {}
    for name, precision in (("test-clip-tiny", "int8"), ("test-dinov2-tiny", "fp32")):
        opts = ExportOptions(precision=precision, random_init=True, speed_check=False)
        out[name] = export_model(name, root / f"{name}-{precision}", opts).path
    return out


@pytest.fixture(scope="module")
def reference(artifacts):
    """Offline vectors of every sample image, per model."""
    return {name: imgembed.load(path).embed(BYTES) for name, path in artifacts.items()}


@pytest.fixture(scope="module")
def server(artifacts):
    with ServerProcess([artifacts["test-clip-tiny"], artifacts["test-dinov2-tiny"]], "--max-batch", "8",
                       "--max-delay-ms", "5", "--max-queue", "64", "--max-images", "16", "--max-body-mb", "2",
                       "--max-pixels", "2500000", "--timeout", "20") as s:
        yield s


@pytest.fixture
def client(server):
    with EmbeddingClient(server.url, timeout=30) as c:
        yield c


def post_files(client: EmbeddingClient, path: str, files) -> tuple[int, dict, dict]:
    body, ctype = encode_multipart(files)
    status, headers, data = client.request("POST", path, body, {"Content-Type": ctype})
    return status, headers, json.loads(data)


def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in a Prometheus exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape(client: EmbeddingClient) -> str:
    status, headers, body = client.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return body.decode()


# ----------------------------------------------------------------------------------- main server
def test_health_readiness_and_model_list(client):
    assert client.request("GET", "/healthz")[::2] == (200, b'{"status":"ok"}')
    status, _, body = client.request("GET", "/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "status": "ready", "message": None,
                                "models": {"test-clip-tiny": True, "test-dinov2-tiny": True}}
    models = {m["id"]: m for m in client.models()}
    engine = models["test-clip-tiny"]["engine"]   # the 8-bit preset or its portable 7-bit twin (CPU-dependent)
    assert engine in ("onnxruntime-int8-static-qdq-matmul", "onnxruntime-int8-static-qdq-matmul-7bit")
    assert models["test-clip-tiny"] == {"id": "test-clip-tiny", "aliases": ["test-clip-tiny-int8"],
                                        "name": "test-clip-tiny", "precision": "int8", "dim": 24,
                                        "normalized": True, "input_size": [64, 64], "backend": "onnxruntime",
                                        "engine": engine, "batch_invariant": True,
                                        "towers": ["image"], "space": None, "text": None}
    assert (models["test-dinov2-tiny"]["dim"], models["test-dinov2-tiny"]["precision"]) == (32, "fp32")


def test_multipart_vectors_equal_the_offline_runtime(client, reference):
    idx = [0, 5, 8, 20, 22]  # RGB, grey, RGBA, palette, odd sizes
    vectors = client.embed([BYTES[i] for i in idx], model="test-dinov2-tiny")
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference["test-dinov2-tiny"][idx], rtol=1e-5, atol=1e-5)


def test_dynamic_int8_vectors_match_offline_within_int8_tolerance(client, reference):
    # Dynamic INT8 quantizes activations with one scale per batch: a batch of 5 here and a batch of 16
    # offline give slightly different vectors (see test_batch_invariant_serving for exact ones).
    idx = [0, 5, 8, 20, 22]
    vectors = client.embed([BYTES[i] for i in idx], model="test-clip-tiny")
    assert vectors.shape == (5, 24)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # normalized model
    cos = cosine(vectors, reference["test-clip-tiny"][idx])
    assert cos.min() > 0.999, cos


def test_json_base64_by_alias_and_data_url(client, reference):
    images = [base64.b64encode(BYTES[1]).decode(), "data:image/jpeg;base64," + base64.b64encode(BYTES[3]).decode()]
    status, _, body = post_json(client, "/v1/embeddings", {"model": "test-dinov2-tiny-fp32", "images": images})
    assert status == 200
    assert (body["model"], body["precision"], body["dim"], body["normalized"]) == ("test-dinov2-tiny", "fp32", 32,
                                                                                   False)
    got = np.asarray([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got, reference["test-dinov2-tiny"][[1, 3]], rtol=1e-5, atol=1e-5)


def test_bad_images_are_reported_per_item_and_good_ones_kept(client, reference):
    files = [("a.jpg", BYTES[2]), ("bad.jpg", b"GIF89a-not-really"), ("b.png", BYTES[9]),
             ("huge.png", png(2000, 1500))]
    status, _, body = post_files(client, "/v1/embeddings?model=test-dinov2-tiny", files)
    assert status == 200 and (body["embedded"], body["failed"]) == (2, 2)
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert body["data"][1] == {"index": 1, "embedding": None, "error": {
        "kind": "decode", "message": decode_error(b"GIF89a-not-really", "image 1 ('bad.jpg')")}}
    assert body["data"][3]["error"] == {"kind": "too_large", "message": "image 3 ('huge.png'): 2000x1500 = 3000000 "
                                        "pixels is over the server limit max_pixels=2500000"}
    good = np.asarray([body["data"][i]["embedding"] for i in (0, 2)], np.float32)
    np.testing.assert_allclose(good, reference["test-dinov2-tiny"][[2, 9]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("files, code, kind, message", [
    ([("cat.jpg", b"\xff\xd8\xff\xe0 truncated")], 400, "decode",
     decode_error(b"\xff\xd8\xff\xe0 truncated", "image 0 ('cat.jpg')")),
    ([("x.bin", b"")], 400, "decode", "image 0 ('x.bin'): empty input (0 bytes), not an image"),
    ([("big.png", png(2000, 1500))], 413, "too_large", "2000x1500 = 3000000 pixels is over the server limit"),
    ([("a.png", b"zz"), ("b.png", png(2000, 1500))], 400, "decode", "none of the 2 images could be embedded"),
    ([(f"{i}.png", png(4, 4)) for i in range(17)], 413, "too_large", "17 images in one request is over the limit "
                                                                     "of max_images=16"),
])
def test_requests_without_any_good_image_fail_as_a_whole(client, files, code, kind, message):
    status, _, body = post_files(client, "/v1/embeddings?model=test-clip-tiny", files)
    assert (status, body["error"]) == (code, kind)
    assert message in body["message"]


def test_unknown_model_is_404_listing_the_served_models(client):
    status, _, body = post_files(client, "/v1/embeddings?model=resnet9000", [("a.jpg", BYTES[0])])
    assert status == 404
    assert body == {"error": "unknown_model", "models": ["test-clip-tiny", "test-dinov2-tiny"],
                    "message": "model 'resnet9000' is not served; served models: ['test-clip-tiny', "
                               "'test-dinov2-tiny']"}
    status, _, body = post_json(client, "/v1/embeddings", {"model": "m" * 1_000_000, "images": ["AAAA"]})
    assert status == 404 and len(body["message"]) < 400  # a long name is not echoed back in full
    assert body["message"].startswith(f"model {'m' * 200!r}... (1000000 characters) is not served")


def test_model_must_be_named_when_several_are_served(client):
    status, _, body = post_json(client, "/v1/embeddings", {"images": [base64.b64encode(BYTES[0]).decode()]})
    assert (status, body["error"], body["models"]) == (400, "bad_request", ["test-clip-tiny", "test-dinov2-tiny"])
    status, _, body = post_json(client, "/v1/embeddings?model=test-clip-tiny",
                                {"model": "test-dinov2-tiny", "images": ["AAAA"]})
    assert (status, body["message"]) == (400, "two different models named: query 'test-clip-tiny', body "
                                               "'test-dinov2-tiny'")


@pytest.mark.parametrize("payload, problem", [
    ({"images": []}, "images: List should have at least 1 item"),
    ({"model": "test-clip-tiny", "images": "abc"}, "images: Input should be a valid array"),
    ({"model": "test-clip-tiny", "images": ["AAAA"], "extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_malformed_json_is_400_naming_the_field(client, payload, problem):
    status, _, body = post_json(client, "/v1/embeddings?model=test-clip-tiny", payload)
    assert (status, body["error"]) == (400, "bad_request")
    assert problem in body["message"]


def test_unsupported_content_type_is_415(client):
    status, _, body = client.request("POST", "/v1/embeddings?model=test-clip-tiny", b"x",
                                     {"Content-Type": "image/jpeg"})
    assert status == 415 and "Content-Type 'image/jpeg' is not supported" in json.loads(body)["message"]


def test_body_limit_is_413_with_and_without_content_length(server):
    limit = 2 * 1024 * 1024
    body, ctype = encode_multipart([("big.bin", b"\0" * (limit + 10))])
    with EmbeddingClient(server.url) as c:
        status, _, data = c.request("POST", "/v1/embeddings?model=test-clip-tiny", body, {"Content-Type": ctype})
    assert status == 413 and json.loads(data)["message"] == (f"request body of {len(body)} bytes is over the limit "
                                                             f"of max_body_bytes={limit}")
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # chunked: no Content-Length
    conn.request("POST", "/v1/embeddings?model=test-clip-tiny", body=chunks, headers={"Content-Type": ctype},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["message"].startswith(f"request body is over the limit of max_body_bytes={limit}")
    conn.close()


def test_concurrent_clients_each_get_their_own_vectors(server, reference):
    def one(i: int) -> np.ndarray:
        with EmbeddingClient(server.url, timeout=30) as c:
            return c.embed([BYTES[i % len(BYTES)]], model="test-dinov2-tiny")[0]

    with ThreadPoolExecutor(12) as pool:
        got = np.stack(list(pool.map(one, range(48))))
    want = reference["test-dinov2-tiny"][[i % len(BYTES) for i in range(48)]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_metrics_count_requests_errors_images_and_batches(client):
    before = scrape(client)
    client.embed([BYTES[0], BYTES[1]], model="test-dinov2-tiny")
    post_files(client, "/v1/embeddings?model=test-dinov2-tiny", [("a.jpg", BYTES[0]), ("bad", b"x")])
    post_files(client, "/v1/embeddings?model=test-dinov2-tiny", [("bad", b"x")])
    after = scrape(client)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    m = "test-dinov2-tiny"
    assert delta("imgembed_requests_total", model=m, code="200") == 2
    assert delta("imgembed_requests_total", model=m, code="400") == 1
    assert delta("imgembed_errors_total", model=m, kind="decode") == 1
    assert delta("imgembed_images_total", model=m, outcome="ok") == 3
    assert delta("imgembed_images_total", model=m, outcome="error") == 2
    assert delta("imgembed_batch_size_sum", model=m) == 3
    assert delta("imgembed_request_latency_seconds_count", model=m) == 3
    assert metric(after, "imgembed_queue_depth", model=m) == 0
    assert metric(after, "imgembed_ready") == 1


def test_openapi_documents_every_route_and_error(client):
    status, _, body = client.request("GET", "/openapi.json")
    spec = json.loads(body)
    assert status == 200
    assert set(spec["paths"]) == {"/v1/embeddings", "/v1/models", "/healthz", "/readyz", "/metrics"}
    post = spec["paths"]["/v1/embeddings"]["post"]
    assert {"200", "400", "404", "413", "415", "429", "503", "504"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["429"]["headers"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert post["requestBody"]["content"]["application/json"]["schema"]["properties"]["images"]["maxItems"] == 16


# --------------------------------------------------------------------- bounded queue, timeout, draining
def post_in_background(url: str, images: list[bytes], model: str | None = None):
    """Start one upload in a thread; returns a future of (status, headers, body)."""
    pool = ThreadPoolExecutor(1)

    def post():
        with EmbeddingClient(url, timeout=60) as c:
            return c.post_images(images, model)

    future = pool.submit(post)
    pool.shutdown(wait=False)
    return future


def wait_for_queue_depth(url: str, model: str, depth: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with EmbeddingClient(url) as c:
        while metric(scrape(c), "imgembed_queue_depth", model=model) < depth:
            assert time.monotonic() < deadline, f"queue depth of {model} never reached {depth}"
            time.sleep(0.02)


def test_requests_wait_for_a_batch_and_overflow_is_429(artifacts, reference):
    # Four single-image requests fill the queue (max_queue=4) while they wait for a fuller batch (2 s):
    # a fifth request is rejected at once with 429; the four are then answered by ONE batch of four.
    with ServerProcess([artifacts["test-dinov2-tiny"]], "--max-batch", "8", "--max-delay-ms", "2000",
                       "--max-queue", "4", "--max-images", "4", "--retry-after", "2") as s:
        futures = [post_in_background(s.url, [BYTES[i]]) for i in range(4)]
        wait_for_queue_depth(s.url, "test-dinov2-tiny", 4)
        with EmbeddingClient(s.url) as c:
            status, headers, body = c.post_images([BYTES[4]])
            assert (status, headers["retry-after"], json.loads(body)["error"]) == (429, "2", "queue_full")
            assert "queue full (4 of 4 images pending" in json.loads(body)["message"]
            results = [f.result(30) for f in futures]
            text = scrape(c)
    assert [r[0] for r in results] == [200] * 4
    got = np.asarray([json.loads(r[2])["data"][0]["embedding"] for r in results], np.float32)
    np.testing.assert_allclose(got, reference["test-dinov2-tiny"][:4], rtol=1e-5, atol=1e-5)
    assert metric(text, "imgembed_batch_size_count", model="test-dinov2-tiny") == 1
    assert metric(text, "imgembed_batch_size_sum", model="test-dinov2-tiny") == 4
    assert metric(text, "imgembed_errors_total", model="test-dinov2-tiny", kind="queue_full") == 1
    assert metric(text, "imgembed_queue_depth", model="test-dinov2-tiny") == 0


def test_request_timeout_is_504_and_frees_the_queue(artifacts):
    with ServerProcess([artifacts["test-clip-tiny"]], "--max-batch", "8", "--max-delay-ms", "3000",
                       "--timeout", "0.3") as s, EmbeddingClient(s.url) as c:
        t0 = time.monotonic()
        status, _, body = c.post_images([BYTES[0]])
        elapsed = time.monotonic() - t0
        text = scrape(c)
    assert (status, json.loads(body)["error"]) == (504, "timeout")
    assert json.loads(body)["message"].startswith("request not finished within timeout_s=0.3 s (model test-clip-tiny)")
    assert 0.29 <= elapsed < 2.5, elapsed
    assert metric(text, "imgembed_errors_total", model="test-clip-tiny", kind="timeout") == 1
    assert metric(text, "imgembed_queue_depth", model="test-clip-tiny") == 0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(artifacts, reference):
    s = ServerProcess([artifacts["test-dinov2-tiny"]], "--max-batch", "8", "--max-delay-ms", "2500",
                      "--drain-timeout", "20").start()
    try:
        in_flight = [post_in_background(s.url, [BYTES[i]]) for i in (5, 6)]
        wait_for_queue_depth(s.url, "test-dinov2-tiny", 2)
        s.signal()  # SIGTERM while both wait for their batch
        with EmbeddingClient(s.url) as c:
            status, headers, body = c.post_images([BYTES[7]])
            ready = c.request("GET", "/readyz")
        assert (status, json.loads(body)["error"], headers["retry-after"]) == (503, "unavailable", "1")
        assert json.loads(body)["message"] == "server is shutting down and accepts no new requests"
        assert (ready[0], json.loads(ready[2])["status"]) == (503, "draining")
        results = [f.result(30) for f in in_flight]
        assert [r[0] for r in results] == [200, 200]
        got = np.asarray([json.loads(r[2])["data"][0]["embedding"] for r in results], np.float32)
        np.testing.assert_allclose(got, reference["test-dinov2-tiny"][[5, 6]], rtol=1e-5, atol=1e-5)
        assert s.wait(20) == 0, s.log()[-2000:]
    finally:
        s.stop()


def test_batch_invariant_serving_gives_the_offline_batch_of_one_vectors(artifacts, tmp_path):
    # The default (static) INT8 engine gives an image the same vector whatever its batch-mates ...
    static = imgembed.load(artifacts["test-clip-tiny"])
    np.testing.assert_array_equal(static.embed(BYTES, batch_size=1), static.embed(BYTES, batch_size=16))
    # ... the opt-in dynamic INT8 quantizes activations per batch, so batch composition matters offline ...
    dynamic = export_model("test-clip-tiny", tmp_path / "dynamic", ExportOptions(
        precision="int8", int8_preset="dynamic", random_init=True, speed_check=False)).path
    offline = imgembed.load(dynamic)
    alone, batched = offline.embed(BYTES, batch_size=1), offline.embed(BYTES, batch_size=16)
    assert np.abs(alone - batched).max() > 1e-4
    # ... and --batch-invariant serves exactly the batch-of-one vectors, even for concurrent requests.
    with ServerProcess([dynamic], "--max-batch", "8", "--max-delay-ms", "20",
                       "--batch-invariant") as s:
        def one(i: int) -> np.ndarray:
            with EmbeddingClient(s.url, timeout=30) as c:
                return c.embed([BYTES[i]])[0]

        with ThreadPoolExecutor(8) as pool:
            got = np.stack(list(pool.map(one, range(len(BYTES)))))
        with EmbeddingClient(s.url) as c:
            batches = metric(scrape(c), "imgembed_batch_size_count", model="test-clip-tiny")
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6)
    assert batches < len(BYTES)  # requests were still grouped into batches


def test_uint8_input_artifact_is_served_with_uint8_crops(tmp_path):
    """A uint8-input artifact warms up and serves (crops, not float pixels) the offline runtime's vectors."""
    path = export_model("test-dinov2-tiny", tmp_path / "u8", ExportOptions(
        random_init=True, speed_check=False, input_format="uint8")).path
    offline = imgembed.load(path)
    assert offline.input_format == "uint8"
    expected = offline.embed(BYTES[:3])
    with ServerProcess([path], "--max-batch", "4") as s, EmbeddingClient(s.url, timeout=30) as c:
        got = c.embed(BYTES[:3])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)
