"""The ASGI app (FastAPI): embeddings, model list, health, readiness, Prometheus metrics.

``create_app(models, config)`` builds one app over already-loaded :class:`ServedModel` s. Its lifespan
starts one :class:`Batcher` per model (plus one for texts per model with a text tower) and a decode thread
pool, then warms every model up in a background thread: ``/healthz`` answers at once, ``/readyz`` (and
embedding requests) only once warm-up is done. On shutdown the app drains: new embedding requests get 503,
in-flight ones finish, then the batchers stop.

``POST /v1/embeddings`` embeds images (multipart or JSON base64) or, for models with a text tower, texts
(JSON ``texts``); both answers have one shape. Status codes: 200 (at least one image embedded, bad images
reported per item; or every text embedded), 400 (malformed request, images and texts together, texts for a
model without a text tower, or no image could be decoded), 404 (unknown model), 413 (body, image or text
count, a text's length, or every image's pixel count over the limit), 415 (content type), 429 (queue full,
or its estimated wait over max_wait_s; Retry-After), 503 (warming up or draining, Retry-After), 504 (not
finished within the per-request timeout).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from imgembed import __version__
from imgembed.serve.auth import ApiKeyMiddleware
from imgembed.serve.batcher import Batcher
from imgembed.serve.config import ServeConfig
from imgembed.serve.errors import (
    BadRequestError,
    DimensionsError,
    ModelNotFoundError,
    NoTextTowerError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServeError,
    UnavailableError,
    UndecodableImageError,
)
from imgembed.serve.metrics import Metrics
from imgembed.serve.models import ServedModel
from imgembed.serve.schemas import EmbeddingResponse, ErrorResponse, Health, ModelInfo, ModelList, Readiness
from imgembed.serve.uploads import (
    IMAGE_PREFIX,
    DecodeCancelled,
    DecodeLimits,
    Incoming,
    PixelBudget,
    Prepared,
    check_texts,
    media_type,
    parse_json_body,
    prepare,
    read_request,
)

log = logging.getLogger("imgembed.serve")
# a JSON body with a top-level-looking "input" key (a string value is followed by , or ], never by :)
OPENAI_KEY = re.compile(rb'"input"\s*:')


@dataclass
class ServerState:
    """Everything the routes share: models, limits, metrics, the decode pool, readiness and draining."""

    config: ServeConfig
    models: list[ServedModel]
    metrics: Metrics = field(default_factory=Metrics)
    pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False
    inflight: int = 0
    warmup_error: str | None = None
    warmed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.budget = PixelBudget(self.config.max_decode_pixels)
        self.lookup = {alias: m for m in self.models for alias in m.aliases}
        self.lookup.update({m.id: m for m in self.models})

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def resolve(self, name: str | None) -> ServedModel:
        """The served model for ``name`` (id or alias); None is fine when exactly one model is served."""
        if name is None:
            if len(self.models) == 1:
                return self.models[0]
            raise BadRequestError(f"several models are served, name one with ?model=ID (or the 'model' field): "
                                  f"{self.ids}", extra={"models": self.ids})
        if name not in self.lookup:
            shown = repr(name) if len(name) <= 200 else f"{name[:200]!r}... ({len(name)} characters)"
            raise ModelNotFoundError(f"model {shown} is not served; served models: {self.ids}",
                                     extra={"models": self.ids})
        return self.lookup[name]

    def check_accepting(self) -> None:
        """503 while warming up, after a failed warm-up, or while draining."""
        if self.draining:
            raise UnavailableError("server is shutting down and accepts no new requests")
        if not self.ready:
            raise UnavailableError(f"models are not ready yet ({self.status()}); retry shortly")

    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.warmup_error:
            return "failed"
        return "ready" if self.ready else "warming_up"

    def begin_drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    def wait_idle(self, timeout: float) -> bool:
        """Block (in a non-loop thread) until no embedding request is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.inflight == 0


