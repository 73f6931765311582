"""API keys: an ASGI middleware that answers 401 unless a request carries one of the server's keys.

A key is read from ``Authorization: Bearer KEY`` (what the OpenAI SDK sends) or ``X-API-Key: KEY`` and
compared with :func:`hmac.compare_digest` against every configured key (no early exit on the first match, so
the time taken does not depend on which key matched). ``/healthz`` and ``/readyz`` stay open unless
``auth_health`` is set; everything else (embeddings, models, metrics, the OpenAPI docs) needs a key. Keys come
from ``--api-key``, ``--api-key-file`` (one key per line) or the ``IMGEMBED_API_KEY`` environment variable.
"""
from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Sequence

from imgembed.serve.config import ServeConfigError

KEY_ENV = "IMGEMBED_API_KEY"
HEALTH_PATHS = ("/healthz", "/readyz")
_UNAUTHORIZED = json.dumps({"error": "unauthorized", "message": "missing or invalid API key: send "
                            "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}).encode()


def read_keys(keys: Sequence[str] = (), key_file: str | os.PathLike | None = None,
              environ: dict | None = None) -> tuple[str, ...]:
    """The API keys from the command line, a key file (one per line, ``#`` comments) and ``IMGEMBED_API_KEY``."""
    out = [k.strip() for k in keys]
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ServeConfigError(f"api key file {str(path)!r}: cannot read it ({e})") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ServeConfigError(f"api key file {str(path)!r} holds no key (one key per line)")
        out += found
    env = (os.environ if environ is None else environ).get(KEY_ENV, "").strip()
    if env:
        out.append(env)
    return tuple(dict.fromkeys(out))


def _presented(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
        if name == b"x-api-key":
            return value.strip()
    return None


def key_matches(presented: bytes | None, keys: Sequence[bytes]) -> bool:
    """Constant-time check of ``presented`` against every key."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented or b"", key)
    return ok and presented is not None


class ApiKeyMiddleware:
    """401 for HTTP requests without a valid key (health endpoints open unless ``protect_health``)."""

    def __init__(self, app, keys: Sequence[str], protect_health: bool = False):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = () if protect_health else HEALTH_PATHS

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths or \
                key_matches(_presented(scope["headers"]), self.keys):
            return await self.app(scope, receive, send)
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(_UNAUTHORIZED)).encode())]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
