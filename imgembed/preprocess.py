"""The one image-preprocessing implementation shared by every runtime backend (numpy + PIL only).

It reproduces the Hugging Face *slow* image processors of transformers 4.57 (``CLIPImageProcessor``,
``ViTImageProcessor``, ``BitImageProcessor``, ``ConvNextImageProcessor``) exactly, step for step:

1. ``convert_to_rgb``: ``image.convert("RGB")`` (alpha is *dropped*, not composited; see :func:`to_rgb`);
2. resize the uint8 RGB image with PIL (``get_resize_output_image_size`` rounding for ``shortest_edge``;
   ConvNext's ``crop_pct`` logic);
3. center crop with HF's offsets (``(orig - crop) // 2``), zero padding when the crop is larger;
4. rescale in float64 then cast to float32, normalize ``(x - mean) / std`` in float32.

Step 4 is done with a 256-entry lookup table per channel, computed with exactly HF's dtypes and
operation order, so the output is bit-identical to HF's and costs one gather per pixel.

Deliberate deviations from HF (the first two documented on :func:`to_rgb`): 16-bit images are scaled
to 8 bit (``>> 8``) where PIL's ``convert("RGB")`` would clip them to 255, and images whose height is 1
or 3 are processed correctly, where HF's channel-dimension inference would mistake the height for
channels. A third, for inputs HF cannot process at all: when a shortest-edge resize would exceed 2**24 pixels
(aspect ratios beyond ~300:1, e.g. 1 x 100000 px, where HF allocates gigabytes), only the center-crop
region is resampled (:func:`_crop_of_resized`; within 2 levels of the full resize on natural images).

Decoding untrusted inputs is bounded (pixel cap before decoding, per-item deadline, allow-listed PIL
plugins, regular files only); the limits live in :mod:`imgembed.decode_guard` and SECURITY.md.
"""
from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgembed.decode_guard import (DECODE_FORMATS, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SECONDS, DeadlineReader,
                                   DecodeTimeout, decode_formats, unidentified_error)
from imgembed.errors import ImageDecodeError, RegistryError

__all__ = [
    "DECODE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SECONDS",
    "PreprocessSpec",
    "RESAMPLE_CODES",
    "SUPPORTED_PROCESSORS",
    "load_image",
    "preprocess",
    "preprocess_batch",
    "resize_crop",
    "to_rgb",
]

SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "ViTImageProcessor", "BitImageProcessor", "ConvNextImageProcessor")
RESAMPLE_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values
_RESAMPLE_NAMES = {code: name for name, code in RESAMPLE_CODES.items()}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# Shortest-edge resizes that would exceed this many pixels resample only the center-crop region.
_MAX_RESIZE_PIXELS = 1 << 24

_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Constructor defaults of the HF classes, used by from_hf_config for keys a config omits.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224}, resample=3, do_center_crop=True, crop_size=224,
                               mean_std=_OPENAI_CLIP, int_size_square=False),
    "BitImageProcessor": dict(size={"shortest_edge": 224}, resample=3, do_center_crop=True, crop_size=224,
                              mean_std=_OPENAI_CLIP, int_size_square=False),
    "ViTImageProcessor": dict(size={"height": 224, "width": 224}, resample=2, do_center_crop=False,
                              crop_size=None, mean_std=_IMAGENET_STANDARD, int_size_square=True),
    "ConvNextImageProcessor": dict(size={"shortest_edge": 384}, resample=2, do_center_crop=False,
                                   crop_size=None, mean_std=_IMAGENET_STANDARD, int_size_square=False),
}


