"""Limits applied while decoding untrusted image bytes (see SECURITY.md): which PIL plugins may run,
the per-item decode deadline, and the error for refused formats. Used by :mod:`imgembed.preprocess`
(numpy + PIL only, like it)."""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from PIL import Image

from imgembed.errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 64_000_000  # declared width x height above this is refused before decoding
DEFAULT_MAX_SECONDS = 20.0       # per-item decode deadline for encoded inputs (checked between input chunks)
# The only PIL plugins that decode encoded inputs (paths, bytes): the formats photos come in. Every other
# plugin (EPS runs Ghostscript; PSD, ICO, TGA, PCX, FLI... add attack surface for no use) is refused.
DECODE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Formats that are named in the error when refused (lower-cased prefix -> label): common non-images, then
# the PIL plugins whose magic numbers are distinctive (CUR / TGA / PCX... share weak prefixes: not named).
_NON_PIL_MAGIC = ((b"%pdf", "PDF document"), (b"<svg", "SVG image"), (b"<?xml", "XML/SVG document"),
                  (b"<!doctype html", "HTML page"), (b"<html", "HTML page"), (b"pk\x03\x04", "ZIP archive"))
_ISO_BRANDS = {b"heic": "HEIC image", b"heix": "HEIC image", b"mif1": "HEIF image", b"avif": "AVIF image"}
_NAMED_PIL_FORMATS = ("EPS", "PSD", "ICO", "ICNS", "JPEG2000", "QOI", "DDS", "FITS", "PPM", "AVIF")

class DecodeTimeout(Exception):
    """Raised from inside PIL's read loop once the per-item decode deadline has passed (never escapes
    :func:`imgembed.preprocess.load_image`, which turns it into an ImageDecodeError)."""


class DeadlineReader:
    """File proxy whose ``read`` fails once ``max_seconds`` have passed since it was created.

    PIL decodes in chunks of at most ~64 KiB of input, each fetched through ``read``, so the deadline is
    checked between chunks: a slow or hostile stream cannot keep the decoder busy for long past it.
    """

    def __init__(self, fp: Any, max_seconds: float):
        self._fp, self._deadline, self.expired = fp, time.monotonic() + max_seconds, False

    def read(self, size: int = -1) -> bytes:
        """Read from the wrapped file, or raise DecodeTimeout once past the deadline."""
        if time.monotonic() > self._deadline:
            self.expired = True
            raise DecodeTimeout
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Seek the wrapped file."""
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        """Position in the wrapped file."""
        return self._fp.tell()


@lru_cache(maxsize=1)
def decode_formats() -> tuple[str, ...]:
    """The PIL plugins allowed to decode encoded inputs: the registered subset of DECODE_FORMATS."""
    Image.init()
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def sniff_format(head: bytes) -> tuple[str | None, str | None]:
    """(PIL format, label) of ``head``, the first bytes of an input no allowed plugin accepted.

    Only magic-number checks run: a short table of common non-image formats, ISO-BMFF brands (HEIC /
    AVIF) and PIL's plugin ``accept`` functions (pure prefix tests); no plugin decoder is invoked.
    ``(None, None)`` when nothing matches.
    """
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for magic, label in _NON_PIL_MAGIC:
        if text.startswith(magic):
            return None, label
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_BRANDS:
        return None, _ISO_BRANDS[head[8:12]]
    for fmt in DECODE_FORMATS + _NAMED_PIL_FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            hit = accept is not None and accept(head[:16])
        except Exception:  # an accept() that chokes on odd bytes simply does not match
            continue
        if hit and not isinstance(hit, str):  # a str is PIL's "maybe, with a warning"
            return fmt, f"{fmt} image"
    return None, None


def unidentified_error(desc: str, fp: Any) -> ImageDecodeError:
    """The error for bytes no allowed plugin could open: a corrupt header of an allowed format (with the
    plugin's own reason), a named unsupported format, or unidentified bytes."""
    fp.seek(0)
    fmt, label = sniff_format(fp.read(64))
    if fmt in decode_formats():
        reason = "unknown reason"
        try:  # re-run just that plugin's header parser to report why it refused the bytes
            fp.seek(0)
            Image.OPEN[fmt][0](fp, "")
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        return ImageDecodeError(f"{desc}: corrupt or invalid {fmt} header ({reason})")
    if label is not None:
        return ImageDecodeError(f"{desc}: unsupported format ({label}); imgembed decodes only "
                                f"{', '.join(decode_formats())}")
    return ImageDecodeError(f"{desc}: not an image or unidentified format (PIL cannot identify it)")
