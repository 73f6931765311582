"""Serving limits and knobs, validated once, shared by the CLI, the app and the batcher.

Every limit is a plain number with a safe default, so a server is bounded even when started with no
options: queue depth, request time, body bytes, images per request, pixels per image, and for text towers
texts per request, characters per text and the text queue depth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from imgembed.errors import ImgembedError


class ServeConfigError(ImgembedError, ValueError):
    """A serving option is out of range (the message names the option, the value and the valid range)."""


@dataclass(frozen=True)
class ServeConfig:
    """Limits and knobs of one server. All sizes are per model unless stated otherwise."""

    host: str = "127.0.0.1"              # loopback by default; bind 0.0.0.0 explicitly to expose it
    port: int = 8080                     # 0 = any free port (printed once bound)
    max_batch: int = 16                  # images per inference call
    max_delay_ms: float = 5.0            # how long the oldest queued image may wait for a fuller batch
    max_queue: int = 256                 # images admitted per model (decoding + queued + running) -> 429
    timeout_s: float = 30.0              # whole request (decode + queue + inference) -> 504
    max_body_bytes: int = 32 * 1024 * 1024   # request body -> 413
    max_images: int = 64                 # images per request -> 413
    max_pixels: int = 40_000_000         # declared width x height per image -> 413 for that image
    max_request_pixels: int = 160_000_000    # declared pixels of all images of one request -> 413 (header only)
    max_decode_pixels: int = 48_000_000  # declared pixels being decoded at once, whole server (decodes beyond
                                         # wait), weighted by format (uploads.Declared): decoding memory ~ 6
                                         # bytes x this (~275 MiB); an image needing more alone is refused
    draft_ratio: float = 0.0             # an image whose short edge is >= this x the model's resize target is
                                         # decoded at reduced scale (JPEG DCT draft, PIL reduce); 0: never, so
                                         # vectors equal the offline runtime's (exact decoding)
    threads: int | None = None           # inference threads per model (None: the engine's default)
    backend: str = "auto"                # engine of each artifact: auto or a backend name (runtime.backends)
    device: str = "cpu"                  # cpu | cuda
    decode_workers: int = 2              # threads decoding + preprocessing uploads
    retry_after_s: int = 1               # Retry-After header of 429 and 503 answers
    drain_timeout_s: float = 30.0        # graceful shutdown: how long in-flight requests may take
    max_connections: int = 1024          # open connections; beyond it the oldest one still waiting for its
                                         # request head is closed (or, if none, the new one)
    header_timeout_s: float = 10.0       # a connection must send a complete request head within this
    keep_alive_s: float = 5.0            # idle keep-alive connections are closed after this
    # accepted API keys (Authorization: Bearer KEY or X-API-Key); empty: no authentication
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    auth_health: bool = False            # also require a key for /healthz and /readyz (metrics always need one)
    ssl_certfile: str | None = None      # TLS certificate (PEM); with ssl_keyfile, serve https
    ssl_keyfile: str | None = None
    max_wait_s: float | None = None      # 429 when the pending images would take longer than this to decode
                                         # and infer (measured speed); None: 0.8 x timeout_s
    batch_invariant: bool = False        # dynamic-INT8 artifacts (which quantize per batch): run each image
                                         # alone, so a vector never depends on the other images of a batch
    max_texts: int = 256                 # texts per request -> 413
    max_text_chars: int = 2000           # characters per text -> 413 (tokens past the model's max_length are
                                         # truncated, as the runtime does)
    max_text_queue: int = 1024           # texts admitted per model (queued + running) -> 429; texts are far
                                         # cheaper than images, so they have their own queue

    def __post_init__(self) -> None:
        _check_int("port", self.port, 0, 65535)
        for name, low in (("max_batch", 1), ("max_queue", 1), ("max_body_bytes", 1024), ("max_images", 1),
                          ("max_pixels", 1), ("max_request_pixels", 1),
                          ("max_decode_pixels", 1), ("decode_workers", 1), ("retry_after_s", 0),
                          ("max_connections", 1), ("max_texts", 1), ("max_text_chars", 1),
                          ("max_text_queue", 1)):
            _check_int(name, getattr(self, name), low, None)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, None)
        for name, low in (("max_delay_ms", 0.0), ("timeout_s", 0.001), ("drain_timeout_s", 0.0), ("draft_ratio", 0.0),
                          ("header_timeout_s", 0.001), ("keep_alive_s", 0.001)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ServeConfigError(f"{name}={value!r}: expected a number >= {low}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ServeConfigError("ssl_certfile and ssl_keyfile go together: give both (PEM files) or neither")
        if any(not isinstance(k, str) or len(k) < 16 for k in self.api_keys):
            raise ServeConfigError("api_keys: every key must be a string of at least 16 characters")
        if self.max_wait_s is not None and not (isinstance(self.max_wait_s, (int, float)) and self.max_wait_s > 0):
            raise ServeConfigError(f"max_wait_s={self.max_wait_s!r}: expected a number > 0 (or None: 0.8 x timeout_s)")
        if self.max_queue < self.max_images:
            raise ServeConfigError(f"max_queue={self.max_queue} is smaller than max_images={self.max_images}: "
                                   "a full-size request could never be admitted; raise max_queue")
        for name in ("max_request_pixels", "max_decode_pixels"):
            if getattr(self, name) < self.max_pixels:
                raise ServeConfigError(f"{name}={getattr(self, name)} is smaller than max_pixels={self.max_pixels}: "
                                       f"an image within max_pixels could never be decoded; raise {name}")
        if self.max_text_queue < self.max_texts:
            raise ServeConfigError(f"max_text_queue={self.max_text_queue} is smaller than max_texts={self.max_texts}: "
                                   "a full-size text request could never be admitted; raise max_text_queue")

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    @property
    def admission_wait_s(self) -> float:
        """Estimated queueing time above which a request is refused with 429."""
        return self.max_wait_s if self.max_wait_s is not None else 0.8 * self.timeout_s

    def to_dict(self) -> dict:
        """The options, API keys redacted."""
        return {**asdict(self), "api_keys": ["***"] * len(self.api_keys)}


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    """Raise ServeConfigError unless ``low <= value <= high`` for an int (bools rejected)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ServeConfigError(f"{name}={value!r}: expected an integer {bound}")
