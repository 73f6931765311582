"""Built-in sample images: real photos shipped by scikit-image, plus odd sizes and colour modes.

Used as the fixed parity set (every export is checked on it) and as the default INT8 calibration set.
Nothing is downloaded: only images that scikit-image ships inside its wheel are used.
"""
from __future__ import annotations

import functools
import io

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


@functools.lru_cache(maxsize=1)
def heldout_images() -> tuple[tuple[str, Image.Image], ...]:
    """Images in neither the parity nor the calibration set (53), for checking that a recipe fitted to the
    calibration images generalises (``benchmarks/real_weights.py``; no export uses them): scikit-image's other
    pictures (a stereo photo pair, a retina close-up, three faces, a binary silhouette, a checkerboard, a
    phantom), the colour photos JPEG-recompressed, zoomed and darkened, and the grayscale photos zoomed and at
    half size (textures at other scales)."""
    import skimage.data

    def rgb(a: np.ndarray) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")

    left, right, _ = skimage.data.stereo_motorcycle()
    out = [("motorcycle-left", rgb(left)), ("motorcycle-right", rgb(right)),
           ("microaneurysms", rgb(skimage.data.microaneurysms())),
           ("horse", rgb((~skimage.data.horse()).astype(np.uint8) * 255)),
           ("checkerboard", rgb(skimage.data.checkerboard())),
           ("phantom", rgb((skimage.data.shepp_logan_phantom() * 255).astype(np.uint8)))]
    faces = skimage.data.lfw_subset()
    for i in (0, 50, 120):
        out.append((f"face-{i}", rgb((faces[i] * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC)))
    rng = np.random.default_rng(0)
    for n in _RGB:
        a = _skimage(n)[..., :3]
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=40)
        out.append((f"{n}-jpeg40", Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        h, w = a.shape[:2]
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        out.append((f"{n}-zoom", rgb(a[y:y + h // 2, x:x + w // 2])))
        out.append((f"{n}-dark", rgb((a * 0.5).astype(np.uint8))))
    for n in _GRAY:
        a = _skimage(n)
        a = a[..., 0] if a.ndim == 3 else a
        h, w = a.shape
        out.append((f"{n}-zoom-L", Image.fromarray(np.ascontiguousarray(a[h // 4: 3 * h // 4, w // 4: 3 * w // 4]))))
        out.append((f"{n}-half-L", Image.fromarray(a).resize((w // 2, h // 2), Image.BILINEAR)))
    return tuple(out)


# Captions of the text parity gate: ordinary captions for the neighbour metric, plus the edge cases every text
# tower must survive: empty, punctuation only, non-ASCII scripts and accents, emoji, and one caption longer
# than any tokenizer's limit (77 CLIP / 64 SigLIP tokens) so truncation is exercised.
_SUBJECTS = ("a cat", "two dogs", "a red bicycle", "an astronaut", "a cup of coffee", "a rocket", "a coin",
             "a clock tower", "a grey brick wall", "the moon", "a printed page of text", "a colour wheel")
_SETTINGS = ("at night", "on a sunny beach", "in the snow", "on a wooden table", "in a busy city street",
             "under a microscope")


def parity_captions() -> tuple[str, ...]:
    """The fixed caption set of the text parity gate (edge cases first, then 24 ordinary captions)."""
    long = ("a very long caption that keeps going " + " ".join(f"word{i}" for i in range(120))
            + " and ends far past the token limit of every text tower")
    edge = ("", "!!! ??? ... ;-)", "a photo of a cat", "A PHOTO OF A CAT", "Ein Foto einer Katze im Café",
            "猫の写真", "фотография кошки", "🚲 at night 🌙", "  leading and trailing spaces  ", long)
    ordinary = tuple(f"a photo of {s} {p}" for i, s in enumerate(_SUBJECTS) for p in _SETTINGS[i % 2::3])
    return edge + ordinary


def calibration_captions() -> tuple[str, ...]:
    """Captions for static INT8 calibration of a text tower (disjoint wording from the parity set)."""
    styles = ("a photo of {}", "a blurry photo of {}", "a close-up of {} {}", "a drawing of {} {}",
              "there is {} {}, seen from above", "{} {}")
    out = []
    for i, subject in enumerate(_SUBJECTS):
        for j, style in enumerate(styles):
            setting = _SETTINGS[(i + j) % len(_SETTINGS)]
            out.append(style.format(subject, setting) if style.count("{}") == 2 else style.format(subject))
    return tuple(out)
