"""Decoding untrusted inputs into RGB PIL images, the way HF's ``convert_to_rgb`` sees them.

Decoding is bounded (pixel cap before decoding, per-item deadline, allow-listed PIL plugins, regular files
only); the limits live in :mod:`imgembed.preprocess.guard` and SECURITY.md.
"""
from __future__ import annotations

import io
import os
import stat
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgembed.errors import ImageDecodeError
from imgembed.preprocess.guard import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SECONDS,
    DeadlineReader,
    DecodeTimeout,
    decode_formats,
    unidentified_error,
)

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way HF's ``convert_to_rgb`` does (``img.convert("RGB")``).

    transformers 4.57's ``convert_to_rgb`` returns RGB images unchanged and otherwise calls
    ``image.convert("RGB")``: alpha (RGBA, LA, PA, palette transparency) is **dropped**, not composited
    onto white; CMYK, L, 1, P and F (clipped to [0, 255], truncated) use PIL's conversions. We do the
    same so preprocessing matches HF bit for bit. Deliberate deviation: 16-bit modes (I;16, I;16B,
    I;16L, I;16N and I, whose values are taken as 16-bit and clipped to [0, 65535]) are scaled to
    8 bit with ``>> 8`` (65535 -> 255, 32768 -> 128), where PIL/HF would clip everything above 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.clip(np.asarray(img), 0, 65535) >> 8  # in the input's dtype: no 8-byte-per-pixel copy
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def describe(item: Any, name: str | None) -> str:
    """Human-readable name of an input, for error messages."""
    if name is not None:
        return str(name)
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"bytes input ({memoryview(item).nbytes} bytes)"
    if isinstance(item, Image.Image):
        return f"PIL image (mode {item.mode}, size {item.width}x{item.height})"
    if isinstance(item, np.ndarray):
        return f"numpy array of shape {item.shape} dtype {item.dtype}"
    return f"object of type {type(item).__name__}"


def tile_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of one tile of a tiled TIFF, (0, 0) for anything else: the decoder allocates a whole
    tile at once, however small the image it belongs to (a 64 x 64 image may declare 16384 x 16384 tiles)."""
    tags = getattr(img, "tag_v2", None)
    try:
        return (int(tags.get(322) or 0), int(tags.get(323) or 0)) if tags else (0, 0)  # TileWidth, TileLength
    except (TypeError, ValueError):
        return (0, 0)


def check_pixels(img: Image.Image, desc: str, max_pixels: int) -> None:
    """Decompression-bomb guard on the declared size and tile size (call before decoding)."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"{desc}: too many pixels: {w}x{h} = {w * h} > max_pixels={max_pixels}")
    if w * h == 0:
        raise ImageDecodeError(f"{desc}: image has zero size ({w}x{h})")
    tw, th = tile_size(img)
    if tw * th > max_pixels:
        raise ImageDecodeError(f"{desc}: too many pixels in one tile: {tw}x{th} = {tw * th} > max_pixels={max_pixels}"
                               " (the decoder allocates a whole tile)")


def _finish(img: Image.Image, desc: str, max_pixels: int, *, owned: bool = False) -> Image.Image:
    """Size-check, decode (first frame), apply EXIF orientation and convert to RGB; wrap every failure.

    ``owned``: ``img`` was opened here and nobody else holds it, so it is oriented in place and returned
    itself when it needs neither a transposition nor a mode conversion (a caller's image is never modified:
    the result is a new image). Same pixels either way; the owned path saves a full-size copy of every
    decoded photo (about a tenth of the exact decode + resize of a 2 MP JPEG).
    """
    check_pixels(img, desc, max_pixels)
    try:
        img.load()
    except (ImageDecodeError, DecodeTimeout):
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error...
        raise ImageDecodeError(f"{desc}: truncated or corrupt image data ({type(e).__name__}: {e})") from None
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)  # a new core only when the orientation needs one
            return to_rgb(img)
        out = to_rgb(ImageOps.exif_transpose(img))
        return out if out is not img else img.copy()
    except DecodeTimeout:
        raise
    except Exception as e:
        raise ImageDecodeError(f"{desc}: cannot orient / convert mode {img.mode} to RGB "
                               f"({type(e).__name__}: {e})") from None


def finish_opened(img: Image.Image, desc: str, max_pixels: int) -> Image.Image:
    """Like ``load_image(img)`` for an image the caller has just opened and hands over (e.g. after
    ``Image.draft``): oriented and converted in place where possible, never copied."""
    return _finish(img, desc, max_pixels, owned=True)


