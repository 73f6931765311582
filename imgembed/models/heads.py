"""The PyTorch wrappers whose single output *is* the embedding (torch is imported here, and only here):
:class:`EmbeddingHead` around a transformers model, :class:`ModuleHead` around a user's own module."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from imgembed.models.registry import ModelSpec


class EmbeddingHead(torch.nn.Module):
    """Wrap a transformers model so that ``forward(pixel_values) -> (N, dim)`` is the embedding.

    Output selection, pooling and L2 normalisation are inside the module, so they are inside every exported
    graph and every backend returns the same vector.
    """

    def __init__(self, model: torch.nn.Module, spec: "ModelSpec"):
        super().__init__()
        self.model = model
        self.output = spec.embedding.output
        self.pooling = spec.embedding.pooling
        self.normalize = spec.embedding.normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = getattr(self.model(pixel_values=pixel_values), self.output)
        if self.pooling == "cls":
            x = x[:, 0]
        elif self.pooling == "mean":
            x = x[:, 1:].mean(dim=1)
        elif self.pooling == "gap":
            x = x.mean(dim=(2, 3))
        x = x.flatten(1)
        if self.normalize:
            x = torch.nn.functional.normalize(x, p=2.0, dim=-1)
        return x


class ModuleHead(torch.nn.Module):
    """Wrap a user's module that maps ``(N, 3, H, W)`` float pixels to ``(N, D)`` vectors.

    The output is cast to float32 and, when ``normalize``, L2-normalised inside the module, so the exported
    graph and the parity reference compute the same thing. The shape contract is checked before export
    (:func:`imgembed.models.user_module.check_output`), not here.
    """

    def __init__(self, module: torch.nn.Module, normalize: bool):
        super().__init__()
        self.module = module
        self.normalize = normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.module(pixel_values).float()
        if self.normalize:
            x = torch.nn.functional.normalize(x, p=2.0, dim=-1)
        return x
