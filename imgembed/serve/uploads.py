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
import contextlib
import io
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgembed.errors import ImageDecodeError
from imgembed.preprocess import PreprocessSpec, load_image, resize_crop, resize_plan
from imgembed.preprocess.decode import tile_size
from imgembed.preprocess.fast import crops_to_pixels, load_crop
from imgembed.preprocess.guard import DEFAULT_MAX_SECONDS, decode_formats
from imgembed.serve.config import ServeConfig
from imgembed.serve.errors import BadRequestError, PayloadTooLargeError, PixelLimitError, UnsupportedMediaTypeError

PROBE_FORMATS = decode_formats()  # the plugins load_image itself allows: header probes use no others
FORM_LIMIT = 10_000  # parts per multipart body; the body-size limit is what really bounds a request


class EmbedJsonRequest(BaseModel):
    """JSON request body of ``POST /v1/embeddings``: ``images`` or ``texts`` (absent is None; null is refused),
    or OpenAI's ``input`` (with ``encoding_format``, ``dimensions``, ``user``)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Model id (or alias); may be omitted when one model is served.")
    images: list[str] = Field(None, min_length=1, description="Encoded images (JPEG, PNG, WebP, ...) as base64 "
                              "strings; a data:image/...;base64, prefix is accepted.")
    texts: list[str] = Field(None, min_length=1, description="Texts to embed with the model's text tower.")
    input: str | list[str] = Field(None, description="OpenAI's field: a string or a list of strings; each item "
                                   "that starts with 'data:image/' is an image (data URL), every other is a text.")
    encoding_format: Literal["float", "base64"] = Field(None, description="OpenAI responses only: 'float' "
                                                        "(default) or 'base64' (little-endian float32 bytes).")
    dimensions: int = Field(None, description="OpenAI's output size; only the model's own dim is accepted.")
    user: str | None = Field(None, description="OpenAI's end-user id; accepted and ignored.")


JSON_SHAPES = ('{"model": "<id>", "images": ["<base64>", ...]}, {"model": "<id>", "texts": ["<text>", ...]} or '
               'OpenAI\'s {"model": "<id>", "input": ["<text or data:image/...;base64,...>", ...], '
               '"encoding_format": "float"|"base64"}')
IMAGE_PREFIX = "data:image/"  # the rule telling an OpenAI ``input`` item that is an image from a text
_SCAN_CHUNK = 1 << 20


def count_json_values(body: bytes, stop_above: int | None = None) -> int:
    """An upper bound on the values in the arrays and objects of a JSON text: its commas outside strings, plus 1.

    Escapes are removed first (``\\\\`` pairs, then ``\\"``), so every quote left delimits a string; a
    running XOR of the quotes marks what lies inside strings. Vectorised in chunks of 1 MiB, and a body with
    no more commas than ``stop_above`` in all is not scanned at all; the count stops at the first chunk that
    takes it past ``stop_above``, so a body of millions of tiny items is refused after its first megabyte.
    """
    if stop_above is not None and (every := body.count(b",")) < stop_above:
        return every + 1
    cleaned = body.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in body else body
    commas, inside = 0, 0
    for start in range(0, len(cleaned), _SCAN_CHUNK):
        chunk = np.frombuffer(cleaned, np.uint8, min(_SCAN_CHUNK, len(cleaned) - start), start)
        parity = np.bitwise_xor.accumulate((chunk == 34).view(np.uint8)) ^ inside
        commas += int(np.count_nonzero((chunk == 44) & (parity == 0)))
        inside = int(parity[-1])
        if stop_above is not None and commas + 1 > stop_above:
            break
    return commas + 1


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
    openai: bool = False               # the body was OpenAI's shape: answer in OpenAI's shape
    encoding_format: str = "float"     # OpenAI answers: float lists or base64 float32
    dimensions: int | None = None      # OpenAI's requested output size (checked against the model's dim)


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
        if payload.input is not None:
            request.state.openai = True  # errors from here on in OpenAI's shape (the app's error handler)
            return _openai_incoming(payload, config)
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


def _openai_incoming(payload: EmbedJsonRequest, config: ServeConfig) -> Incoming:
    """OpenAI's ``input``: all images (``data:image/`` URLs) or all texts; 400 when mixed."""
    items = [payload.input] if isinstance(payload.input, str) else payload.input
    if not items:
        raise BadRequestError("'input' is an empty list; send at least one text or data:image/ URL")
    common = {"model": payload.model, "openai": True, "encoding_format": payload.encoding_format or "float",
              "dimensions": payload.dimensions}
    is_image = [item.startswith(IMAGE_PREFIX) for item in items]
    if all(is_image):
        if len(items) > config.max_images:
            raise PayloadTooLargeError(f"{len(items)} images in one request is over the limit of "
                                       f"max_images={config.max_images}; split the request")
        return Incoming(uploads=[Upload(f"input {i}", s, base64=True) for i, s in enumerate(items)], **common)
    if any(is_image):
        raise BadRequestError(f"'input' mixes images ({IMAGE_PREFIX}... URLs, e.g. item {is_image.index(True)}) and "
                              f"texts (e.g. item {is_image.index(False)}); send them in separate requests")
    return Incoming(texts=items, **common)


def parse_json_body(body: bytes, max_values: int | None = None) -> EmbedJsonRequest:
    """Validate a JSON body; BadRequestError naming the first problems and the expected shapes.
    PayloadTooLargeError, before anything is parsed, when the body holds more than ``max_values`` values."""
    if max_values is not None and count_json_values(body, max_values) > max_values:
        raise PayloadTooLargeError(f"JSON body holds more than the {max_values} values a request may have "
                                   "(max_images / max_texts items plus the other fields); split the request")
    try:
        payload = EmbedJsonRequest.model_validate_json(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:3])
        raise BadRequestError(f"invalid JSON body ({problems}); expected {JSON_SHAPES}") from None
    given = [name for name in ("images", "texts", "input") if getattr(payload, name) is not None]
    if len(given) > 1:
        raise BadRequestError(f"a request carries one of images, texts or input, not {' and '.join(given)}: send "
                              "them in requests of their own")
    if payload.input is None and (payload.encoding_format is not None or payload.dimensions is not None):
        raise BadRequestError("encoding_format and dimensions belong to OpenAI's body shape: send the items as "
                              "'input'")
    if not given:
        raise BadRequestError(f"invalid JSON body (none of 'images', 'texts' or 'input' given); expected {JSON_SHAPES}")
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
class DecodeCancelled(Exception):
    """The request that owns a decode was cancelled (timed out, or its client left): stop decoding it."""


