"""Resize, center crop and normalisation on uint8 RGB images (PIL + numpy), as the HF slow processors do them.

Every function here is a small transform over PIL images or numpy arrays; which ones apply to a registry
entry is decided by its processor record (:mod:`imgembed.preprocess.processors`), never by name here.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from imgembed.preprocess.spec import PreprocessSpec

RESAMPLE_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values

# Shortest-edge resizes that would exceed this many pixels resample only the center-crop region.
MAX_RESIZE_PIXELS = 1 << 24

HW = tuple[int, int]


def shortest_edge_hw(height: int, width: int, size: int) -> HW:
    """HF ``get_resize_output_image_size(default_to_square=False)``: short edge -> size, int() the long."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def plan_size_then_crop(height: int, width: int, spec: "PreprocessSpec") -> tuple[HW, HW | None]:
    """CLIP / Bit / ViT / SigLIP / DINOv3: resize to ``size`` (shortest edge or H x W), then the optional crop."""
    size = spec.size
    crop = (spec.crop_size["height"], spec.crop_size["width"]) if spec.crop_size else None
    if "shortest_edge" in size:
        return shortest_edge_hw(height, width, size["shortest_edge"]), crop
    return (size["height"], size["width"]), crop


def plan_crop_pct(height: int, width: int, spec: "PreprocessSpec") -> tuple[HW, HW | None]:
    """ConvNext: below 384 px, resize the short edge to ``size / crop_pct`` and center-crop ``size``;
    from 384 px on, warp to ``size`` x ``size`` without a crop."""
    se = spec.size["shortest_edge"]
    if se >= 384:
        return (se, se), None
    return shortest_edge_hw(height, width, int(se / spec.crop_pct)), (se, se)


def center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF ``center_crop`` on an HxWxC array, including its zero padding when the crop is larger."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = arr
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _filter_window(lo: float, hi: float, scale: float, size: int) -> tuple[int, int]:
    """Source index range that PIL's filters (support <= 3, widened by ``scale`` when shrinking) read for
    the source interval [lo, hi), with a safety margin, clipped to the image."""
    support = 3 * max(scale, 1.0) + 2
    return max(0, math.floor(lo - support)), min(size, math.ceil(hi + support))


def crop_of_resized(img: Image.Image, resized: HW, crop: HW, resample: int) -> np.ndarray:
    """HF's center crop of ``img.resize(resized)`` without materialising the (huge) resized image.

    Used when a shortest-edge resize of an extreme aspect ratio (e.g. 1 x 100000 px) would allocate
    gigabytes. Output pixel (r, c) is resized pixel (top + r, left + c), zero outside the resized image,
    which is exactly :func:`center_crop` with its padding. Only the source window the filter reads is cut
    out and resampled with a ``box`` in two single-axis passes (horizontal, then vertical). PIL may order
    the passes of a full 2-D resize the other way, and rounds between them, so pixels match the full
    resize within 2 levels on natural images (nearest: within a 1-pixel shift), not bit for bit.
    """
    (rh, rw), (ch, cw) = resized, crop
    top, left = (rh - ch) // 2, (rw - cw) // 2
    r0, r1, c0, c1 = max(top, 0), min(top + ch, rh), max(left, 0), min(left + cw, rw)
    sy, sx = img.height / rh, img.width / rw
    ya, yb = _filter_window(r0 * sy, r1 * sy, sy, img.height)
    xa, xb = _filter_window(c0 * sx, c1 * sx, sx, img.width)
    strip = img.crop((xa, ya, xb, yb))
    strip = strip.resize((c1 - c0, strip.height), resample, box=(c0 * sx - xa, 0, c1 * sx - xa, strip.height))
    strip = strip.resize((c1 - c0, r1 - r0), resample, box=(0, r0 * sy - ya, c1 - c0, r1 * sy - ya))
    out = np.zeros((ch, cw, 3), np.uint8)
    out[r0 - top:r1 - top, c0 - left:c1 - left] = np.asarray(strip)
    return out


def resize_and_crop(img: Image.Image, resized: HW, crop: HW | None, resample: int) -> np.ndarray:
    """``img`` (RGB) resized to ``resized`` (H, W) with PIL, then HF's center crop: uint8 HWC."""
    rh, rw = resized
    if crop is not None and rh * rw > MAX_RESIZE_PIXELS:  # extreme aspect ratio: bound the memory
        return crop_of_resized(img, resized, crop, resample)
    arr = np.asarray(img.resize((rw, rh), resample=resample))
    return center_crop(arr, *crop) if crop is not None else arr


@lru_cache(maxsize=64)
def normalize_table(scale: float, mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) float32 table of HF's rescale (float64, cast to float32) + float32 normalize per uint8 value."""
    x = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    lut = (x[None, :] - m) / s
    lut.setflags(write=False)
    return lut


def normalize_into(crops: np.ndarray, spec: "PreprocessSpec", out: np.ndarray) -> None:
    """HF rescale + normalize of uint8 ``(..., H, W, 3)`` crops into float32 ``out`` ``(..., 3, H, W)``."""
    lut = normalize_table(spec.rescale_factor, spec.image_mean, spec.image_std)
    for c in range(3):
        np.take(lut[c], crops[..., c], out=out[..., c, :, :], mode="clip")  # uint8 indices: always valid
