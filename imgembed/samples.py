"""Built-in sample images: real photos shipped by scikit-image, plus odd sizes and colour modes.

Used as the fixed parity set (every export is checked on it) and as the default INT8 calibration set.
Nothing is downloaded: only images that scikit-image ships inside its wheel are used.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

# Colour photographs and textures shipped in scikit-image's wheel.
_RGB = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
        "retina")
_GRAY = ("camera", "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell")


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


@functools.lru_cache(maxsize=1)
def parity_images() -> tuple[tuple[str, Image.Image], ...]:
    """The fixed parity set: (name, PIL image) pairs, 26 images of varied content, size and mode."""
    out: list[tuple[str, Image.Image]] = []
    for n in _RGB:
        out.append((n, Image.fromarray(_skimage(n))))
    for n in _GRAY:
        out.append((f"{n}-L", Image.fromarray(_skimage(n)).convert("L")))
    astro = _skimage("astronaut")
    out.append(("astronaut-37x500", Image.fromarray(np.ascontiguousarray(astro[100:137, :500]))))
    out.append(("astronaut-640x23", Image.fromarray(np.ascontiguousarray(np.repeat(astro[:320, 200:223], 2, 0)))))
    out.append(("coffee-small-60x90", Image.fromarray(_skimage("coffee")).resize((90, 60), Image.BILINEAR)))
    out.append(("logo-RGBA", Image.fromarray(_skimage("logo"), "RGBA")))
    out.append(("chelsea-P", Image.fromarray(_skimage("chelsea")).quantize(64)))
    out.append(("rocket-flipped", Image.fromarray(_skimage("rocket")[:, ::-1].copy())))
    out.append(("astronaut-rot90", Image.fromarray(np.rot90(astro).copy())))
    out.append(("hubble-crop", Image.fromarray(_skimage("hubble_deep_field")[200:700, 300:900].copy())))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def calibration_images() -> tuple[Image.Image, ...]:
    """Default INT8 calibration set: the colour photos, plus crops and flips of them (32 images)."""
    images: list[Image.Image] = []
    for n in _RGB:
        a = _skimage(n)
        h, w = a.shape[:2]
        images.append(Image.fromarray(a))
        images.append(Image.fromarray(a[:, ::-1].copy()))
        images.append(Image.fromarray(a[: h * 2 // 3, : w * 2 // 3].copy()))
        images.append(Image.fromarray(a[h // 3:, w // 3:].copy()))
    return tuple(images)
