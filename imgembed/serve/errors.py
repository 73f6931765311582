"""Errors of the HTTP server, each carrying its HTTP status and a short machine-readable ``kind``.

The kind is what clients branch on and what ``imgembed_errors_total{kind=...}`` counts; the message names
the bad value and the limit or the valid choices, like every imgembed error.
"""
from __future__ import annotations

from imgembed.errors import ImageDecodeError, ImgembedError, UnknownModelError


class ServeError(ImgembedError):
    """An error answered with ``status`` and body ``{"error": kind, "message": str(self)}``."""

    status: int = 500
    kind: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class BadRequestError(ServeError):
    """Malformed request: no images, bad JSON, wrong field types."""

    status, kind = 400, "bad_request"


class NoTextTowerError(ServeError):
    """Texts sent to a model whose artifact has no text tower (the message says how to export one)."""

    status, kind = 400, "no_text_tower"


class DimensionsError(ServeError):
    """OpenAI's ``dimensions`` asked for a size the model does not produce (only its own dim is accepted)."""

    status, kind = 400, "dimensions_unsupported"


class UndecodableImageError(ServeError):
    """Every image of the request failed to decode (the message is the ImageDecodeError's)."""

    status, kind = 400, "decode"


class ModelNotFoundError(ServeError, UnknownModelError):
    """The requested model is not served (the message lists the served ones)."""

    status, kind = 404, "unknown_model"


class PayloadTooLargeError(ServeError):
    """Body bytes, images or texts per request, characters of a text, or (for every image of the request)
    pixels over the limit."""

    status, kind = 413, "too_large"


class UnsupportedMediaTypeError(ServeError):
    """Content-Type is neither multipart/form-data nor application/json."""

    status, kind = 415, "unsupported_media_type"


class QueueFullError(ServeError):
    """The model's queue cannot take the request's images now; retry after ``Retry-After`` seconds."""

    status, kind = 429, "queue_full"


class UnavailableError(ServeError):
    """The server is warming up or draining for shutdown."""

    status, kind = 503, "unavailable"


class RequestTimeoutError(ServeError):
    """The request did not finish within the per-request timeout."""

    status, kind = 504, "timeout"


class PixelLimitError(ImageDecodeError):
    """One image declares more pixels than the server's ``max_pixels`` (reported per item, or as 413)."""


class DuplicateModelError(ImgembedError, ValueError):
    """Two served artifacts resolve to the same model id."""


__all__ = ["ServeError", "BadRequestError", "NoTextTowerError", "DimensionsError", "UndecodableImageError",
           "ModelNotFoundError", "PayloadTooLargeError", "UnsupportedMediaTypeError", "QueueFullError",
           "UnavailableError", "RequestTimeoutError", "PixelLimitError", "DuplicateModelError"]