class PixelBudget:
    """Declared pixels being decoded at once, across every request of the server (``max_decode_pixels``).

    A decode holds its image's declared pixels, weighted by what its format costs to decode
    (:attr:`Declared.budget_pixels`), from before decoding until its crop is made; a decode that would go over
    the budget waits for others to finish (or for its request to be cancelled). Together with
    one-image-at-a-time decoding this bounds the memory of decoding to about BUDGET_BYTES_PER_PIXEL bytes x
    the budget.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, cancel: threading.Event, deadline: float) -> Iterator[None]:
        pixels = min(pixels, self.capacity)  # (prepare refuses an image over the budget before this)
        with self._cond:
            while self.held + pixels > self.capacity:
                if cancel.is_set() or time.monotonic() > deadline:
                    raise DecodeCancelled
                self._cond.wait(0.05)
            self.held += pixels
        try:
            yield
        finally:
            with self._cond:
                self.held -= pixels
                self._cond.notify_all()


# Peak memory of decoding one pixel at full size and converting it to RGB (Pillow 13, measured on 6000-6320
# pixel squares): JPEG, PNG, TIFF, BMP (RGB, L) about 4 bytes, GIF 5, RGBA PNG 8, 16- and 32-bit modes 9-14,
# WebP 16 (libwebp's canvas and Pillow's copies). The decode budget counts pixels of BUDGET_BYTES_PER_PIXEL bytes.
BUDGET_BYTES_PER_PIXEL = 6
_PLAIN_MODES = {"1", "L", "P", "RGB", "YCbCr"}


@dataclass(frozen=True)
class Declared:
    """What an image's header declares: its size, format and mode, and what decoding it will cost."""

    width: int | None       # None when Pillow refused the header as a decompression bomb (``pixels`` is known)
    height: int | None
    pixels: int
    format: str | None = None
    mode: str | None = None
    tile: tuple[int, int] = (0, 0)  # a tiled TIFF's tile size: the decoder allocates one whole tile

    @property
    def decoded_pixels(self) -> int:
        """The pixels decoding allocates: the image's, or one tile's when that is larger."""
        return max(self.pixels, self.tile[0] * self.tile[1])

    @property
    def bytes_per_pixel(self) -> int:
        if self.format == "WEBP" or self.mode in ("I", "F") or (self.mode or "").startswith("I;"):
            return 16  # WebP; 16- and 32-bit modes (4-byte image + int32 copies on the way to 8 bit)
        return BUDGET_BYTES_PER_PIXEL if self.mode in _PLAIN_MODES else 8  # alpha, CMYK: 8

    @property
    def budget_pixels(self) -> int:
        """The pixels of the decode budget this image holds while it is decoded (see BUDGET_BYTES_PER_PIXEL)."""
        return -(-self.decoded_pixels * self.bytes_per_pixel // BUDGET_BYTES_PER_PIXEL)

    def describe(self) -> str:
        size = f"{self.width}x{self.height} = " if self.width is not None else ""
        tiles = f" in {self.tile[0]}x{self.tile[1]} tiles" if self.decoded_pixels > self.pixels else ""
        return f"{size}{self.pixels} pixels{tiles}"


def declared(data: bytes) -> Declared | None:
    """The header's :class:`Declared` (allowed plugins only, nothing decoded); None if not an image."""
    try:
        with Image.open(io.BytesIO(data), formats=PROBE_FORMATS) as probe:
            (w, h), fmt, mode = probe.size, probe.format, probe.mode
            return Declared(w, h, w * h, fmt, mode, tile_size(probe))
    except Image.DecompressionBombError as e:  # over Pillow's own cap: its message has the declared pixels
        found = re.search(r"\((\d+) pixels\)", str(e))
        return Declared(None, None, int(found.group(1)) if found else 1 << 62)
    except Exception:
        return None  # not an image: load_image produces the precise message


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image; PixelLimitError (from the declared size, before decoding) or
    ImageDecodeError naming ``name`` and the problem."""
    d = declared(data)
    why = over_limits(d, name, max_pixels, budget=1 << 62) if d is not None else None  # no server budget here
    if why is not None:
        raise PixelLimitError(why)
    return load_image(data, name=name, max_pixels=max_pixels)


def over_limits(d: Declared, name: str, max_pixels: int, budget: int) -> str | None:
    """Why an image with header ``d`` is refused before decoding (too many pixels, or more decode memory than
    the whole server's budget), or None."""
    if d.decoded_pixels > max_pixels:
        return f"{name}: {d.describe()} is over the server limit max_pixels={max_pixels}"
    if d.budget_pixels > budget:
        mib = d.decoded_pixels * d.bytes_per_pixel / (1 << 20)
        return (f"{name}: {d.describe()} of {d.format or 'this format'} ({d.mode}) takes about {mib:.0f} MiB to "
                f"decode ({d.bytes_per_pixel} bytes a pixel), over the server's decode budget max_decode_pixels="
                f"{budget} ({budget * BUDGET_BYTES_PER_PIXEL / (1 << 20):.0f} MiB at "
                f"{BUDGET_BYTES_PER_PIXEL} bytes a pixel); send it smaller or raise --max-decode-pixels")
    return None


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


@dataclass(frozen=True)
class DecodeLimits:
    """What one request's decoding may cost: pixels per image and in total (declared sizes, checked before
    any decoding), the server-wide budget, when reduced decoding applies, and the request's deadline."""

    max_pixels: int
    max_request_pixels: int
    budget: PixelBudget
    draft_ratio: float = 0.0   # short edge >= draft_ratio x the resize target's: reduced scale (0: never)
    deadline: float = float("inf")  # time.monotonic() after which the request's decoding stops
    cancel: threading.Event = field(default_factory=threading.Event)


def _reduced(size: tuple[int, int], spec: PreprocessSpec, ratio: float) -> bool:
    """Whether an image of ``size`` is so much larger than the model's input that it decodes at reduced scale."""
    if ratio <= 0:
        return False
    (rh, rw), _ = resize_plan(size[1], size[0], spec)
    return min(size) >= ratio * max(1, min(rh, rw))


def _crop_one(data: bytes, name: str, head: Declared | None, spec: PreprocessSpec,
              limits: DecodeLimits) -> np.ndarray:
    """One image's uint8 crop, decoded within the budget and the request's deadline; the full-size image is
    dropped as soon as its crop exists."""
    seconds = limits.deadline - time.monotonic()
    if limits.cancel.is_set() or seconds <= 0:
        raise DecodeCancelled
    size = (head.width, head.height) if head is not None and head.width is not None else None
    with limits.budget.hold(head.budget_pixels if head else 0, limits.cancel, limits.deadline):
        seconds = min(DEFAULT_MAX_SECONDS, max(0.001, limits.deadline - time.monotonic()))
        if size is not None and _reduced(size, spec, limits.draft_ratio):
            return load_crop(data, spec, "fast", name=name, max_pixels=limits.max_pixels, max_seconds=seconds)
        return resize_crop(load_image(data, name=name, max_pixels=limits.max_pixels, max_seconds=seconds), spec)


def prepare(uploads: Sequence[Upload], spec: PreprocessSpec, limits: DecodeLimits,
            model_input: Callable[[np.ndarray], np.ndarray] | None = None) -> Prepared:
    """Decode and preprocess the uploads one at a time (each cropped before the next is decoded); a bad one
    becomes a failure and never drops the good ones. PayloadTooLargeError (413) when the declared pixels of
    the request's images add up to more than ``max_request_pixels``; DecodeCancelled once the request is
    cancelled or past its deadline. ``model_input`` (the serving
    :meth:`~imgembed.runtime.embedder.Embedder.model_input`) turns the uint8 NHWC crops into the runner's
    input; without it they become float32 NCHW pixels."""
    started = time.perf_counter()
    result = Prepared(None)
    raw: dict[int, tuple[bytes, Declared | None]] = {}
    total = 0
    for i, up in enumerate(uploads):  # headers first: the request's cost is known before anything is decoded
        try:
            data = _raw_bytes(up)
        except ImageDecodeError as e:
            result.failures[i] = ("decode", str(e))
            continue
        head = declared(data)
        why = over_limits(head, up.name, limits.max_pixels, limits.budget.capacity) if head is not None else None
        if why is not None:
            result.failures[i] = ("too_large", why)
            continue
        total += head.decoded_pixels if head else 0
        raw[i] = (data, head)
    if total > limits.max_request_pixels:
        raise PayloadTooLargeError(f"the images of this request declare {total} pixels in all, over the limit of "
                                   f"max_request_pixels={limits.max_request_pixels}; send fewer or smaller images")
    crops = []
    for i, (data, head) in raw.items():
        raw[i] = (b"", None)  # the encoded bytes are not needed once decoded
        try:
            crops.append(_crop_one(data, uploads[i].name, head, spec, limits))
            result.ok.append(i)
        except ImageDecodeError as e:
            result.failures[i] = ("too_large" if isinstance(e, PixelLimitError) else "decode", str(e))
    if crops:
        stacked = np.stack(crops)
        result.pixels = model_input(stacked) if model_input is not None else crops_to_pixels(stacked, spec)
    result.seconds = time.perf_counter() - started
    return result
