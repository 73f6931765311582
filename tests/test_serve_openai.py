"""``imgembed serve`` speaking OpenAI's embeddings protocol (checked with the real ``openai`` client), and
its access control: API keys and TLS.

Servers are child processes on 127.0.0.1; vectors are compared with the offline runtime.
"""
from __future__ import annotations

import base64
import datetime
import http.client
import io
import ipaddress
import ssl

import numpy as np
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

import imgembed
from imgembed.gate.samples import parity_images
from imgembed.serve.client import EmbeddingClient
from imgembed.serve.testing import ServerProcess

from .helpers import post_json

pytestmark = pytest.mark.timeout(240)
KEY = "test-key-0123456789abcdef"
TEXTS = ["a photo of a cat", "a red bicycle", "astronaut riding a horse"]


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


PHOTOS = [jpeg(img) for _, img in parity_images()[:4]]
DATA_URLS = ["data:image/jpeg;base64," + base64.b64encode(p).decode() for p in PHOTOS]


@pytest.fixture(scope="module")
def artifact(text_artifact):
    return text_artifact("test-clip-tiny")


@pytest.fixture(scope="module")
def offline(artifact):
    emb = imgembed.load(artifact)
    return {"images": emb.embed(PHOTOS), "texts": emb.embed_text(TEXTS)}


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# accepted keys\n{KEY}\n")
    with ServerProcess([artifact], "--api-key-file", str(keys), "--max-batch", "4") as s:
        yield s


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


# ----------------------------------------------------------------------------------- OpenAI protocol
def test_openai_client_embeds_texts_equal_to_the_offline_text_tower(oai, offline):
    for encoding in ("float", "base64"):
        answer = oai.embeddings.create(model="test-clip-tiny", input=TEXTS, encoding_format=encoding)
        if encoding == "base64":  # asked for explicitly, the SDK hands the strings over as they came
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in answer.data])
        else:
            got = np.array([d.embedding for d in answer.data], dtype=np.float32)
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == "test-clip-tiny"
        np.testing.assert_allclose(got, offline["texts"], rtol=0, atol=1e-6)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(TEXTS)


def test_openai_client_default_request_is_base64_and_decodes_to_the_same_vectors(oai, offline):
    answer = oai.embeddings.create(model="test-clip-tiny", input=TEXTS[0])  # the SDK asks for base64
    np.testing.assert_array_equal(np.array(answer.data[0].embedding, np.float32), offline["texts"][0])


def test_openai_client_embeds_images_sent_as_data_urls(oai, offline):
    answer = oai.embeddings.create(model="test-clip-tiny", input=DATA_URLS, encoding_format="float")
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    np.testing.assert_allclose(got, offline["images"], rtol=0, atol=1e-5)
    assert answer.usage.prompt_tokens == 0


def test_base64_embeddings_are_little_endian_float32(server, offline):
    with EmbeddingClient(server.url, api_key=KEY) as c:
        status, _, body = post_json(c, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64",
                                                          "model": "test-clip-tiny"})
    assert status == 200 and body["object"] == "list"
    assert [d["object"] for d in body["data"]] == ["embedding"] * 3
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    np.testing.assert_array_equal(np.stack(rows), offline["texts"])


@pytest.mark.parametrize("payload, status, kind, message", [
    ({"input": ["a cat"], "dimensions": 7}, 400, "dimensions_unsupported",
     "dimensions=7 is not supported by model 'test-clip-tiny': its vectors have"),
    ({"input": ["a cat", DATA_URLS[0][:80]]}, 400, "bad_request", "'input' mixes images"),
    ({"input": []}, 400, "bad_request", "'input' is an empty list"),
    ({"input": ["a cat"], "texts": ["a dog"]}, 400, "bad_request", "not texts and input"),
    ({"texts": ["a dog"], "encoding_format": "base64"}, 400, "bad_request", "encoding_format and dimensions belong"),
    ({"input": ["data:image/png;base64,AAAA", DATA_URLS[0]]}, 400, "decode",
     "1 of the 2 images could not be embedded (OpenAI's response shape has no per-item errors"),
])
def test_openai_body_errors_are_typed(server, payload, status, kind, message):
    """Errors of a request in OpenAI's body shape come in OpenAI's error shape; the native body keeps its own."""
    with EmbeddingClient(server.url, api_key=KEY) as c:
        got, _, body = post_json(c, "/v1/embeddings", payload)
    if "input" in payload:
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
        body = {"error": body["error"]["code"], "message": body["error"]["message"], "type": body["error"]["type"]}
        assert body["type"] == body["error"]
    assert (got, body["error"]) == (status, kind), body
    assert message in body["message"]


