"""``imgembed serve`` with text towers: texts in JSON bodies, their limits and errors, and /v1/models towers.

Servers are child processes on 127.0.0.1 (:class:`~imgembed.serve.testing.ServerProcess`); text vectors are
compared with the offline runtime (``imgembed.load(artifact).embed_text``).
"""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import imgembed
from imgembed.bench.suite import write_sample_files
from imgembed.serve.client import EmbeddingClient, ServerResponseError
from imgembed.serve.config import ServeConfig, ServeConfigError
from imgembed.serve.testing import ServerProcess
from imgembed.text.scoring import rank

from .helpers import post_json

pytestmark = pytest.mark.timeout(300)

CAPTIONS = ["a photo of a cat", "a red bicycle leaning on a wall", "", "astronaut", "coffee", "two dogs playing",
            "a very long caption " * 40, "camera", "rocket launch at night", "a bowl of fruit", "x", "horse"]


@pytest.fixture(scope="module")
def artifacts(text_artifact, artifact_dir):
    return {"test-clip-tiny": text_artifact("test-clip-tiny"), "test-siglip-tiny": text_artifact("test-siglip-tiny"),
            "test-dinov2-tiny": artifact_dir("test-dinov2-tiny")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return [p.read_bytes() for p in write_sample_files(tmp_path_factory.mktemp("photos"))]


@pytest.fixture(scope="module")
def offline(artifacts, photos):
    """Offline text vectors of CAPTIONS (text models) and image vectors of the photos (every model)."""
    out = {}
    for name, path in artifacts.items():
        emb = imgembed.load(path)
        out[name] = {"images": emb.embed(photos),
                     "texts": emb.embed_text(CAPTIONS) if "text" in emb.towers else None}
    return out


@pytest.fixture(scope="module")
def server(artifacts):
    with ServerProcess(list(artifacts.values()), "--max-batch", "4", "--max-delay-ms", "5", "--max-texts", "16",
                       "--max-text-chars", "1000", "--timeout", "30") as s:
        yield s


@pytest.fixture
def client(server):
    with EmbeddingClient(server.url, timeout=60) as c:
        yield c


def metric(client: EmbeddingClient, name: str, model: str) -> float:
    """One model's sample of a Prometheus metric (0 if absent)."""
    text = client.request("GET", "/metrics")[2].decode()
    for line in text.splitlines():
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if line.startswith(name + "{") and labels.get("model") == model:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ----------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("model", ["test-clip-tiny", "test-siglip-tiny"])
def test_served_text_vectors_equal_the_offline_text_tower_in_order(client, offline, model):
    status, _, body = post_json(client, "/v1/embeddings", {"model": model, "texts": CAPTIONS})
    assert status == 200
    want = offline[model]["texts"]
    assert (body["model"], body["tower"], body["precision"], body["dim"], body["normalized"]) == (
        model, "text", "fp32", want.shape[1], True)
    assert (body["embedded"], body["failed"]) == (len(CAPTIONS), 0)
    assert [d["index"] for d in body["data"]] == list(range(len(CAPTIONS)))
    assert all(d["error"] is None for d in body["data"])
    got = np.asarray([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_client_embed_texts_and_text_vectors_rank_the_images_like_offline(client, offline):
    got = client.embed_texts(CAPTIONS[:3], model="test-clip-tiny")
    np.testing.assert_allclose(got, offline["test-clip-tiny"]["texts"][:3], rtol=0, atol=1e-5)
    images = offline["test-clip-tiny"]["images"]
    want = rank(offline["test-clip-tiny"]["texts"][:3], images, 5).indices
    np.testing.assert_array_equal(rank(got, images, 5).indices, want)


def test_concurrent_text_and_image_requests_each_get_their_own_vectors(server, offline, photos):
    def one(i: int) -> tuple[str, int, np.ndarray]:
        model = ("test-clip-tiny", "test-siglip-tiny")[i % 2]
        with EmbeddingClient(server.url, timeout=60) as c:
            if i % 3 == 0:
                k = i % len(photos)
                return model, k, c.embed([photos[k]], model=model)[0]
            k = i % len(CAPTIONS)
            return model, -1 - k, c.embed_texts([CAPTIONS[k]], model=model)[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(36)))
    for model, k, vector in results:
        want = offline[model]["images"][k] if k >= 0 else offline[model]["texts"][-1 - k]
        np.testing.assert_allclose(vector, want, rtol=0, atol=1e-5)
    assert {k >= 0 for _, k, _ in results} == {True, False}


def test_image_requests_still_work_on_a_model_with_a_text_tower(client, offline, photos):
    got = client.embed(photos[:3], model="test-siglip-tiny")
    np.testing.assert_allclose(got, offline["test-siglip-tiny"]["images"][:3], rtol=0, atol=1e-5)
    status, _, body = client.post_images(photos[:1], model="test-siglip-tiny")
    assert (status, json.loads(body)["tower"]) == (200, "image")


# ---------------------------------------------------------------------------------------- model list
def test_models_list_their_towers_space_and_text_length(client, artifacts):
    models = {m["id"]: m for m in client.models()}
    clip, siglip, dino = models["test-clip-tiny"], models["test-siglip-tiny"], models["test-dinov2-tiny"]
    assert (clip["towers"], siglip["towers"], dino["towers"]) == (["image", "text"], ["image", "text"], ["image"])
    assert (clip["space"]["dim"], clip["space"]["scores"], clip["space"]["normalized"]) == (24, "softmax", True)
    assert (siglip["space"]["scores"], siglip["space"]["logit_bias"] is not None) == ("sigmoid", True)
    emb = imgembed.load(artifacts["test-clip-tiny"])
    assert clip["text"] == {"max_length": emb.text.tokenizer.max_length, "precision": "fp32",
                            "backend": "onnxruntime", "engine": emb.text.engine.id}
    assert (dino["space"], dino["text"]) == (None, None)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("payload, code, kind, message", [
    ({"model": "test-clip-tiny", "texts": ["a cat"], "images": ["AAAA"]}, 400, "bad_request",
     "a request carries one of images, texts or input, not images and texts"),
    ({"model": "test-clip-tiny", "texts": []}, 400, "bad_request", "texts: List should have at least 1 item"),
    ({"model": "test-clip-tiny", "texts": ["a cat", 3, "a dog"]}, 400, "bad_request",
     "texts.1: Input should be a valid string"),
    ({"model": "test-clip-tiny", "texts": None}, 400, "bad_request", "texts: Input should be a valid array"),
    ({"model": "test-clip-tiny", "texts": "a cat"}, 400, "bad_request", "texts: Input should be a valid array"),
    ({"model": "test-clip-tiny"}, 400, "bad_request", "none of 'images', 'texts' or 'input' given"),
    ({"model": "test-clip-tiny", "texts": ["t"] * 17}, 413, "too_large",
     "17 texts in one request is over the limit of max_texts=16; split the request"),
    ({"model": "test-clip-tiny", "texts": ["ok", "ok", "y" * 1001]}, 413, "too_large",
     "text 2 has 1001 characters, over the limit of max_text_chars=1000; shorten it"),
    ({"model": "test-dinov2-tiny", "texts": ["a cat"]}, 400, "no_text_tower",
     "model 'test-dinov2-tiny' has no text tower (towers: ['image']), so it cannot embed texts; export its "
     "artifact with `imgembed export test-dinov2-tiny --text` (CLIP and SigLIP models)"),
    ({"model": "nope", "texts": ["a cat"]}, 404, "unknown_model", "model 'nope' is not served"),
])
def test_bad_text_requests_are_typed_4xx(client, payload, code, kind, message):
    status, _, body = post_json(client, "/v1/embeddings", payload)
    assert (status, body["error"]) == (code, kind), body
    assert message in body["message"]


def test_text_errors_reach_the_client_as_server_response_errors(client):
    with pytest.raises(ServerResponseError) as err:
        client.embed_texts(["a cat"], model="test-dinov2-tiny")
    assert (err.value.status, err.value.kind) == (400, "no_text_tower")


def test_text_metrics_and_openapi(client):
    names = ("imgembed_texts_total", "imgembed_text_batch_size_sum")
    before = [metric(client, name, "test-clip-tiny") for name in names]
    client.embed_texts(CAPTIONS[:5], model="test-clip-tiny")
    after = [metric(client, name, "test-clip-tiny") for name in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [5, 5]
    assert metric(client, "imgembed_text_queue_depth", "test-clip-tiny") == 0
    spec = json.loads(client.request("GET", "/openapi.json")[2])
    schema = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    texts = schema["properties"]["texts"]
    assert (texts["maxItems"], texts["items"]["maxLength"]) == (16, 1000)
    assert schema["oneOf"] == [{"required": ["images"]}, {"required": ["texts"]}]


def test_text_queue_is_bounded_apart_from_the_image_queue(artifacts, offline, photos):
    # Four one-text requests fill the text queue (max_text_queue=4) while they wait for a fuller batch: a
    # fifth is refused with 429, an image request is still admitted, and the four are answered together.
    with ServerProcess([artifacts["test-clip-tiny"]], "--max-batch", "8", "--max-delay-ms", "2000",
                       "--max-text-queue", "4", "--max-texts", "4") as s:
        def text(i: int):
            with EmbeddingClient(s.url, timeout=60) as c:
                return c.post_texts([CAPTIONS[i]])

        def image():
            with EmbeddingClient(s.url, timeout=60) as c:
                return c.embed([photos[0]])

        with ThreadPoolExecutor(5) as pool, EmbeddingClient(s.url) as c:
            futures = [pool.submit(text, i) for i in range(4)]
            deadline = time.monotonic() + 10
            while metric(c, "imgembed_text_queue_depth", "test-clip-tiny") < 4:
                assert time.monotonic() < deadline, "the text queue never filled"
                time.sleep(0.02)
            status, headers, body = c.post_texts([CAPTIONS[5]])
            assert (status, json.loads(body)["error"], headers["retry-after"]) == (429, "queue_full", "1")
            assert "queue full (4 of 4 texts pending, this request has 1)" in json.loads(body)["message"]
            vector = pool.submit(image).result(30)[0]
            results = [f.result(30) for f in futures]
            text_batches = metric(c, "imgembed_text_batch_size_count", "test-clip-tiny")
    np.testing.assert_allclose(vector, offline["test-clip-tiny"]["images"][0], rtol=0, atol=1e-5)
    assert [r[0] for r in results] == [200] * 4
    got = np.asarray([json.loads(r[2])["data"][0]["embedding"] for r in results], np.float32)
    np.testing.assert_allclose(got, offline["test-clip-tiny"]["texts"][:4], rtol=0, atol=1e-5)
    assert text_batches == 1  # the four waiting texts went into one batch (warm-up bypasses the batcher)


# ------------------------------------------------------------------------------------------- config
def test_config_checks_the_text_limits():
    assert (ServeConfig().max_texts, ServeConfig().max_text_chars, ServeConfig().max_text_queue) == (256, 2000, 1024)
    with pytest.raises(ServeConfigError, match=r"max_text_queue=8 is smaller than max_texts=16"):
        ServeConfig(max_texts=16, max_text_queue=8)
    with pytest.raises(ServeConfigError, match=r"max_text_chars=0: expected an integer >= 1"):
        ServeConfig(max_text_chars=0)