# ------------------------------------------------------------------------------------------- lifecycle
def _start(state: ServerState) -> None:
    """Decode pool, one batcher per model, and warm-up in a background thread."""
    cfg = state.config
    state.pool = ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="imgembed-decode")
    for m in state.models:
        if m.batch_dependent and not cfg.batch_invariant:
            log.warning("%s is dynamically quantized: its vectors vary slightly with the other images of a batch "
                        "(within its INT8 parity tolerance); --batch-invariant makes them reproducible", m.id)
        m.batcher = Batcher(m.infer_fn(cfg.batch_invariant), max_batch=cfg.max_batch,
                            max_delay_s=cfg.max_delay_s, max_queue=cfg.max_queue,
                            max_wait_s=cfg.admission_wait_s, name=m.id,
                            on_batch=state.metrics.batch_observer(m.id)).start()
        state.metrics.track_queue(m.id, lambda b=m.batcher: b.pending)
        if m.has_text:
            m.text_batcher = Batcher(m.text_infer_fn(cfg.batch_invariant), max_batch=cfg.max_batch,
                                     max_delay_s=cfg.max_delay_s, max_queue=cfg.max_text_queue,
                                     max_wait_s=cfg.admission_wait_s, name=m.id, unit="texts",
                                     on_batch=state.metrics.batch_observer(m.id, "text")).start()
            state.metrics.track_queue(m.id, lambda b=m.text_batcher: b.pending, "text")
    threading.Thread(target=_warm_up, args=(state,), name="imgembed-warmup", daemon=True).start()


def _warm_up(state: ServerState) -> None:
    try:
        for m in state.models:
            m.warm_up(state.config.max_batch)
            state.warmed.add(m.id)
    except Exception as e:  # reported by /readyz; the server stays unready
        log.exception("warm-up failed")
        state.warmup_error = f"{type(e).__name__}: {e}"
        return
    state.ready = True
    state.metrics.ready.set(1)
    log.info("imgembed serve: ready (%s)", ", ".join(state.ids))


def _stop(state: ServerState) -> None:
    """Refuse new work, let queued batches finish, stop the batchers and the decode pool."""
    state.begin_drain()
    for m in state.models:
        for batcher in (m.batcher, m.text_batcher):
            if batcher is not None and not batcher.stop(timeout=state.config.drain_timeout_s):
                log.warning("%s batcher of %s did not finish within %.1f s", batcher.unit, m.id,
                            state.config.drain_timeout_s)
    if state.pool is not None:
        state.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------ embedding
@dataclass
class _Call:
    """Book-keeping of one embedding request: metrics, its deadline, and the moment its body has been read
    (from then on a disconnect of its client cancels it)."""

    timeout_s: float
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    body_read: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


async def _embed(state: ServerState, request, model_param: str | None, call: _Call):
    """Read, resolve, then embed the request's images or texts."""
    loop = asyncio.get_running_loop()
    cfg = state.config
    max_values = max(cfg.max_images, cfg.max_texts) + 16  # items plus the other fields of any accepted shape

    async def parse_json(body: bytes):
        try:
            return await loop.run_in_executor(state.pool, parse_json_body, body, max_values)
        except ServeError:
            request.state.openai = OPENAI_KEY.search(body) is not None  # its errors in OpenAI's shape too
            raise

    if model_param is not None or len(state.models) == 1:  # 404 (and 429 for uploads) before reading the body
        early = state.resolve(model_param)
        call.model = early.id
        if media_type(request) == "multipart/form-data":  # images only; a JSON body may hold texts
            early.batcher.check_capacity()
    incoming = await read_request(request, cfg, parse_json)
    request.state.openai = incoming.openai
    call.body_read.set()
    served = state.resolve(incoming.model or model_param)
    if model_param is not None and served.id != call.model:
        raise BadRequestError(f"two different models named: query {model_param!r}, body {incoming.model!r}")
    call.model = served.id
    if incoming.dimensions is not None and incoming.dimensions != _dim(served, incoming):
        raise DimensionsError(f"dimensions={incoming.dimensions} is not supported by model {served.id!r}: its "
                              f"vectors have {_dim(served, incoming)} dimensions; omit 'dimensions' or send that")
    if incoming.texts is not None:
        return await _embed_texts(state, served, incoming)
    return await _embed_images(state, served, incoming, call)


def _dim(served: ServedModel, incoming: Incoming) -> int:
    return served.embedder.text.dim if incoming.texts is not None and served.has_text else served.embedder.dim


