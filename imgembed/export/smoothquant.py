"""SmoothQuant scale migration (Xiao et al. 2023) on an export copy, in PyTorch, exact in FP32.

Trained ViTs and CLIP towers carry a few LayerNorm output channels tens of times larger than the rest. Static
INT8 with one activation scale per tensor then spends its 256 levels on those channels and rounds every
other channel to a handful of levels. For each LayerNorm -> Linear pair (:func:`norm_linear_pairs`) the
migration divides output channel ``j`` of the norm by ``s_j`` (gamma and beta) and multiplies input column
``j`` of the Linear weights by ``s_j``: the function is unchanged up to float rounding, and the difficulty
moves from the activations to the (per-channel quantized) weights::

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

``max|X_j|`` is collected with forward hooks on the calibration images. Only pre-norm pairs whose norm
output feeds nothing but the listed Linears are touched, so the transformation is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

# (norm, the Linears it feeds) as attribute paths inside one transformer layer, per family (transformers 4.57)
PAIR_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),        # clip, siglip
    ("layer_norm2", ("mlp.fc1",)),                                                          # clip, siglip
    ("layernorm_before", ("attention.attention.query", "attention.attention.key",           # vit
                          "attention.attention.value")),
    ("layernorm_after", ("intermediate.dense",)),                                           # vit
    ("norm1", ("attention.attention.query", "attention.attention.key",                     # dinov2(-reg)
               "attention.attention.value")),
    ("norm1", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),                # dinov3
    ("norm2", ("mlp.fc1",)),                                                                # dinov2(-reg)
    ("norm2", ("mlp.weights_in",)),                                                         # dinov2 SwiGLU
    ("norm2", ("mlp.gate_proj", "mlp.up_proj")),                                            # dinov3 gated
    ("norm2", ("mlp.up_proj",)),                                                            # dinov3
    ("layernorm", ("mlp.fc1",)),                                                            # siglip pooling head
)
ALPHAS = (0.5, 0.65, 0.8)


@dataclass(frozen=True)
class NormLinears:
    """One LayerNorm and the Linear layers that consume its output (and nothing else)."""

    name: str
    norm: torch.nn.LayerNorm
    linears: tuple[torch.nn.Linear, ...]

    @property
    def channels(self) -> int:
        return self.norm.normalized_shape[-1]

    def weight_absmax(self) -> torch.Tensor:
        """max |W[:, j]| over every consuming Linear, per input channel ``j``."""
        return torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in self.linears]).amax(dim=0)


def _resolve(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def norm_linear_pairs(model: torch.nn.Module) -> list[NormLinears]:
    """Every LayerNorm -> Linear(s) pair of ``model`` matched by :data:`PAIR_PATTERNS` (first match per norm)."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        for norm_path, linear_paths in PAIR_PATTERNS:
            norm = _resolve(module, norm_path)
            linears = [_resolve(module, p) for p in linear_paths]
            if (not isinstance(norm, torch.nn.LayerNorm) or id(norm) in seen or norm.weight is None
                    or not all(isinstance(lin, torch.nn.Linear) for lin in linears)):
                continue
            seen.add(id(norm))
            out.append(NormLinears(f"{prefix}.{norm_path}".lstrip("."), norm, tuple(linears)))
    return out


@torch.no_grad()
def scale_channels(pair: NormLinears, s: torch.Tensor) -> None:
    """Divide the norm's output channels by ``s`` and multiply the Linears' input columns by ``s`` (in place;
    the composition is unchanged up to float rounding)."""
    s = s.to(pair.norm.weight.dtype)
    pair.norm.weight.div_(s)
    if pair.norm.bias is not None:
        pair.norm.bias.div_(s)
    for lin in pair.linears:
        lin.weight.mul_(s[None, :])


@torch.no_grad()
def activation_absmax(model: torch.nn.Module, pairs: list[NormLinears],
                      batches: Iterable[np.ndarray]) -> list[torch.Tensor]:
    """max |norm output| per channel of each pair over ``batches`` (forward hooks on the norms)."""
    stats = [torch.zeros(p.channels) for p in pairs]

    def hook(i: int):
        def record(_module, _inputs, output):
            stats[i] = torch.maximum(stats[i], output.detach().abs().flatten(0, -2).amax(dim=0).float())
        return record

    handles = [p.norm.register_forward_hook(hook(i)) for i, p in enumerate(pairs)]
    try:
        for batch in batches:
            model(torch.from_numpy(np.ascontiguousarray(batch)))
    finally:
        for h in handles:
            h.remove()
    return stats


def migration_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel scale ``max|X|^alpha / max|W|^(1-alpha)`` (dead channels keep 1)."""
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def smooth(model: torch.nn.Module, x_absmax: list[torch.Tensor], alpha: float,
           pairs: list[NormLinears] | None = None) -> dict:
    """Migrate activation outliers of ``model``'s norm -> Linear pairs into the weights, in place. ``x_absmax``
    comes from :func:`activation_absmax` on the same pairs (before smoothing). Returns a record."""
    pairs = norm_linear_pairs(model) if pairs is None else pairs
    if len(pairs) != len(x_absmax):
        raise ValueError(f"{len(x_absmax)} activation statistics for {len(pairs)} norm -> Linear pairs")
    spread_before, spread_after = [], []
    for pair, x in zip(pairs, x_absmax, strict=True):
        s = migration_scales(x, pair.weight_absmax(), alpha)
        scale_channels(pair, s)
        spread_before.append(float(x.max() / x.median().clamp(min=1e-12)))
        spread_after.append(float((x / s).max() / (x / s).median().clamp(min=1e-12)))
    return {"method": "smoothquant", "alpha": alpha, "pairs": len(pairs),
            "activation_max_over_median": {"before": round(max(spread_before, default=0.0), 2),
                                           "after": round(max(spread_after, default=0.0), 2)}}


@torch.no_grad()
def simulate_int8(model: torch.nn.Module, batches: list[np.ndarray]) -> np.ndarray:
    """``model``'s outputs with every Linear computed as static Q/DQ would (``static-qdq-matmul``): inputs
    fake-quantized to uint8 with one min/max range per tensor calibrated on ``batches``, weights to
    symmetric int8 per output channel. Changes ``model``'s weights: pass a copy. Ranks smoothing alphas
    without an ONNX export per alpha (activation-activation MatMuls do not depend on alpha)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ranges = {id(m): [0.0, 0.0] for m in linears}

    def observe(module, args):
        r = ranges[id(module)]
        r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))

    def fake_quant(module, args):
        lo, hi = ranges[id(module)]
        scale = max(hi - lo, 1e-12) / 255.0
        zero = round(-lo / scale)
        return (torch.clamp(torch.round(args[0] / scale) + zero, 0, 255) - zero) * scale,

    def run(hook) -> np.ndarray:
        handles = [m.register_forward_pre_hook(hook) for m in linears]
        try:
            return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(b))).numpy() for b in batches])
        finally:
            for h in handles:
                h.remove()

    run(observe)
    for m in linears:
        w_scale = m.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        m.weight.copy_(torch.clamp(torch.round(m.weight / w_scale), -127, 127) * w_scale)
    return run(fake_quant)
