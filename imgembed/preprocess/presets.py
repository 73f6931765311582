"""Named preprocessing for encoders that bring no ``preprocessor_config.json`` (``--preprocess clip|imagenet``).

Each preset is a :class:`~imgembed.preprocess.PreprocessSpec` of a supported Hugging Face processor, so it runs
on the one shared preprocessing path, scaled to the artifact's input size (the crop):

* ``clip``: OpenAI CLIP's processor: the shortest edge resized to the input size (bicubic), center crop,
  CLIP mean/std.
* ``imagenet``: torchvision's ImageNet evaluation transform (``Resize(256)``, ``CenterCrop(224)``, bilinear,
  ImageNet mean/std), the shortest edge resized to ``floor(input_size / 0.875)``.
"""
from __future__ import annotations

import math
from typing import Callable

from imgembed.errors import RegistryError
from imgembed.preprocess.processors import IMAGENET_DEFAULT, OPENAI_CLIP
from imgembed.preprocess.spec import PreprocessSpec

IMAGENET_CROP_PCT = 0.875  # 224 of 256


def _clip(size: int) -> PreprocessSpec:
    return PreprocessSpec(processor="CLIPImageProcessor", size={"shortest_edge": size}, resample="bicubic",
                          crop_size={"height": size, "width": size}, crop_pct=None,
                          image_mean=OPENAI_CLIP[0], image_std=OPENAI_CLIP[1])


def _imagenet(size: int) -> PreprocessSpec:
    return PreprocessSpec(processor="BitImageProcessor", size={"shortest_edge": math.floor(size / IMAGENET_CROP_PCT)},
                          resample="bilinear", crop_size={"height": size, "width": size}, crop_pct=None,
                          image_mean=IMAGENET_DEFAULT[0], image_std=IMAGENET_DEFAULT[1])


PRESETS: dict[str, Callable[[int], PreprocessSpec]] = {"clip": _clip, "imagenet": _imagenet}


def preset(name: str, input_size: int) -> PreprocessSpec:
    """The preset ``name`` at ``input_size`` (the crop, in pixels)."""
    if name not in PRESETS:
        raise RegistryError(f"unknown preprocessing preset {name!r}; expected one of {list(PRESETS)}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise RegistryError(f"input size {input_size!r} must be a positive integer (pixels)")
    return PRESETS[name](input_size)