async def _embed_images(state: ServerState, served: ServedModel, incoming: Incoming, call: _Call) -> Response:
    """Admit, decode (thread pool, one image at a time within the pixel budgets), infer (batcher), answer per
    image. Cancelling the request (timeout, client gone) stops its decoding at the next image or input chunk."""
    loop = asyncio.get_running_loop()
    uploads = incoming.uploads
    cfg = state.config
    limits = DecodeLimits(cfg.max_pixels, cfg.max_request_pixels, state.budget, cfg.draft_ratio, call.deadline)
    with served.batcher.admit(len(uploads)):
        try:
            prepared = await loop.run_in_executor(state.pool, prepare, uploads, served.embedder.preprocess, limits,
                                                  served.embedder.model_input)
        except DecodeCancelled:
            raise asyncio.TimeoutError from None
        finally:
            limits.cancel.set()
        served.batcher.record_preprocess(prepared.seconds, len(uploads))
        state.metrics.images.labels(served.id, "error").inc(len(prepared.failures))
        if prepared.pixels is None:
            raise _nothing_embedded(prepared, len(uploads))
        if incoming.openai and prepared.failures:
            raise _openai_failures(prepared, len(uploads))
        vectors = await served.batcher.infer(prepared.pixels)
    state.metrics.images.labels(served.id, "ok").inc(len(prepared.ok))
    if incoming.openai:
        return _openai_response(served, incoming, vectors, tokens=0)
    return Response(_response_json(served, prepared, vectors, len(uploads)), media_type="application/json")


async def _embed_texts(state: ServerState, served: ServedModel, incoming: Incoming) -> Response:
    """Check the tower and the limits, admit, infer (the model's text batcher; it tokenizes), answer per text."""
    texts = incoming.texts
    if served.text_batcher is None:
        raise NoTextTowerError(f"model {served.id!r} has no text tower (towers: {served.towers}), so it cannot embed "
                               f"texts; export its artifact with `imgembed export {served.embedder.name} --text` "
                               "(CLIP and SigLIP models) and serve that artifact"
                               + (f"; images go in 'input' as {IMAGE_PREFIX}...;base64, URLs" if incoming.openai
                                  else ""))
    check_texts(texts, state.config)
    with served.text_batcher.admit(len(texts)):
        vectors = await served.text_batcher.infer(np.array(texts, dtype=object))
    state.metrics.texts.labels(served.id).inc(len(texts))
    if incoming.openai:
        tokens = sum(len(ids) for ids in served.embedder.text.tokenizer.ids(texts))
        return _openai_response(served, incoming, vectors, tokens=tokens)
    data = [{"index": i, "embedding": row, "error": None} for i, row in enumerate(vectors.tolist())]
    text = served.embedder.text
    body = {"model": served.id, "tower": "text", "precision": text.engine.precision, "dim": text.dim,
            "normalized": bool((served.embedder.space or {}).get("normalized", served.embedder.normalized)),
            "data": data, "embedded": len(texts), "failed": 0}
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type="application/json")


def encode_base64(vectors: np.ndarray) -> list[str]:
    """One base64 string per row: the row's little-endian float32 bytes (OpenAI's ``encoding_format=base64``)."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def _openai_response(served: ServedModel, incoming: Incoming, vectors: np.ndarray, tokens: int) -> Response:
    """OpenAI's embeddings answer: ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
    "model", "usage"}``; embeddings as float lists or base64 float32."""
    values = encode_base64(vectors) if incoming.encoding_format == "base64" else vectors.tolist()
    body = {"object": "list", "model": served.id,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type="application/json")


def _openai_failures(prepared: Prepared, n: int) -> ServeError:
    """OpenAI's answer has no per-item errors: a request with a bad image fails as a whole, naming every one."""
    messages = [msg for _, (_, msg) in sorted(prepared.failures.items())]
    return UndecodableImageError(f"{len(messages)} of the {n} images could not be embedded (OpenAI's response shape "
                                 "has no per-item errors, so nothing was embedded): " + "; ".join(messages[:5])
                                 + (f"; ... ({len(messages) - 5} more)" if len(messages) > 5 else ""))