# --------------------------------------------------------------------------------------------- spec
def _is_pos_int(v: Any) -> bool:
    """True for a positive int (bools excluded)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _check_hw_dict(field: str, value: Any, allowed: tuple[set[str], ...]) -> dict:
    """Validate a HF size dict (``{"shortest_edge": N}`` / ``{"height": H, "width": W}``); return a clean copy."""
    shapes = " or ".join("{" + ", ".join(f'"{k}": int' for k in sorted(a)) + "}" for a in allowed)
    if not isinstance(value, dict) or set(value) not in allowed:
        raise RegistryError(f"preprocess field {field!r}: got {value!r}, expected {shapes}")
    bad = {k: v for k, v in value.items() if not _is_pos_int(v)}
    if bad:
        raise RegistryError(f"preprocess field {field!r}: got {value!r}, values must be positive integers "
                            f"(bad: {bad})")
    return {k: int(value[k]) for k in sorted(value)}


def _check_triple(field: str, value: Any, positive: bool) -> tuple[float, float, float]:
    """Validate a per-channel (R, G, B) float triple such as image_mean / image_std."""
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RegistryError(f"preprocess field {field!r}: got {value!r}, expected 3 numbers (R, G, B)") from None
    if len(vals) != 3 or isinstance(value, (str, bytes)):
        raise RegistryError(f"preprocess field {field!r}: got {value!r} (length {len(vals)}), "
                            "expected exactly 3 numbers (R, G, B)")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in vals):
        need = "finite and > 0" if positive else "finite"
        raise RegistryError(f"preprocess field {field!r}: got {value!r}, every value must be {need}")
    return vals  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an RGB image into the model's input tensor; mirrors one HF slow image processor.

    ``size`` / ``crop_size`` use HF's dict conventions; ``crop_pct`` is only meaningful (and then
    required) for ``ConvNextImageProcessor``. Invalid values raise :class:`RegistryError`.
    """

    processor: str
    size: dict
    resample: str
    crop_size: dict | None
    crop_pct: float | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        """Validate every field and normalise containers (lists -> tuples, dict copies, int values)."""
        if self.processor not in SUPPORTED_PROCESSORS:
            raise RegistryError(f"preprocess field 'processor': got {self.processor!r}, "
                                f"expected one of {list(SUPPORTED_PROCESSORS)}")
        if self.resample not in RESAMPLE_CODES:
            raise RegistryError(f"preprocess field 'resample': got {self.resample!r}, "
                                f"expected one of {list(RESAMPLE_CODES)}")
        se, hw = {"shortest_edge"}, {"height", "width"}
        allowed = {"ViTImageProcessor": (hw,), "ConvNextImageProcessor": (se,)}.get(self.processor, (se, hw))
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("size", _check_hw_dict("size", self.size, allowed))
        if self.crop_size is not None:
            if self.processor in ("ViTImageProcessor", "ConvNextImageProcessor"):
                raise RegistryError(f"preprocess field 'crop_size': got {self.crop_size!r}, but {self.processor} "
                                    "does not center-crop; expected None")
            set_("crop_size", _check_hw_dict("crop_size", self.crop_size, (hw,)))
        elif "shortest_edge" in self.size and self.processor != "ConvNextImageProcessor":
            raise RegistryError(f"preprocess field 'crop_size': got None with size={self.size!r}; resizing the "
                                "shortest edge without a crop gives a variable output shape, expected a "
                                '{"height": H, "width": W} crop_size')
        set_("crop_pct", self._checked_crop_pct())
        set_("image_mean", _check_triple("image_mean", self.image_mean, positive=False))
        set_("image_std", _check_triple("image_std", self.image_std, positive=True))
        rf = self.rescale_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not (math.isfinite(rf) and rf > 0):
            raise RegistryError(f"preprocess field 'rescale_factor': got {rf!r}, expected a finite number > 0")
        set_("rescale_factor", float(rf))

    def _checked_crop_pct(self) -> float | None:
        """crop_pct must be a number in (0, 1] for ConvNext and None for every other processor."""
        cp = self.crop_pct
        if self.processor != "ConvNextImageProcessor":
            if cp is not None:
                raise RegistryError(f"preprocess field 'crop_pct': got {cp!r}, but only ConvNextImageProcessor "
                                    f"uses it ({self.processor}); expected None")
            return None
        if isinstance(cp, bool) or not isinstance(cp, (int, float)) or not (0 < cp <= 1):
            raise RegistryError(f"preprocess field 'crop_pct': got {cp!r}, expected a number in (0, 1] "
                                "for ConvNextImageProcessor")
        return float(cp)

    def __hash__(self) -> int:
        """Hash over the normalised fields (the dict fields would make the generated hash fail)."""
        return hash((self.processor, tuple(self.size.items()), self.resample,
                     tuple(self.crop_size.items()) if self.crop_size else None, self.crop_pct,
                     self.image_mean, self.image_std, self.rescale_factor))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """Build from a YAML/JSON mapping with the field names as keys (lists are fine for mean/std)."""
        if not isinstance(d, dict):
            raise RegistryError(f"preprocess spec: got {type(d).__name__} {d!r}, expected a mapping")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names), key=str)
        if unknown:
            raise RegistryError(f"preprocess spec: unknown key(s) {unknown}; allowed keys are {names}")
        missing = [n for n in ("processor", "size", "resample", "image_mean", "image_std") if n not in d]
        if missing:
            raise RegistryError(f"preprocess spec: missing required key(s) {missing}")
        kw = dict(d)
        kw.setdefault("crop_size", None)
        kw.setdefault("crop_pct", None)
        return cls(**kw)

    def to_dict(self) -> dict:
        """JSON-serialisable mapping that round-trips through :meth:`from_dict`."""
        return {
            "processor": self.processor,
            "size": dict(self.size),
            "resample": self.resample,
            "crop_size": dict(self.crop_size) if self.crop_size else None,
            "crop_pct": self.crop_pct,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
        }

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "PreprocessSpec":
        """Build from a ``preprocessor_config.json`` dict (or an HF processor's ``to_dict()``).

        Follows the HF class semantics: legacy ``*FeatureExtractor`` / ``*Fast`` names map to the slow
        processor, an int ``size`` means ``shortest_edge`` (a square for ViT), missing keys take the HF
        constructor defaults, ``do_normalize=False`` becomes mean 0 / std 1 and ``do_rescale=False`` a
        rescale_factor of 1.
        """
        if not isinstance(cfg, dict):
            raise RegistryError(f"HF preprocessor config: got {type(cfg).__name__}, expected a mapping")
        proc = _hf_processor_name(cfg)
        dflt = _HF_DEFAULTS[proc]
        if not cfg.get("do_resize", True):
            raise RegistryError(f"HF preprocessor config: do_resize=False is not supported ({proc}); "
                                "a fixed input size is required")
        size = _hf_size_dict("size", cfg.get("size", dflt["size"]), square=dflt["int_size_square"])
        crop = None
        if proc in ("CLIPImageProcessor", "BitImageProcessor") and cfg.get("do_center_crop", True):
            crop = _hf_size_dict("crop_size", cfg.get("crop_size") or dflt["crop_size"], square=True)
        crop_pct = None
        if proc == "ConvNextImageProcessor":
            crop_pct = cfg.get("crop_pct") if cfg.get("crop_pct") is not None else 224 / 256
        mean, std = _hf_mean_std(cfg, dflt["mean_std"])
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        return cls(processor=proc, size=size, resample=_hf_resample(cfg.get("resample", dflt["resample"])),
                   crop_size=crop, crop_pct=crop_pct, image_mean=mean, image_std=std, rescale_factor=rescale)

    def hf_kwargs(self) -> dict:
        """Kwargs such that ``getattr(transformers, self.processor)(**spec.hf_kwargs())`` is equivalent."""
        kw: dict[str, Any] = dict(
            do_resize=True, size=dict(self.size), resample=RESAMPLE_CODES[self.resample], do_rescale=True,
            rescale_factor=self.rescale_factor, do_normalize=True, image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )
        if self.processor in ("CLIPImageProcessor", "BitImageProcessor"):
            kw["do_center_crop"] = self.crop_size is not None
            if self.crop_size is not None:
                kw["crop_size"] = dict(self.crop_size)
        if self.processor == "ConvNextImageProcessor":
            kw["crop_pct"] = self.crop_pct
        else:
            kw["do_convert_rgb"] = True
        return kw

    @property
    def output_hw(self) -> tuple[int, int]:
        """(H, W) of the tensor the model receives."""
        if self.processor == "ConvNextImageProcessor":
            se = self.size["shortest_edge"]
            return se, se
        hw = self.crop_size if self.crop_size is not None else self.size
        return hw["height"], hw["width"]


