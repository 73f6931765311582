"""Decode + resize + center-crop to the model's uint8 input, in one of two modes.

``exact``  :func:`imgembed.preprocess.load_image` then :func:`~imgembed.preprocess.resize_crop`: bit-identical
           to the Hugging Face processor (the parity gate's path; the default everywhere).
``fast``   for large JPEGs, reduced-size decoding (libjpeg DCT scaling through PIL's ``Image.draft``) that
           keeps the decoded short edge at least ``DRAFT_FACTOR`` (2) times the resize target's, so the final
           bicubic/bilinear resize still down-samples; EXIF orientation is applied as in ``exact``. For every
           input, the resize reads only the center-crop region (``resize(box=...)``, the same filter taps as
           a full resize) with ``reducing_gap=1`` (PIL first box-reduces by the integer part of the scale, so
           a 2x-drafted JPEG is halved by ``Image.reduce`` and the bicubic filter only does the last <2x).
           Crops differ from exact ones by about one grey level on average; speed and agreement are
           measured in docs/performance.md ("Fast end-to-end embedding") and tests/test_decode_fast.py.

Both modes return the same thing: a uint8 ``(H, W, 3)`` crop of the model's input size. Float inputs are
made from crops with the HF-identical lookup table (:func:`crops_to_pixels`), uint8 artifacts take the crops
as they are. Failures are :class:`~imgembed.errors.ImageDecodeError` naming the input, as in ``load_image``;
the fast path falls back to the exact decoder for anything that is not a plain JPEG, and every decode limit
(pixel cap before decoding, per-item deadline, regular files only) applies to both.
"""
from __future__ import annotations

import io
import math
import os
import stat
from typing import Any, Sequence

import numpy as np
from PIL import Image

from imgembed.errors import ImageDecodeError
from imgembed.preprocess import RESAMPLE_CODES, PreprocessSpec, load_image, normalize_into, resize_crop, to_rgb
from imgembed.preprocess import center_crop as _center_crop
from imgembed.preprocess import check_pixels as _check_pixels
from imgembed.preprocess import describe as _describe
from imgembed.preprocess import resize_plan as _resize_plan
from imgembed.preprocess.decode import finish_opened
from imgembed.preprocess.guard import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SECONDS, DeadlineReader, DecodeTimeout

DECODE_MODES = ("exact", "fast")
DRAFT_FACTOR = 2.0     # drafted short edge >= DRAFT_FACTOR x the resize target's short edge
REDUCING_GAP = 1.0     # PIL: box-reduce by int(scale / REDUCING_GAP) first, then resample the rest
_JPEG_MAGIC = b"\xff\xd8\xff"


def check_mode(mode: str) -> str:
    """``mode`` if it is a decode mode, else ValueError naming the valid ones."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}; expected one of {list(DECODE_MODES)}")
    return mode


def load_crop(item: Any, spec: PreprocessSpec, mode: str = "exact", *, name: str | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS, max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode ``item`` (path, bytes, PIL image, uint8 array) into the uint8 ``(H, W, 3)`` model-input crop."""
    if check_mode(mode) == "exact":
        return resize_crop(load_image(item, name=name, max_pixels=max_pixels, max_seconds=max_seconds), spec)
    img = None
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
        img = _draft_jpeg(item, spec, _describe(item, name), max_pixels, max_seconds)
    if img is None:
        img = load_image(item, name=name, max_pixels=max_pixels, max_seconds=max_seconds)
    return fast_resize_crop(img, spec)


def draft_request(width: int, height: int, spec: PreprocessSpec, factor: float = DRAFT_FACTOR) -> tuple[int, int]:
    """The (w, h) to ask ``Image.draft`` for: ``factor`` x the resize target in each direction (draft then
    picks the largest DCT scale 1/2, 1/4, 1/8 that stays at or above it; never more than the full size)."""
    (rh, rw), _ = _resize_plan(height, width, spec)
    k = min(1.0, factor * max(rw / width, rh / height))
    return max(1, math.ceil(width * k)), max(1, math.ceil(height * k))


