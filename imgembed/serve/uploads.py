"""Reading a request's images or texts (multipart or JSON, within the body limit) and decoding images off the loop.

Three request shapes, one result (an :class:`Incoming`: a list of :class:`Upload` or a list of texts):

- ``multipart/form-data``: one or more ``image`` parts. File parts carry raw encoded bytes; a plain text
  ``image`` field is read as base64 (like JSON). An optional ``model`` field names the model.
- ``application/json``: ``{"model": "...", "images": ["<base64>", ...]}``; ``data:image/...;base64,``
  prefixes are accepted.
- ``application/json``: ``{"model": "...", "texts": ["a red bicycle", ...]}`` for models with a text tower.
  A request carries images or texts, never both; :func:`check_texts` applies the text limits.

:func:`prepare` (run in the decode thread pool) decodes and preprocesses every upload; a bad image becomes
a per-item failure and never drops the good images of the same request.
"""
from __future__ import annotations

import base64
import binascii
import io
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..decode_guard import decode_formats
from ..errors import ImageDecodeError
from ..fastdecode import crops_of, crops_to_pixels
from ..preprocess import PreprocessSpec, load_image
from .config import ServeConfig
from .errors import BadRequestError, PayloadTooLargeError, PixelLimitError, UnsupportedMediaTypeError

PROBE_FORMATS = decode_formats()  # the plugins load_image itself allows: header probes use no others
FORM_LIMIT = 10_000  # parts per multipart body; the body-size limit is what really bounds a request


class EmbedJsonRequest(BaseModel):
    """JSON request body of ``POST /v1/embeddings``: ``images`` or ``texts`` (absent is None; null is refused)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Model id (or alias); may be omitted when one model is served.")
    images: list[str] = Field(None, min_length=1, description="Encoded images (JPEG, PNG, WebP, ...) as base64 "
                              "strings; a data:image/...;base64, prefix is accepted.")
    texts: list[str] = Field(None, min_length=1, description="Texts to embed with the model's text tower.")


JSON_SHAPES = '{"model": "<id>", "images": ["<base64>", ...]} or {"model": "<id>", "texts": ["<text>", ...]}'


@dataclass(frozen=True)
class Upload:
    """One image of a request, still encoded: raw bytes (file part) or base64 text (JSON, text field)."""

    name: str          # how errors refer to it, e.g. "image 1 ('cat.jpg')"
    data: bytes | str
    base64: bool = False


@dataclass(frozen=True)
class Incoming:
    """What one request asks to embed: images (``uploads``) or ``texts`` -- exactly one is set -- and the
    model named in the body (None when not named)."""

    uploads: list[Upload] | None = None
    texts: list[str] | None = None
    model: str | None = None


@dataclass
class Prepared:
    """A request's images after decoding: pixels of the good ones, and one failure per bad one."""

    pixels: np.ndarray | None    # float32 (n_ok, 3, H, W); uint8 (n_ok, H, W, 3) for uint8 artifacts; None: none
    ok: list[int] = field(default_factory=list)   # request index of each pixels row
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (kind, message)
    seconds: float = 0.0                          # wall time of decoding + preprocessing


# ---------------------------------------------------------------------------------- reading the body
def media_type(request) -> str:
    """The request's Content-Type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_request(request, config: ServeConfig, parse_json: Callable[[bytes], Awaitable[EmbedJsonRequest]]
                       ) -> Incoming:
    """The images or texts of a request and the model it names; 400/413/415 ServeErrors for bad requests.

    ``parse_json`` validates a JSON body (the app runs it in its thread pool: big bodies stay off the loop).
    """
    from starlette.requests import Request

    ctype = request.headers.get("content-type", "")
    media = media_type(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > config.max_body_bytes:
        raise PayloadTooLargeError(_body_message(int(declared), config.max_body_bytes))
    limited = Request(request.scope, _limited_receive(request.receive, config.max_body_bytes))
    if media == "multipart/form-data":
        uploads, model = await _read_multipart(limited)
    elif media == "application/json" or media.endswith("+json"):
        payload = await parse_json(await limited.body())
        if payload.texts is not None:
            return Incoming(texts=payload.texts, model=payload.model)  # limits: check_texts, once the model is known
        uploads = [Upload(f"image {i}", s, base64=True) for i, s in enumerate(payload.images)]
        model = payload.model
    else:
        raise UnsupportedMediaTypeError(
            f"Content-Type {ctype or '(none)'!r} is not supported: send multipart/form-data with one or more "
            "'image' file parts, or application/json " + JSON_SHAPES)
    if len(uploads) > config.max_images:
        raise PayloadTooLargeError(f"{len(uploads)} images in one request is over the limit of "
                                   f"max_images={config.max_images}; split the request")
    return Incoming(uploads=uploads, model=model)


def parse_json_body(body: bytes) -> EmbedJsonRequest:
    """Validate a JSON body; BadRequestError naming the first problems and the expected shapes."""
    try:
        payload = EmbedJsonRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:3])
        raise BadRequestError(f"invalid JSON body ({problems}); expected {JSON_SHAPES}") from None
    if payload.images is not None and payload.texts is not None:
        raise BadRequestError("a request carries images or texts, not both: send the texts in a request of "
                              "their own")
    if payload.images is None and payload.texts is None:
        raise BadRequestError(f"invalid JSON body (neither 'images' nor 'texts' given); expected {JSON_SHAPES}")
    return payload


def check_texts(texts: list[str], config: ServeConfig) -> list[str]:
    """``texts`` if within the server's limits; PayloadTooLargeError naming the count, or the first text over
    ``max_text_chars`` by its index, and the limit."""
    if len(texts) > config.max_texts:
        raise PayloadTooLargeError(f"{len(texts)} texts in one request is over the limit of "
                                   f"max_texts={config.max_texts}; split the request")
    for i, text in enumerate(texts):
        if len(text) > config.max_text_chars:
            raise PayloadTooLargeError(f"text {i} has {len(text)} characters, over the limit of "
                                       f"max_text_chars={config.max_text_chars}; shorten it")
    return texts


def _body_message(size: int, limit: int) -> str:
    return f"request body of {size} bytes is over the limit of max_body_bytes={limit}"


def _limited_receive(receive: Callable, limit: int) -> Callable:
    """An ASGI ``receive`` that raises PayloadTooLargeError once more than ``limit`` body bytes arrived."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLargeError(f"request body is over the limit of max_body_bytes={limit} "
                                           f"(more than {limit} bytes received)")
        return message

    return wrapped


