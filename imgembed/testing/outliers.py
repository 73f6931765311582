"""Outlier channels like those of trained transformers, added to a random-init model without changing it.

Trained ViTs and CLIP towers have a few hidden channels whose LayerNorm gamma/beta are tens of times larger
than the rest (Bondarenko et al. 2021; Wei et al. 2022, "Outlier Suppression"), so the inputs of the
q/k/v and fc1 MatMuls carry a few huge channels; random-init weights have none, and INT8 that passes on them
can fail on a real checkpoint. :func:`add_outlier_channels` gives a real architecture such channels in an
FP32-equivalent way: for every LayerNorm -> Linear pair (:func:`imgembed.export.smoothquant.norm_linear_pairs`)

* gamma and beta of ``n_channels`` channels (the same indices in every layer, as in trained models) are
  multiplied by ``scale``, and the matching input columns of the Linear weights divided by ``scale``;
* those channels also get an offset ``± offset * scale`` added to beta, compensated in the Linear biases
  (``b -= W[:, j] * delta_j``; skipped for a pair whose Linears lack a bias), as trained betas are not centred.

The norm's output gets outlier channels; every Linear output, hence the model's output, is unchanged up to
float rounding. The transformation is in the weights, so ``save_pretrained`` carries it into a checkpoint
that ``imgembed export --weights DIR`` exports like any other.

Not reproduced: the "massive activations" of the residual stream (Sun et al. 2024; Darcet et al. 2023).
The residual stream feeds LayerNorms, whose output depends on every channel's value (mean and variance), so
scaling a residual channel has no exact compensation; and imgembed's INT8 presets keep residual adds float.
"""
from __future__ import annotations

import torch

from imgembed.export.smoothquant import norm_linear_pairs, scale_channels


@torch.no_grad()
def add_outlier_channels(model: torch.nn.Module, n_channels: int = 4, scale: float = 40.0, offset: float = 1.0,
                         seed: int = 0) -> dict:
    """Give every LayerNorm -> Linear pair of ``model`` (an ``EmbeddingHead`` or transformers model)
    ``n_channels`` outlier channels, ``scale`` times larger, in place; see the module docstring. Returns a
    record: the number of pairs, the outlier channel indices per hidden size, scale and offset."""
    pairs = norm_linear_pairs(model)
    if not pairs:
        raise ValueError(f"{type(model).__name__} has no LayerNorm -> Linear pair to give outlier channels")
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, torch.Tensor] = {}
    for pair in pairs:
        width = pair.channels
        if width not in chosen:
            chosen[width] = torch.randperm(width, generator=gen)[:n_channels].sort().values
        idx = chosen[width]
        s = torch.ones(width)
        s[idx] = 1.0 / scale
        scale_channels(pair, s)  # norm output * scale, Linear columns / scale
        if pair.norm.bias is None or any(lin.bias is None for lin in pair.linears):
            continue
        delta = torch.zeros(width)
        signs = torch.randint(0, 2, (len(idx),), generator=gen).float() * 2 - 1
        delta[idx] = signs * offset * scale
        pair.norm.bias.add_(delta)
        for lin in pair.linears:
            lin.bias.sub_(lin.weight @ delta)
    return {"pairs": len(pairs), "channels": {w: i.tolist() for w, i in chosen.items()}, "scale": scale,
            "offset": offset}


@torch.no_grad()
def add_conv_channel_imbalance(model: torch.nn.Module, n_channels: int = 4, scale: float = 40.0,
                               seed: int = 0) -> dict:
    """Give a CNN the per-channel range imbalance of trained convolutional nets, without changing it.

    For every ``Conv -> BatchNorm -> ReLU -> Conv`` chain (Hugging Face ResNet-style ``convolution``,
    ``normalization``, ``activation`` blocks in sequence), ``n_channels`` output channels of the first get
    their BatchNorm gamma and beta multiplied by ``scale`` and the matching input channels of the next Conv
    divided by it: ReLU is positively homogeneous, so the function is unchanged up to float rounding, while
    those channels' weights (after BatchNorm folding) and activations become ``scale`` times larger, as in
    trained nets whose channel ranges differ by orders of magnitude (the case cross-layer equalization is
    for). Returns a record: the number of chains, scale and the channel indices per width.
    """
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, torch.Tensor] = {}
    chains = 0
    for block in model.modules():
        if not isinstance(block, torch.nn.Sequential):
            continue
        layers = [m for m in block if all(hasattr(m, a) for a in ("convolution", "normalization", "activation"))]
        for first, second in zip(layers, layers[1:], strict=False):
            bn, act, conv = first.normalization, first.activation, second.convolution
            if not isinstance(bn, torch.nn.BatchNorm2d) or not isinstance(act, torch.nn.ReLU) \
                    or conv.groups != 1 or conv.in_channels != bn.num_features:
                continue
            width = bn.num_features
            if width not in chosen:
                chosen[width] = torch.randperm(width, generator=gen)[:n_channels].sort().values
            idx = chosen[width]
            bn.weight[idx] *= scale
            bn.bias[idx] *= scale
            conv.weight[:, idx] /= scale
            chains += 1
    if not chains:
        raise ValueError(f"{type(model).__name__} has no Conv -> BatchNorm -> ReLU -> Conv chain to imbalance")
    return {"chains": chains, "scale": scale, "channels": {w: i.tolist() for w, i in chosen.items()}}
