"""Small user-written encoders for the bring-your-own-encoder tests (importable as ``tests.byo_models:NAME``).

A convolutional autoencoder whose encoder is exported, a siamese embedding net whose shared twin (a tiny
transformer) is exported, and factories that break the contract in each way the export must name.
"""
from __future__ import annotations

import torch
from torch import nn

DIM = 64


class ConvAutoencoder(nn.Module):
    """Encoder: convs + pooling + linear -> DIM; decoder: back to a 32 x 32 image (trained as a pair)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, dim))
        self.decoder = nn.Sequential(
            nn.Linear(dim, 32 * 8 * 8), nn.Unflatten(1, (32, 8, 8)), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Twin(nn.Module):
    """Patch embedding + one pre-norm transformer layer + mean pooling + projection."""

    def __init__(self, width: int = 32, dim: int = 32, patch: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.block(self.patch(x).flatten(2).transpose(1, 2))
        return self.proj(self.norm(tokens.mean(dim=1)))


class SiameseNet(nn.Module):
    """Two images through one shared twin; trained on the distance of the pair."""

    def __init__(self):
        super().__init__()
        self.twin = Twin()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pairwise_distance(self.twin(a), self.twin(b))


def conv_encoder() -> nn.Module:
    return ConvAutoencoder().encoder


def siamese_twin() -> nn.Module:
    return SiameseNet().twin


class DepthwiseSeparable(nn.Module):
    """A small EfficientNet-Lite-like net (imgembed.testing.efficientnet_lite at random weights): ReLU6, TF
    "SAME" padding (an explicit Pad before each stride-2 depthwise conv), inverted residual blocks; the linear
    bottleneck of the first block has one channel :data:`OUTLIER` times the others' range (the next block's
    input weights divided by it, so the function is a plain random net): one per-tensor activation scale
    leaves the other channels a few levels, and ReLU6 blocks cross-layer equalization."""

    OUTLIER = 300.0

    def __init__(self):
        super().__init__()
        from imgembed.testing.efficientnet_lite import MBConv, SameConv

        self.stem = nn.Sequential(SameConv(3, 16, 3, 2, 64), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(MBConv(16, 24, 3, 2, 4, 32), MBConv(24, 24, 3, 1, 4, 16),
                                    MBConv(24, 40, 5, 2, 4, 16))
        self.head = nn.Sequential(SameConv(40, 64, 1, 1, 8), nn.BatchNorm2d(64), nn.ReLU6())
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):  # trained-like statistics: BN is folded into the convs
                    m.running_var.uniform_(0.5, 2.0)
                    m.bias.uniform_(-0.5, 0.5)
            first, second = self.blocks[0], self.blocks[1]
            first._bn2.weight[0] *= self.OUTLIER
            first._bn2.bias[0] *= self.OUTLIER
            second._expand_conv.weight[:, 0] /= self.OUTLIER
            second.skip = False  # the residual would carry the outlier channel on unscaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))


def depthwise_separable() -> nn.Module:
    return DepthwiseSeparable()


# ------------------------------------------------------------------------------------------ broken factories
def raising_factory() -> nn.Module:
    raise RuntimeError("no GPU here")


def not_a_module() -> dict:
    return {"encoder": "nope"}


def feature_map_encoder() -> nn.Module:
    """(N, 8, H/2, W/2): forgot to pool."""
    return nn.Conv2d(3, 8, 3, stride=2, padding=1)


def tuple_encoder() -> nn.Module:
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))

    return TwoOutputs()


NOT_CALLABLE = 3