def _hf_processor_name(cfg: dict) -> str:
    """Map image_processor_type / feature_extractor_type (incl. legacy and Fast names) to a slow class."""
    raw = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if not isinstance(raw, str):
        raise RegistryError("HF preprocessor config: no 'image_processor_type' or 'feature_extractor_type' "
                            f"(got keys {sorted(cfg)})")
    name = raw[:-4] if raw.endswith("Fast") else raw
    name = name.replace("FeatureExtractor", "ImageProcessor")
    if name not in SUPPORTED_PROCESSORS:
        raise RegistryError(f"HF preprocessor config: processor type {raw!r} is not supported; "
                            f"expected one of {list(SUPPORTED_PROCESSORS)}")
    return name


def _hf_size_dict(field: str, size: Any, square: bool) -> Any:
    """Mirror transformers' ``get_size_dict`` for the legacy int / (h, w) forms; dicts pass through."""
    if isinstance(size, dict):
        return dict(size)
    if isinstance(size, int) and not isinstance(size, bool):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    raise RegistryError(f"HF preprocessor config: {field}={size!r} is not an int, [h, w] or size dict")


def _hf_resample(value: Any) -> str:
    """Map a PIL resample int (or a name) to one of :data:`RESAMPLE_CODES`."""
    if isinstance(value, str) and value in RESAMPLE_CODES:
        return value
    if isinstance(value, (int, np.integer)) and int(value) in _RESAMPLE_NAMES:
        return _RESAMPLE_NAMES[int(value)]
    raise RegistryError(f"HF preprocessor config: resample={value!r} is not supported; expected one of "
                        f"{sorted(_RESAMPLE_NAMES)} ({', '.join(f'{c}={n}' for c, n in _RESAMPLE_NAMES.items())})")