def _decode_stream(fp: Any, desc: str, max_pixels: int, max_seconds: float) -> Image.Image:
    """Decode an open binary stream with the allowed PIL plugins, within ``max_seconds``."""
    reader = DeadlineReader(fp, max_seconds)
    timeout = ImageDecodeError(f"{desc}: decoding took longer than max_seconds={max_seconds:g}; refused "
                               "(time bound per item)")
    try:
        # Leaving the block drops the image's file reference only (PIL's __exit__; close() would free the
        # pixels): the image opened here is returned without a copy (owned).
        with Image.open(reader, formats=decode_formats()) as img:  # type: ignore[arg-type]
            out = _finish(img, desc, max_pixels, owned=True)
    except ImageDecodeError:
        raise
    except DecodeTimeout:
        raise timeout from None
    except UnidentifiedImageError:
        raise (timeout if reader.expired else unidentified_error(desc, fp)) from None
    except Image.DecompressionBombError as e:  # PIL's own cap (2x Image.MAX_IMAGE_PIXELS) hit first
        raise ImageDecodeError(f"{desc}: too many pixels (declared size over max_pixels={max_pixels}): {e}") from None
    except Exception as e:
        raise (timeout if reader.expired else
               ImageDecodeError(f"{desc}: cannot read image ({type(e).__name__}: {e})")) from None
    if reader.expired:  # a plugin swallowed the timeout somewhere; the image may be incomplete
        raise timeout
    return out


def _open_path(path: str | bytes, desc: str, max_pixels: int, max_seconds: float) -> Image.Image:
    """Decode a file path: only regular files are opened (a FIFO or device could block or never end)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"{desc}: not a regular file (device, FIFO or socket), refused")
        if st.st_size == 0:
            raise ImageDecodeError(f"{desc}: empty file (0 bytes), not an image")
        with open(path, "rb") as fp:
            return _decode_stream(fp, desc, max_pixels, max_seconds)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{desc}: file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{desc}: is a directory, not an image file") from None
    except OSError as e:
        raise ImageDecodeError(f"{desc}: cannot open file ({type(e).__name__}: {e})") from None


def _from_array(arr: np.ndarray, desc: str, max_pixels: int) -> Image.Image:
    """uint8 HxW / HxWx1 / HxWx3 / HxWx4 array -> RGB image (alpha dropped, like PIL RGBA -> RGB)."""
    if arr.dtype != np.uint8:
        raise ImageDecodeError(f"{desc}: unsupported array dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageDecodeError(f"{desc}: unsupported array shape {arr.shape}, expected HxW, HxWx1, HxWx3 or HxWx4")
    h, w = arr.shape[:2]
    if h * w > max_pixels:
        raise ImageDecodeError(f"{desc}: too many pixels: {w}x{h} = {w * h} > max_pixels={max_pixels}")
    if h * w == 0:
        raise ImageDecodeError(f"{desc}: image has zero size ({w}x{h})")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[arr.ndim if arr.ndim == 2 else arr.shape[2]]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode=mode))


def load_image(item: Any, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_seconds: float = DEFAULT_MAX_SECONDS) -> Image.Image:
    """Decode ``item`` into a new RGB PIL image (first frame, EXIF orientation applied).

    ``item`` may be a path (str / os.PathLike), encoded bytes (bytes / bytearray / memoryview), a PIL
    image or a uint8 numpy array (HxW, HxWx1, HxWx3, HxWx4). Mode conversion follows :func:`to_rgb`
    (HF-identical except for 16-bit, which is scaled ``>> 8``). Limits (see SECURITY.md): the declared
    size is checked against ``max_pixels`` before decoding; encoded inputs (paths, bytes) are decoded only
    by the plugins in :data:`DECODE_FORMATS` and within ``max_seconds``; paths must be regular files.
    Every failure raises :class:`ImageDecodeError` naming the input (``name`` if given) and the reason;
    no PIL/OS exception escapes.
    """
    desc = describe(item, name)
    if isinstance(item, (str, os.PathLike)):
        return _open_path(os.fspath(item), desc, max_pixels, max_seconds)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise ImageDecodeError(f"{desc}: empty input (0 bytes), not an image")
        return _decode_stream(io.BytesIO(data), desc, max_pixels, max_seconds)
    if isinstance(item, Image.Image):
        return _finish(item, desc, max_pixels)
    if isinstance(item, np.ndarray):
        return _from_array(item, desc, max_pixels)
    raise ImageDecodeError(f"unsupported input type {type(item).__name__}: expected a path, bytes, "
                           "PIL.Image.Image or uint8 numpy array")