def _nothing_embedded(prepared: Prepared, n: int) -> ServeError:
    """413 if every image was over the pixel limit, else 400; the message quotes the per-image errors."""
    messages = [msg for _, (_, msg) in sorted(prepared.failures.items())]
    text = messages[0] if n == 1 else (f"none of the {n} images could be embedded: " + "; ".join(messages[:3])
                                       + (f"; ... ({n - 3} more)" if n > 3 else ""))
    kinds = {kind for kind, _ in prepared.failures.values()}
    return PayloadTooLargeError(text) if kinds == {"too_large"} else UndecodableImageError(text)


def _response_json(served: ServedModel, prepared: Prepared, vectors, n: int) -> bytes:
    """EmbeddingResponse as JSON bytes (built directly: validating thousands of floats would cost more)."""
    rows = {index: row for row, index in enumerate(prepared.ok)}
    values = vectors.tolist()
    data = []
    for i in range(n):
        if i in rows:
            data.append({"index": i, "embedding": values[rows[i]], "error": None})
        else:
            kind, message = prepared.failures[i]
            data.append({"index": i, "embedding": None, "error": {"kind": kind, "message": message}})
    e = served.embedder
    body = {"model": served.id, "tower": "image", "precision": e.precision, "dim": e.dim, "normalized": e.normalized,
            "data": data, "embedded": len(prepared.ok), "failed": len(prepared.failures)}
    return json.dumps(body, separators=(",", ":")).encode()