async def _read_multipart(request) -> tuple[list[Upload], str | None]:
    """The ``image`` parts (files: raw bytes; text fields: base64) and the optional ``model`` field."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=FORM_LIMIT, max_fields=FORM_LIMIT, max_part_size=1 << 62)
    except (HTTPException, MultiPartException) as e:
        raise BadRequestError(f"malformed multipart body: {getattr(e, 'detail', None) or e}") from None
    try:
        parts = form.getlist("image")
        if not parts:
            raise BadRequestError(f"no 'image' part in the multipart body (fields: {sorted(set(form.keys()))}); "
                                  "send one or more, e.g. curl -F image=@cat.jpg")
        uploads = []
        for i, part in enumerate(parts):
            if isinstance(part, UploadFile):
                label = f"image {i} ({part.filename!r})" if part.filename else f"image {i}"
                uploads.append(Upload(label, await part.read()))
            else:
                uploads.append(Upload(f"image {i} (text field, read as base64)", part, base64=True))
        model = form.get("model")
        return uploads, model if isinstance(model, str) and model else None
    finally:
        await form.close()


# ---------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image; PixelLimitError (from the declared size, before decoding) or
    ImageDecodeError naming ``name`` and the problem."""
    try:  # header only, and only with the plugins load_image itself allows
        with Image.open(io.BytesIO(data), formats=PROBE_FORMATS) as probe:
            w, h = probe.size
    except Image.DecompressionBombError as e:
        raise PixelLimitError(f"{name}: too many pixels ({e}); server limit max_pixels={max_pixels}") from None
    except Exception:
        w = h = 0  # not an image: load_image below produces the precise message
    if w * h > max_pixels:
        raise PixelLimitError(f"{name}: {w}x{h} = {w * h} pixels is over the server limit max_pixels={max_pixels}")
    return load_image(data, name=name, max_pixels=max_pixels)


def _raw_bytes(upload: Upload) -> bytes:
    """The upload's encoded image bytes (base64 decoded, a ``data:...;base64,`` prefix allowed)."""
    if not upload.base64:
        return upload.data if isinstance(upload.data, bytes) else upload.data.encode()
    text = upload.data if isinstance(upload.data, str) else upload.data.decode("ascii", "replace")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageDecodeError(f"{upload.name}: invalid base64 ({e})") from None


def prepare(uploads: Sequence[Upload], spec: PreprocessSpec, max_pixels: int,
            model_input: Callable[[np.ndarray], np.ndarray] | None = None) -> Prepared:
    """Decode and preprocess every upload; a bad one becomes a failure and never drops the good ones.
    ``model_input`` (the serving :meth:`~imgembed.runtime.embedder.Embedder.model_input`) turns the uint8
    NHWC crops into the runner's input; without it they become float32 NCHW pixels."""
    started = time.perf_counter()
    images, result = [], Prepared(None)
    for i, up in enumerate(uploads):
        try:
            images.append(decode_image(_raw_bytes(up), up.name, max_pixels))
            result.ok.append(i)
        except PixelLimitError as e:
            result.failures[i] = ("too_large", str(e))
        except ImageDecodeError as e:
            result.failures[i] = ("decode", str(e))
    if images:
        crops = crops_of(images, spec)
        result.pixels = model_input(crops) if model_input is not None else crops_to_pixels(crops, spec)
    result.seconds = time.perf_counter() - started
    return result
