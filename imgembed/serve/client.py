"""A small Python client for ``imgembed serve`` (standard library only: one keep-alive connection).

    from imgembed.serve.client import EmbeddingClient
    with EmbeddingClient("http://127.0.0.1:8080") as client:
        vectors = client.embed(["cat.jpg", jpeg_bytes], model="clip-vit-b32")     # float32 (N, dim)
        result = client.embed(paths, on_error="report")   # Embeddings: good vectors + per-image errors
        texts = client.embed_texts(["a red bicycle"], model="clip-vit-b32")      # models with a text tower

A client is not thread-safe: use one per thread. Errors answered by the server raise
:class:`ServerResponseError` carrying the status, kind, message and Retry-After.
"""
from __future__ import annotations

import http.client
import json
import os
import ssl
import uuid
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote, urlsplit

import numpy as np

from imgembed.errors import ImgembedError
from imgembed.runtime.results import Embeddings


class ServerResponseError(ImgembedError):
    """The server answered with an error status (the message is the server's)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status} ({kind}): {message}")
        self.status, self.kind, self.retry_after = status, kind, retry_after


def encode_multipart(images: Sequence[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload with one ``image`` part per (filename, bytes)."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, value in (fields or {}).items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in images:
        safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe}"\r\n'
                      f"Content-Type: application/octet-stream\r\n\r\n".encode())
        chunks += [data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _as_upload(item: Any, index: int) -> tuple[str, bytes]:
    """(filename, bytes) of a path or encoded bytes."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"image-{index}", bytes(item)
    if isinstance(item, (str, os.PathLike)):
        return Path(item).name, Path(item).read_bytes()
    raise TypeError(f"item {index}: expected a path or encoded image bytes, got {type(item).__name__}")


def _answer(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The JSON payload of a 200 answer; ServerResponseError (status, kind, message, Retry-After) otherwise."""
    payload = json.loads(body)
    if status != 200:
        retry = headers.get("retry-after")
        raise ServerResponseError(status, payload.get("error", "?"), payload.get("message", body[:200]),
                                  float(retry) if retry else None)
    return payload


class EmbeddingClient:
    """Talks to one server over one keep-alive HTTP/1.1 connection."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", timeout: float = 60.0, *, api_key: str | None = None,
                 ssl_context: "ssl.SSLContext | None" = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {base_url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.https = parts.scheme == "https"
        self.host, self.port, self.timeout = parts.hostname, parts.port or (443 if self.https else 80), timeout
        self.ssl_context = ssl_context
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "EmbeddingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; the connection is reopened after a failure."""
        if self._conn is None:
            self._conn = (http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                      context=self.ssl_context) if self.https else
                          http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))
        try:
            self._conn.request(method, path, body=body, headers={**self._auth, **(headers or {})})
            resp = self._conn.getresponse()
            data = resp.read()
        except Exception:
            self.close()
            raise
        if resp.getheader("connection", "").lower() == "close":
            self.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def post_images(self, images: Sequence[Any], model: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """POST the images as a multipart upload; the raw (status, headers, body)."""
        body, ctype = encode_multipart([_as_upload(item, i) for i, item in enumerate(images)])
        path = "/v1/embeddings" + (f"?model={quote(model)}" if model else "")
        return self.request("POST", path, body, {"Content-Type": ctype})

    def post_json(self, path: str, payload: Any) -> tuple[int, dict[str, str], bytes]:
        """POST ``payload`` as a JSON body to ``path``; the raw (status, headers, body)."""
        return self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def post_texts(self, texts: Sequence[str], model: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """POST texts as a JSON body; the raw (status, headers, body)."""
        payload: dict[str, Any] = {"texts": list(texts)}
        if model:
            payload["model"] = model
        return self.post_json("/v1/embeddings", payload)

    def embed_texts(self, texts: Sequence[str], model: str | None = None) -> np.ndarray:
        """Embed texts with the model's text tower: float32 (N, dim) in the image space."""
        payload = _answer(*self.post_texts(texts, model))
        return np.asarray([d["embedding"] for d in payload["data"]], np.float32).reshape(len(texts), payload["dim"])

    def embed(self, images: Sequence[Any], model: str | None = None, on_error: str = "raise"):
        """Embed images (paths or encoded bytes): float32 (N, dim), or Embeddings with ``on_error="report"``.

        With ``on_error="raise"`` an image the server could not embed raises ServerResponseError.
        """
        payload = _answer(*self.post_images(images, model))
        rows = [item for item in payload["data"] if item["embedding"] is not None]
        errors = [(item["index"], item["error"]["message"]) for item in payload["data"] if item["error"]]
        vectors = np.asarray([r["embedding"] for r in rows], np.float32).reshape(len(rows), payload["dim"])
        if on_error == "raise":
            if errors:
                raise ServerResponseError(200, "decode", errors[0][1])
            return vectors
        return Embeddings([r["index"] for r in rows], vectors, errors)

    def models(self) -> list[dict]:
        status, _, body = self.request("GET", "/v1/models")
        return json.loads(body)["models"]

    def ready(self) -> bool:
        """True once /readyz answers 200 (False on 503 or when the server cannot be reached)."""
        try:
            return self.request("GET", "/readyz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False