def _hf_mean_std(cfg: dict, default: tuple) -> tuple[Any, Any]:
    """image_mean / image_std with HF defaults, scalar broadcast and do_normalize=False handling."""
    if not cfg.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    out = []
    for key, dflt in (("image_mean", default[0]), ("image_std", default[1])):
        v = cfg.get(key)
        v = dflt if v is None else v
        out.append((float(v),) * 3 if isinstance(v, (int, float)) else v)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- decoding
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
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.clip(np.asarray(img), 0, 65535) >> 8  # in the input's dtype: no 8-byte-per-pixel copy
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def _describe(item: Any, name: str | None) -> str:
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


def _check_pixels(img: Image.Image, desc: str, max_pixels: int) -> None:
    """Decompression-bomb guard on the declared size (call before decoding)."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"{desc}: too many pixels: {w}x{h} = {w * h} > max_pixels={max_pixels}")
    if w * h == 0:
        raise ImageDecodeError(f"{desc}: image has zero size ({w}x{h})")


def _finish(img: Image.Image, desc: str, max_pixels: int) -> Image.Image:
    """Size-check, decode (first frame), apply EXIF orientation and convert to RGB; wrap every failure."""
    _check_pixels(img, desc, max_pixels)
    try:
        img.load()
    except (ImageDecodeError, DecodeTimeout):
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error...
        raise ImageDecodeError(f"{desc}: truncated or corrupt image data ({type(e).__name__}: {e})") from None
    try:
        out = to_rgb(ImageOps.exif_transpose(img))
        return out if out is not img else img.copy()
    except DecodeTimeout:
        raise
    except Exception as e:
        raise ImageDecodeError(f"{desc}: cannot orient / convert mode {img.mode} to RGB "
                               f"({type(e).__name__}: {e})") from None


def _decode_stream(fp: Any, desc: str, max_pixels: int, max_seconds: float) -> Image.Image:
    """Decode an open binary stream with the allowed PIL plugins, within ``max_seconds``."""
    reader = DeadlineReader(fp, max_seconds)
    timeout = ImageDecodeError(f"{desc}: decoding took longer than max_seconds={max_seconds:g}; refused "
                               "(time bound per item)")
    try:
        with Image.open(reader, formats=decode_formats()) as img:  # type: ignore[arg-type]
            out = _finish(img, desc, max_pixels)
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
    desc = _describe(item, name)
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


# ------------------------------------------------------------------------------------ preprocessing
def _shortest_edge_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """HF ``get_resize_output_image_size(default_to_square=False)``: short edge -> size, int() the long."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _resize_plan(height: int, width: int, spec: PreprocessSpec) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(resize (H, W), center-crop (H, W) or None) for an input of the given size, as HF computes them."""
    size = spec.size
    if spec.processor == "ConvNextImageProcessor":
        se = size["shortest_edge"]
        if se >= 384:
            return (se, se), None
        return _shortest_edge_hw(height, width, int(se / spec.crop_pct)), (se, se)
    crop = (spec.crop_size["height"], spec.crop_size["width"]) if spec.crop_size else None
    if "shortest_edge" in size:
        return _shortest_edge_hw(height, width, size["shortest_edge"]), crop
    return (size["height"], size["width"]), crop


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
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


