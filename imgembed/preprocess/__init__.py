"""The one image-preprocessing implementation shared by every runtime backend (numpy + PIL only).

It reproduces the Hugging Face *slow* image processors of transformers 4.57 (``CLIPImageProcessor``,
``ViTImageProcessor``, ``BitImageProcessor``, ``ConvNextImageProcessor``, ``SiglipImageProcessor``) exactly,
step for step, and the semantics of DINOv3's torchvision-only processor closely (see
:mod:`imgembed.preprocess.processors`):

1. ``convert_to_rgb``: ``image.convert("RGB")`` (alpha is *dropped*, not composited; see :func:`to_rgb`);
2. resize the uint8 RGB image with PIL (``get_resize_output_image_size`` rounding for ``shortest_edge``;
   ConvNext's ``crop_pct`` logic): the processor record's resize plan;
3. center crop with HF's offsets (``(orig - crop) // 2``), zero padding when the crop is larger;
4. rescale in float64 then cast to float32, normalize ``(x - mean) / std`` in float32.

Step 4 is done with a 256-entry lookup table per channel, computed with exactly HF's dtypes and
operation order, so the output is bit-identical to HF's and costs one gather per pixel.

Deliberate deviations from HF (the first two documented on :func:`to_rgb`): 16-bit images are scaled
to 8 bit (``>> 8``) where PIL's ``convert("RGB")`` would clip them to 255, and images whose height is 1
or 3 are processed correctly, where HF's channel-dimension inference would mistake the height for
channels. A third, for inputs HF cannot process at all: when a shortest-edge resize would exceed 2**24 pixels
(aspect ratios beyond ~300:1, e.g. 1 x 100000 px, where HF allocates gigabytes), only the center-crop
region is resampled (:func:`~imgembed.preprocess.transforms.crop_of_resized`; within 2 levels of the full
resize on natural images).

Modules: :mod:`~imgembed.preprocess.spec` (the validated :class:`PreprocessSpec`),
:mod:`~imgembed.preprocess.processors` (one record per processor), :mod:`~imgembed.preprocess.presets`
(named specs for user modules: clip, imagenet), :mod:`~imgembed.preprocess.decode` (bounded decoding of
untrusted inputs to RGB), :mod:`~imgembed.preprocess.transforms` (resize, crop, normalise). This module
composes them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from imgembed.preprocess.decode import check_pixels, describe, load_image, to_rgb
from imgembed.preprocess.guard import DECODE_FORMATS, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SECONDS
from imgembed.preprocess.processors import SUPPORTED_PROCESSORS
from imgembed.preprocess.spec import PreprocessSpec
from imgembed.preprocess.transforms import RESAMPLE_CODES, center_crop, normalize_into, normalize_table, resize_and_crop

__all__ = [
    "DECODE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SECONDS",
    "PreprocessSpec",
    "RESAMPLE_CODES",
    "SUPPORTED_PROCESSORS",
    "center_crop",
    "check_pixels",
    "describe",
    "load_image",
    "normalize_into",
    "normalize_table",
    "preprocess",
    "preprocess_batch",
    "resize_crop",
    "resize_plan",
    "to_rgb",
]


def resize_plan(height: int, width: int, spec: PreprocessSpec) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(resize (H, W), center-crop (H, W) or None) of an input of the given size under ``spec``."""
    return spec.resize_plan(height, width)


def resize_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-3 (RGB, HF resize, HF center crop): uint8 HWC array of shape (*spec.output_hw, 3).

    The input of uint8 artifacts (which normalise inside the graph); :func:`preprocess` is this plus the LUT.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image (use load_image first), got {type(image).__name__}")
    img = to_rgb(image)
    resized, crop = spec.resize_plan(img.height, img.width)
    arr = resize_and_crop(img, resized, crop, spec.resample_code)
    if arr.shape[:2] != spec.output_hw:
        raise ValueError(f"internal error: produced {arr.shape[:2]}, expected output_hw {spec.output_hw}")
    return arr


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> float32 CHW array of shape (3, *spec.output_hw), identical to the HF processor."""
    out = np.empty((3, *spec.output_hw), dtype=np.float32)
    normalize_into(resize_crop(image, spec), spec, out)
    return out


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """PIL images -> contiguous float32 NCHW array of shape (N, 3, *spec.output_hw)."""
    out = np.empty((len(images), 3, *spec.output_hw), dtype=np.float32)
    for i, image in enumerate(images):
        normalize_into(resize_crop(image, spec), spec, out[i])
    return out