def _regular_file(path: str | bytes) -> bool:
    """A non-empty regular file (anything else goes to the exact decoder, which names the problem)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def _draft_jpeg(item: Any, spec: PreprocessSpec, desc: str, max_pixels: int, max_seconds: float) -> Image.Image | None:
    """A JPEG path/bytes decoded at reduced DCT scale (RGB, EXIF-oriented); None when ``item`` is not a plain
    JPEG, so the caller uses the exact decoder (which also reports any problem with the input)."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not _regular_file(path):
            return None
        with open(path, "rb") as fp:
            return _draft_stream(fp, spec, desc, max_pixels, max_seconds)
    data = bytes(item)
    return _draft_stream(io.BytesIO(data), spec, desc, max_pixels, max_seconds) if data else None


def _draft_stream(fp: Any, spec: PreprocessSpec, desc: str, max_pixels: int, max_seconds: float) -> Image.Image | None:
    """Open ``fp`` as a JPEG (header only), check its declared size, draft, decode within the deadline."""
    if fp.read(3) != _JPEG_MAGIC:
        return None
    fp.seek(0)
    reader = DeadlineReader(fp, max_seconds)
    try:
        img = Image.open(reader, formats=("JPEG",))  # type: ignore[arg-type]
    except Exception:  # corrupt header: the exact decoder produces the typed error
        return None
    with img:
        _check_pixels(img, desc, max_pixels)
        img.draft("RGB", draft_request(img.width, img.height, spec))
        try:
            out = finish_opened(img, desc, max_pixels)  # decode, EXIF orientation, RGB (no copy)
        except DecodeTimeout:
            reader.expired = True
            out = None
    if reader.expired:
        raise ImageDecodeError(f"{desc}: decoding took longer than max_seconds={max_seconds:g}; refused "
                               "(time bound per item)")
    return out


def fast_resize_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """HF's resize + center crop computed on ``image`` with PIL's fast options: only the crop box is
    resampled, with ``reducing_gap``. uint8 ``(H, W, 3)``; within a few levels of :func:`resize_crop`."""
    img = to_rgb(image)
    (rh, rw), crop = _resize_plan(img.height, img.width, spec)
    resample = RESAMPLE_CODES[spec.resample]
    if crop is None:
        return np.asarray(img.resize((rw, rh), resample, reducing_gap=REDUCING_GAP))
    (ch, cw), top, left = crop, (rh - crop[0]) // 2, (rw - crop[1]) // 2
    if top < 0 or left < 0:  # the crop pads: resize everything, then HF's padded crop
        return _center_crop(np.asarray(img.resize((rw, rh), resample, reducing_gap=REDUCING_GAP)), ch, cw)
    sx, sy = img.width / rw, img.height / rh
    box = (left * sx, top * sy, min((left + cw) * sx, img.width), min((top + ch) * sy, img.height))
    return np.asarray(img.resize((cw, ch), resample, box=box, reducing_gap=REDUCING_GAP))


def crops_to_pixels(crops: np.ndarray | Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` crops -> float32 ``(N, 3, H, W)`` rescaled and normalised exactly as HF does
    (the 256-entry lookup table of :mod:`imgembed.preprocess`)."""
    crops = np.asarray(crops) if not isinstance(crops, np.ndarray) else crops
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"crops must be uint8 (N, H, W, 3), got {crops.dtype} {crops.shape}")
    out = np.empty((crops.shape[0], 3, *crops.shape[1:3]), np.float32)
    normalize_into(crops, spec, out)
    return out


def crops_of(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """The exact uint8 ``(N, H, W, 3)`` crops of decoded images (the uint8 parity set)."""
    out = np.empty((len(images), *spec.output_hw, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = resize_crop(image, spec)
    return out