def _crop_of_resized(img: Image.Image, resized: tuple[int, int], crop: tuple[int, int], resample: int) -> np.ndarray:
    """HF's center crop of ``img.resize(resized)`` without materialising the (huge) resized image.

    Used when a shortest-edge resize of an extreme aspect ratio (e.g. 1 x 100000 px) would allocate
    gigabytes. Output pixel (r, c) is resized pixel (top + r, left + c), zero outside the resized image,
    which is exactly :func:`_center_crop` with its padding. Only the source window the filter reads is cut
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


@lru_cache(maxsize=64)
def _lut(scale: float, mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) float32 table of HF's rescale (float64, cast to float32) + float32 normalize per uint8 value."""
    x = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    lut = (x[None, :] - m) / s
    lut.setflags(write=False)
    return lut


def resize_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-3 (RGB, HF resize, HF center crop): uint8 HWC array of shape (*spec.output_hw, 3).

    The input of uint8 artifacts (which normalise inside the graph); :func:`preprocess` is this plus the LUT.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image (use load_image first), got {type(image).__name__}")
    img = to_rgb(image)
    (rh, rw), crop = _resize_plan(img.height, img.width, spec)
    resample = RESAMPLE_CODES[spec.resample]
    if crop is not None and rh * rw > _MAX_RESIZE_PIXELS:  # extreme aspect ratio: bound the memory
        arr = _crop_of_resized(img, (rh, rw), crop, resample)
    else:
        arr = np.asarray(img.resize((rw, rh), resample=resample))
        if crop is not None:
            arr = _center_crop(arr, *crop)
    if arr.shape[:2] != spec.output_hw:
        raise ValueError(f"internal error: produced {arr.shape[:2]}, expected output_hw {spec.output_hw}")
    return arr


def normalize_into(crops: np.ndarray, spec: PreprocessSpec, out: np.ndarray) -> None:
    """HF rescale + normalize of uint8 ``(..., H, W, 3)`` crops into float32 ``out`` ``(..., 3, H, W)``."""
    lut = _lut(spec.rescale_factor, spec.image_mean, spec.image_std)
    for c in range(3):
        np.take(lut[c], crops[..., c], out=out[..., c, :, :], mode="clip")  # uint8 indices: always valid


def _preprocess_into(image: Image.Image, spec: PreprocessSpec, out: np.ndarray) -> None:
    """Write the CHW float32 tensor for ``image`` into ``out`` (shape (3, H, W))."""
    normalize_into(resize_crop(image, spec), spec, out)


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> float32 CHW array of shape (3, *spec.output_hw), identical to the HF processor."""
    out = np.empty((3, *spec.output_hw), dtype=np.float32)
    _preprocess_into(image, spec, out)
    return out


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """PIL images -> contiguous float32 NCHW array of shape (N, 3, *spec.output_hw)."""
    out = np.empty((len(images), 3, *spec.output_hw), dtype=np.float32)
    for i, image in enumerate(images):
        _preprocess_into(image, spec, out[i])
    return out
