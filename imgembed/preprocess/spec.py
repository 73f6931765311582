"""``PreprocessSpec``: the validated, frozen description of one model's preprocessing.

It mirrors one Hugging Face image processor (see :mod:`imgembed.preprocess.processors` for the supported
ones): ``size`` / ``crop_size`` use HF's dict conventions, ``crop_pct`` is ConvNext's. Every invalid
value raises :class:`~imgembed.errors.RegistryError` naming the field and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from imgembed.errors import RegistryError
from imgembed.preprocess.processors import (
    CROP_PCT,
    CROP_SIZE,
    HEIGHT_WIDTH,
    PROCESSORS,
    UNSUPPORTED_HINTS,
    Processor,
    processor,
)
from imgembed.preprocess.transforms import RESAMPLE_CODES

_RESAMPLE_NAMES = {code: name for name, code in RESAMPLE_CODES.items()}


def _is_pos_int(v: Any) -> bool:
    """True for a positive int (bools excluded)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _check_hw_dict(field: str, value: Any, allowed: tuple[frozenset, ...]) -> dict:
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


def _check_crop(proc: Processor, size: dict, crop_size: Any) -> dict | None:
    """crop_size is only for processors that center-crop, and required after a shortest-edge resize."""
    if crop_size is not None:
        if proc.crop != CROP_SIZE:
            raise RegistryError(f"preprocess field 'crop_size': got {crop_size!r}, but {proc.name} "
                                "does not center-crop; expected None")
        return _check_hw_dict("crop_size", crop_size, (HEIGHT_WIDTH,))
    if "shortest_edge" in size and proc.crop != CROP_PCT:
        raise RegistryError(f"preprocess field 'crop_size': got None with size={size!r}; resizing the "
                            "shortest edge without a crop gives a variable output shape, expected a "
                            '{"height": H, "width": W} crop_size')
    return None


def _check_crop_pct(proc: Processor, cp: Any) -> float | None:
    """crop_pct must be a number in (0, 1] for ConvNext and None for every other processor."""
    if proc.crop != CROP_PCT:
        if cp is not None:
            raise RegistryError(f"preprocess field 'crop_pct': got {cp!r}, but only ConvNextImageProcessor "
                                f"uses it ({proc.name}); expected None")
        return None
    if isinstance(cp, bool) or not isinstance(cp, (int, float)) or not (0 < cp <= 1):
        raise RegistryError(f"preprocess field 'crop_pct': got {cp!r}, expected a number in (0, 1] "
                            f"for {proc.name}")
    return float(cp)


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an RGB image into the model's input tensor; mirrors one HF image processor."""

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
        proc = processor(self.processor)
        if self.resample not in RESAMPLE_CODES:
            raise RegistryError(f"preprocess field 'resample': got {self.resample!r}, "
                                f"expected one of {list(RESAMPLE_CODES)}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("size", _check_hw_dict("size", self.size, proc.sizes))
        set_("crop_size", _check_crop(proc, self.size, self.crop_size))
        set_("crop_pct", _check_crop_pct(proc, self.crop_pct))
        set_("image_mean", _check_triple("image_mean", self.image_mean, positive=False))
        set_("image_std", _check_triple("image_std", self.image_std, positive=True))
        rf = self.rescale_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not (math.isfinite(rf) and rf > 0):
            raise RegistryError(f"preprocess field 'rescale_factor': got {rf!r}, expected a finite number > 0")
        set_("rescale_factor", float(rf))

    def __hash__(self) -> int:
        """Hash over the normalised fields (the dict fields would make the generated hash fail)."""
        return hash((self.processor, tuple(self.size.items()), self.resample,
                     tuple(self.crop_size.items()) if self.crop_size else None, self.crop_pct,
                     self.image_mean, self.image_std, self.rescale_factor))

    @property
    def record(self) -> Processor:
        """The :class:`~imgembed.preprocess.processors.Processor` record of :attr:`processor`."""
        return processor(self.processor)

    @property
    def resample_code(self) -> int:
        """PIL's resampling filter number."""
        return RESAMPLE_CODES[self.resample]

    def resize_plan(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(resize (H, W), center-crop (H, W) or None) for an input of the given size, as HF computes them."""
        return self.record.plan(height, width, self)

    @property
    def output_hw(self) -> tuple[int, int]:
        """(H, W) of the tensor the model receives."""
        resized, crop = self.resize_plan(1000, 1000)  # the output size does not depend on the input's
        return crop if crop is not None else resized

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
        processor, an int ``size`` means ``shortest_edge`` (a square for fixed-size processors), missing
        keys take the HF constructor defaults, ``do_normalize=False`` becomes mean 0 / std 1 and
        ``do_rescale=False`` a rescale_factor of 1.
        """
        if not isinstance(cfg, dict):
            raise RegistryError(f"HF preprocessor config: got {type(cfg).__name__}, expected a mapping")
        proc = processor(_hf_processor_name(cfg))
        if not cfg.get("do_resize", True):
            raise RegistryError(f"HF preprocessor config: do_resize=False is not supported ({proc.name}); "
                                "a fixed input size is required")
        size = _hf_size_dict("size", cfg.get("size", proc.default_size), square=proc.int_size_square)
        crop = None
        if proc.crop == CROP_SIZE and cfg.get("do_center_crop", proc.default_center_crop):
            crop = _hf_size_dict("crop_size", cfg.get("crop_size") or 224, square=True)
        crop_pct = None
        if proc.crop == CROP_PCT:
            crop_pct = cfg.get("crop_pct") if cfg.get("crop_pct") is not None else 224 / 256
        mean, std = _hf_mean_std(cfg, proc.default_mean_std)
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        return cls(processor=proc.name, size=size, resample=_hf_resample(cfg.get("resample", proc.default_resample)),
                   crop_size=crop, crop_pct=crop_pct, image_mean=mean, image_std=std, rescale_factor=rescale)

    def hf_kwargs(self) -> dict:
        """Kwargs such that ``getattr(transformers, spec.record.hf_class)(**spec.hf_kwargs())`` is equivalent."""
        return self.record.hf_kwargs(self)


def _hf_processor_name(cfg: dict) -> str:
    """Map image_processor_type / feature_extractor_type (incl. legacy and Fast names) to a slow class name."""
    raw = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if not isinstance(raw, str):
        raise RegistryError("HF preprocessor config: no 'image_processor_type' or 'feature_extractor_type' "
                            f"(got keys {sorted(cfg)})")
    name = (raw[:-4] if raw.endswith("Fast") else raw).replace("FeatureExtractor", "ImageProcessor")
    if name not in PROCESSORS:
        hint = f" ({UNSUPPORTED_HINTS[name]})" if name in UNSUPPORTED_HINTS else ""
        raise RegistryError(f"HF preprocessor config: processor type {raw!r} is not supported{hint}; "
                            f"expected one of {list(PROCESSORS)}")
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
