"""One record per supported image processor: what its spec may say, its HF defaults, how it resizes.

A processor name is the Hugging Face *slow* class name (``image_processor_type`` in a checkpoint's
``preprocessor_config.json``, without a ``Fast`` suffix). Adding a processor is one :class:`Processor`
entry; nothing else in the package branches on names.

``DINOv3ViTImageProcessor`` has no slow class in transformers (only the torchvision-based
``DINOv3ViTImageProcessorFast``). Its semantics are a 224 x 224 bilinear resize with antialiasing, no crop,
rescale by 1/255 and ImageNet mean/std. HF rescales to float first and resizes the float image with
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``; here the uint8 image is resized with
PIL's bilinear filter (the same triangle kernel, widened by the scale factor when shrinking) and rounded
to uint8 before the rescale, so every backend shares one uint8 path. The residual is that rounding (at
most half a level before normalisation) plus PIL's fixed-point filter coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from imgembed.errors import RegistryError
from imgembed.preprocess.transforms import plan_crop_pct, plan_size_then_crop

SHORTEST_EDGE = frozenset({"shortest_edge"})
HEIGHT_WIDTH = frozenset({"height", "width"})

OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

CROP_NONE, CROP_SIZE, CROP_PCT = "none", "crop_size", "crop_pct"  # how a processor center-crops


@dataclass(frozen=True)
class Processor:
    """Facts about one HF image processor class."""

    name: str
    sizes: tuple[frozenset, ...]       # allowed ``size`` dict shapes
    crop: str                          # CROP_NONE | CROP_SIZE (optional crop_size) | CROP_PCT (ConvNext)
    plan: Callable                     # (height, width, spec) -> (resize (H, W), crop (H, W) or None)
    default_size: dict                 # HF constructor defaults, used for keys a preprocessor config omits
    default_resample: int
    default_mean_std: tuple
    int_size_square: bool = False      # an int ``size`` means H = W = size (else shortest_edge = size)
    default_center_crop: bool = False
    hf_class: str | None = None        # slow transformers class with the same semantics, None if there is none
    convert_rgb_kwarg: bool = True     # the HF class takes ``do_convert_rgb``

    def hf_kwargs(self, spec: Any) -> dict:
        """Kwargs for ``getattr(transformers, self.hf_class)`` equivalent to ``spec``."""
        kw: dict[str, Any] = dict(
            do_resize=True, size=dict(spec.size), resample=spec.resample_code, do_rescale=True,
            rescale_factor=spec.rescale_factor, do_normalize=True, image_mean=list(spec.image_mean),
            image_std=list(spec.image_std),
        )
        if self.crop == CROP_SIZE:
            kw["do_center_crop"] = spec.crop_size is not None
            if spec.crop_size is not None:
                kw["crop_size"] = dict(spec.crop_size)
        if self.crop == CROP_PCT:
            kw["crop_pct"] = spec.crop_pct
        if self.convert_rgb_kwarg:
            kw["do_convert_rgb"] = True
        return kw


def _fixed(name: str, resample: int, mean_std: tuple, hf_class: str | None) -> Processor:
    """A processor that resizes to a fixed H x W and does not crop (ViT, SigLIP, DINOv3)."""
    return Processor(name, (HEIGHT_WIDTH,), CROP_NONE, plan_size_then_crop, {"height": 224, "width": 224},
                     resample, mean_std, int_size_square=True, hf_class=hf_class)


def _resize_crop(name: str) -> Processor:
    """A processor that resizes (shortest edge or H x W), then optionally center-crops (CLIP, Bit)."""
    return Processor(name, (SHORTEST_EDGE, HEIGHT_WIDTH), CROP_SIZE, plan_size_then_crop, {"shortest_edge": 224},
                     3, OPENAI_CLIP, default_center_crop=True, hf_class=name)


PROCESSORS: dict[str, Processor] = {p.name: p for p in (
    _resize_crop("CLIPImageProcessor"),
    _resize_crop("BitImageProcessor"),
    _fixed("ViTImageProcessor", 2, IMAGENET_STANDARD, "ViTImageProcessor"),
    _fixed("SiglipImageProcessor", 3, IMAGENET_STANDARD, "SiglipImageProcessor"),
    _fixed("DINOv3ViTImageProcessor", 2, IMAGENET_DEFAULT, None),
    Processor("ConvNextImageProcessor", (SHORTEST_EDGE,), CROP_PCT, plan_crop_pct, {"shortest_edge": 384}, 2,
              IMAGENET_STANDARD, hf_class="ConvNextImageProcessor", convert_rgb_kwarg=False),
)}
SUPPORTED_PROCESSORS = tuple(PROCESSORS)

# Processor types found in preprocessor configs that have no fixed input size.
UNSUPPORTED_HINTS = {
    "Siglip2ImageProcessor": "it is NaFlex (variable patch count per image, pixel_attention_mask and "
                             "spatial_shapes inputs); fixed-resolution SigLIP 2 checkpoints use SiglipImageProcessor",
}


def processor(name: str) -> Processor:
    """The record of ``name``; unknown names raise RegistryError listing the supported ones."""
    try:
        return PROCESSORS[name]
    except KeyError:
        hint = f" ({UNSUPPORTED_HINTS[name]})" if name in UNSUPPORTED_HINTS else ""
        raise RegistryError(f"preprocess field 'processor': got {name!r}{hint}, "
                            f"expected one of {list(SUPPORTED_PROCESSORS)}") from None