def test_openai_client_sees_a_typed_error_for_unsupported_dimensions(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model="test-clip-tiny", input="a cat", dimensions=3)
    assert err.value.status_code == 400 and err.value.code == "dimensions_unsupported"
    assert "dimensions=3 is not supported by model 'test-clip-tiny'" in str(err.value)  # the SDK shows the message
    with pytest.raises(openai.NotFoundError) as err:
        oai.embeddings.create(model="nope", input="a cat")
    assert err.value.code == "unknown_model" and "model 'nope' is not served" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model="test-clip-tiny", input=[])
    assert err.value.code == "bad_request" and "'input' is an empty list" in str(err.value)


def test_the_native_body_keeps_working_next_to_openais(server, offline):
    with EmbeddingClient(server.url, api_key=KEY) as c:
        np.testing.assert_allclose(c.embed_texts(TEXTS), offline["texts"], rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- API keys
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789abc"},
                                     {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}])
def test_requests_without_a_valid_key_get_401(server, headers):
    with EmbeddingClient(server.url) as c:
        for method, path in (("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/openapi.json")):
            status, got_headers, body = c.request(method, path, b'{"input": ["a"]}', {**headers,
                                                  "Content-Type": "application/json"})
            assert status == 401 and b'"error": "unauthorized"' in body, (path, status)
            assert got_headers["www-authenticate"] == "Bearer"
        assert c.request("GET", "/healthz", None, headers)[0] == 200  # health stays open by default
        assert c.request("GET", "/readyz", None, headers)[0] == 200


def test_x_api_key_header_is_accepted(server):
    with EmbeddingClient(server.url) as c:
        assert c.request("GET", "/v1/models", None, {"X-API-Key": KEY})[0] == 200


def test_openai_client_with_a_wrong_key_gets_authentication_error(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-0123456789", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.embeddings.create(model="test-clip-tiny", input="a cat")


# ------------------------------------------------------------------------------------------------- TLS
def self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_with_a_key_from_the_environment_and_protected_health(artifact, offline, tmp_path):
    cert, key = self_signed(tmp_path)
    trusted = ssl.create_default_context(cafile=cert)
    with ServerProcess([artifact], "--ssl-certfile", cert, "--ssl-keyfile", key, "--auth-health",
                       env={"IMGEMBED_API_KEY": KEY}, ssl_context=trusted, api_key=KEY, ready_timeout=90) as server:
        assert server.url.startswith("https://127.0.0.1:")
        with EmbeddingClient(server.url, ssl_context=trusted) as c:
            assert c.request("GET", "/healthz")[0] == 401
        with EmbeddingClient(server.url, api_key=KEY, ssl_context=trusted) as c:
            np.testing.assert_allclose(c.embed_texts(TEXTS), offline["texts"], rtol=0, atol=1e-6)
        with EmbeddingClient(server.url, api_key=KEY, ssl_context=ssl.create_default_context()) as c:
            with pytest.raises(ssl.SSLCertVerificationError):  # an untrusted certificate is refused
                c.request("GET", "/healthz")
        with EmbeddingClient(server.url.replace("https", "http"), api_key=KEY) as c:  # plain HTTP gets nothing
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                c.request("GET", "/healthz")