async def _client_gone(request, call: _Call) -> None:
    """Return once the client of a request whose body has been read disconnects."""
    await call.body_read.wait()
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _embeddings_endpoint(state: ServerState, request, model: str | None):
    """Run one embedding request under the per-request timeout, cancelled if its client leaves; count it in
    the metrics."""
    call = _Call(state.config.timeout_s)
    state.inflight += 1
    work = watch = None
    try:
        state.check_accepting()
        work = asyncio.ensure_future(_embed(state, request, model, call))
        watch = asyncio.ensure_future(_client_gone(request, call))
        done, _ = await asyncio.wait({work, watch}, timeout=state.config.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()  # its decoding stops at the next image, its queued batches are dropped
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            if watch in done:
                state.metrics.record(call.model, 499, call.elapsed, "client_gone")
                return Response(status_code=499)
            raise asyncio.TimeoutError
        response = work.result()
    except ClientDisconnect:  # the client left (or was evicted at the connection cap) while sending its body
        state.metrics.record(call.model, 499, call.elapsed, "client_gone")
        return Response(status_code=499)
    except asyncio.TimeoutError:
        state.metrics.record(call.model, 504, call.elapsed, "timeout")
        model = f" (model {call.model})" if call.model else ""
        raise RequestTimeoutError(f"request not finished within timeout_s={state.config.timeout_s:g} s{model}; "
                                  "the server is overloaded or the upload too slow, retry later") from None
    except ServeError as e:
        state.metrics.record(call.model, e.status, call.elapsed, e.kind)
        raise
    except Exception:
        state.metrics.record(call.model, 500, call.elapsed, "internal")
        raise
    finally:
        state.inflight -= 1
        for task in (work, watch):
            if task is not None and not task.done():
                task.cancel()
    state.metrics.record(call.model, 200, call.elapsed)
    return response


# ------------------------------------------------------------------------------------------------ app
_ERRORS = {
    400: "Malformed request (images and texts together, a text that is not a string, ...), model not named while "
         "several are served, texts for a model without a text tower (no_text_tower), or no image of the request "
         "could be decoded (the message is the decoder's, naming the image).",
    404: "Unknown model; the body lists the served ones.",
    413: "Body over max_body_bytes, more than max_images images or max_texts texts, a text over max_text_chars "
         "characters (named by its index), or every image over max_pixels.",
    415: "Content-Type is neither multipart/form-data nor application/json.",
    429: "The model's queue is full (or would take longer than max_wait_s); retry after Retry-After seconds.",
    503: "Warming up or shutting down; retry after Retry-After seconds.",
    504: "Not finished within the per-request timeout.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def _error_responses() -> dict:
    return {code: {"model": ErrorResponse, "description": text, **({"headers": _RETRY_AFTER}
                                                                   if code in (429, 503) else {})}
            for code, text in _ERRORS.items()}


def _request_body_schema(config: ServeConfig, names: list[str]) -> dict:
    """OpenAPI requestBody of POST /v1/embeddings: multipart uploads, JSON base64 images, or JSON texts."""
    model = {"type": "string", "enum": names, "description": "Model id or alias (optional with one model)."}
    images = {"type": "array", "minItems": 1, "maxItems": config.max_images}
    multipart = {"type": "object", "required": ["image"], "properties": {
        "image": {**images, "items": {"type": "string", "format": "binary"},
                  "description": "One part per image (JPEG, PNG, WebP, BMP, GIF, TIFF)."}, "model": model}}
    texts = {"type": "array", "minItems": 1, "maxItems": config.max_texts,
             "items": {"type": "string", "maxLength": config.max_text_chars},
             "description": "Texts for the model's text tower (models exported with --text); their vectors are "
                            "in the image space. Tokens past the model's max_length are truncated."}
    as_json = {"type": "object", "additionalProperties": False, "properties": {
        "images": {**images, "items": {"type": "string", "format": "byte"},
                   "description": "Base64-encoded images; a data:image/...;base64, prefix is accepted."},
        "texts": texts, "model": model},
        "oneOf": [{"required": ["images"]}, {"required": ["texts"]}],
        "description": "Either images or texts, not both."}
    return {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                          "application/json": {"schema": as_json}}}


def create_app(models: Sequence[ServedModel], config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (ids must be unique) with the limits of ``config``."""
    state = ServerState(config or ServeConfig(), list(models))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        _start(state)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, _stop, state)

    app = FastAPI(title="imgembed", version=__version__, lifespan=lifespan,
                  description="Image embeddings from ONNX artifacts, with dynamic batching and bounded queues.")
    app.state.imgembed = state
    if state.config.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=state.config.api_keys, protect_health=state.config.auth_health)
    _add_error_handlers(app, state)
    _add_embedding_route(app, state)
    _add_info_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    """ServeError -> its status and ErrorResponse body (+ Retry-After); anything else -> JSON 500."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        headers = dict(exc.headers)
        if exc.status in (429, 503):
            headers.setdefault("Retry-After", str(state.config.retry_after_s))
        if state.draining:
            headers["Connection"] = "close"
        if getattr(request.state, "openai", False):  # a request in OpenAI's body shape: OpenAI's error shape
            error = {"message": str(exc), "type": exc.kind, "param": None, "code": exc.kind, **exc.extra}
            return JSONResponse({"error": error}, exc.status, headers=headers)
        return JSONResponse({"error": exc.kind, "message": str(exc), **exc.extra}, exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):  # a bug: JSON body, logged with traceback
        log.error("internal error", exc_info=exc)
        return JSONResponse({"error": "internal", "message": f"internal server error ({type(exc).__name__})"}, 500)


def _add_embedding_route(app: FastAPI, state: ServerState) -> None:
    names = sorted(state.lookup)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_error_responses(),
              openapi_extra={"requestBody": _request_body_schema(state.config, names)}, tags=["embeddings"],
              summary="Embed one or more images, or texts")
    async def embeddings(request: Request, model: str = Query(  # str, not Optional: no "null" in the schema
            None, description="Model id or alias; optional when one model is served.",
            json_schema_extra={"enum": names})):
        """Embed the images of a multipart upload (``image`` parts) or a JSON body (base64 ``images``), or the
        ``texts`` of a JSON body with the model's text tower (models exported with ``--text``).

        Results come back per item in request order; an image that cannot be decoded gets an ``error``
        instead of an ``embedding`` and never costs the other images theirs. The request fails as a whole
        (400/413) only when no image could be embedded, or when any text breaks a limit.
        """
        return await _embeddings_endpoint(state, request, model)


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    """/v1/models, /healthz, /readyz, /metrics."""

    @app.get("/v1/models", response_model=ModelList, tags=["models"], summary="List the served models")
    async def list_models():
        return ModelList(models=[ModelInfo(**m.describe()) for m in state.models])

    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: the process answers")
    async def healthz():
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["health"], summary="Readiness: models loaded and warm",
             responses={503: {"model": Readiness, "description": "Warming up, warm-up failed, or draining."}})
    async def readyz():
        body = Readiness(ready=state.ready and not state.draining, status=state.status(),
                         models={m.id: m.id in state.warmed for m in state.models}, message=state.warmup_error)
        return JSONResponse(body.model_dump(), 200 if body.ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format."}})
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)
