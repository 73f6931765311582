"""Per-family facts and the PyTorch originals.

A family is a flat record (Optimum's per-architecture spec, without the inheritance): which transformers
classes build it, and which ONNX Runtime transformer optimizer applies. :func:`load_original` builds the
PyTorch original of a registry entry from one of three sources:

* the Hugging Face hub (``spec.source``; real code path for users with internet),
* a local directory written by ``save_pretrained`` (``weights=DIR``),
* the real architecture with random weights from the registry's ``arch`` (``random_init=True``), seeded
  so that the same original can be rebuilt later (``imgembed parity`` re-runs need it).

:class:`EmbeddingHead` wraps the model so that its single output *is* the embedding (output selection,
pooling and L2 normalisation are inside the exported graph, so every backend returns the same vector).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError
from .registry import ModelSpec

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Family:
    config_class: str      # transformers config class of the image encoder
    model_class: str       # transformers model class whose outputs hold the embedding
    ort_model_type: str | None  # onnxruntime.transformers.optimizer model_type, None = no transformer fusion
    is_transformer: bool


FAMILY = {
    "clip": Family("CLIPVisionConfig", "CLIPVisionModelWithProjection", "clip", True),
    "vit": Family("ViTConfig", "ViTModel", "vit", True),
    "dinov2": Family("Dinov2Config", "Dinov2Model", "vit", True),
    "resnet": Family("ResNetConfig", "ResNetModel", None, False),
}


def _transformers_attr(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _config_from_dir(spec: ModelSpec, weights: Path) -> Any:
    """Read ``config.json`` of a local checkpoint; a full CLIP checkpoint yields its vision config."""
    cfg_path = weights / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{weights}: no config.json; expected a directory written by save_pretrained") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{cfg_path}: unreadable config ({e})") from None
    cfg_cls = _transformers_attr(FAMILY[spec.family].config_class)
    if spec.family == "clip" and raw.get("model_type") == "clip":
        vision = dict(raw.get("vision_config") or {})
        # the top-level projection_dim sizes visual_projection; vision_config's copy may be a stale default
        vision["projection_dim"] = raw.get("projection_dim", vision.get("projection_dim", 512))
        return cfg_cls(**vision)
    return cfg_cls.from_pretrained(str(weights))


def _from_pretrained(model_cls: Any, source: str, **kw: Any) -> Any:
    """``model_cls.from_pretrained`` under imgembed's safe-loading policy (see SECURITY.md).

    Weights come from safetensors, or from a pickle-based ``pytorch_model.bin`` only through
    ``torch.load(weights_only=True)`` (tensors and primitive containers; no code runs). TF/Flax
    conversion is off, and ``model_cls`` is a concrete transformers class, so no remote code is ever
    imported (``trust_remote_code`` does not exist on this path).
    """
    return model_cls.from_pretrained(source, weights_only=True, from_tf=False, from_flax=False, **kw)


def _build(spec: ModelSpec, weights: str | Path | None, random_init: bool, seed: int, attn: str) -> Any:
    """The transformers model of ``spec``: seeded random init, a local save_pretrained dir, or the hub."""
    fam = FAMILY[spec.family]
    model_cls = _transformers_attr(fam.model_class)
    extra = {"attn_implementation": attn} if fam.is_transformer else {}
    if random_init:
        config = _transformers_attr(fam.config_class)(**dict(spec.arch), **extra)
        torch.manual_seed(seed)
        return model_cls(config)
    if weights is not None:
        path = Path(weights)
        if not path.is_dir():
            raise WeightsError(f"weights directory {path} does not exist (expected a save_pretrained directory)")
        config = _config_from_dir(spec, path)
        if fam.is_transformer:
            config._attn_implementation = attn
        # With a safetensors file present, never look at a .bin beside it.
        safetensors = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
        try:
            return _from_pretrained(model_cls, str(path), config=config, use_safetensors=safetensors or None,
                                    **extra)
        except (OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{path}: cannot load weights ({type(e).__name__}: {e}); expected model.safetensors "
                               "or a pytorch_model.bin loadable with torch.load(weights_only=True)") from None
    if spec.source is None:
        raise WeightsError(f"model {spec.name!r} has no weight source; pass --random-init or --weights DIR")
    try:
        return _from_pretrained(model_cls, spec.source.hub, revision=spec.source.revision, **extra)
    except OSError as e:
        raise WeightsError(
            f"could not load {spec.source.hub}@{spec.source.revision} from the Hugging Face hub ({e}). "
            "Offline? Pass --weights DIR (a save_pretrained directory) or --random-init."
        ) from None


def load_original(spec: ModelSpec, weights: str | Path | None = None, random_init: bool = False,
                  seed: int = DEFAULT_SEED, attn: str = "eager") -> EmbeddingHead:
    """The PyTorch original of ``spec`` as an :class:`EmbeddingHead` in eval mode (CPU, float32).

    ``attn="eager"`` keeps attention as plain MatMul/Softmax so ONNX Runtime can fuse it after export.
    """
    if weights is not None and random_init:
        raise WeightsError("pass either weights=DIR or random_init=True, not both")
    model = _build(spec, weights, random_init, seed, attn)
    return EmbeddingHead(model.eval(), spec).eval()


def source_record(spec: ModelSpec, weights: str | Path | None, random_init: bool,
                  seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """How the original was obtained, for the manifest and for rebuilding it in ``imgembed parity``."""
    if random_init:
        return {"kind": "random-init", "seed": seed, "arch": dict(spec.arch)}
    if weights is not None:
        return {"kind": "local", "path": str(Path(weights).resolve())}
    assert spec.source is not None
    return {"kind": "hub", "repo": spec.source.hub, "revision": spec.source.revision}


@torch.no_grad()
def fold_layer_scale(head: "EmbeddingHead") -> int:
    """Fold DINOv2's LayerScale into the preceding Linear (lambda*(xW+b) = x(lambda*W) + lambda*b).

    Exact up to float rounding; it lets ONNX Runtime's attention/skip-layernorm fusion match DINOv2 like
    ViT. Changes ``head`` in place; returns the number of folded scales. Only used on export copies.
    """
    folded = 0
    for layer in getattr(getattr(head.model, "encoder", None), "layer", []):
        pairs = [(getattr(layer, "layer_scale1", None), layer.attention.output.dense),
                 (getattr(layer, "layer_scale2", None), getattr(layer.mlp, "fc2", None))]
        for scale, linear in pairs:
            if scale is None or linear is None or not hasattr(scale, "lambda1"):
                continue
            lam = scale.lambda1.detach()
            linear.weight.mul_(lam[:, None])
            if linear.bias is not None:
                linear.bias.mul_(lam)
            scale.lambda1.fill_(1.0)
            folded += 1
    for layer in getattr(getattr(head.model, "encoder", None), "layer", []):
        for attr in ("layer_scale1", "layer_scale2"):
            if hasattr(getattr(layer, attr, None), "lambda1") and bool((getattr(layer, attr).lambda1 == 1).all()):
                setattr(layer, attr, torch.nn.Identity())
    return folded


@torch.no_grad()
def freeze_position_embeddings(head: "EmbeddingHead", input_hw: tuple[int, int]) -> bool:
    """Precompute DINOv2's interpolated position embeddings for the fixed input size.

    DINOv2 checkpoints carry a 37x37 (518 px) grid that is bicubically interpolated on every forward; traced,
    that is a Resize node run at every inference, and ONNX's cubic resize is a known source of mismatch
    (antialias, border handling). PyTorch computes the table once here, with its own kernel, and the graph
    gets a constant. Valid because artifacts have a fixed input size. Returns True if applied.
    """
    emb = getattr(head.model, "embeddings", None)
    if emb is None or not hasattr(emb, "interpolate_pos_encoding"):
        return False
    h, w = input_hw
    patches = (h // emb.patch_size) * (w // emb.patch_size)
    dummy = torch.zeros(1, patches + 1, emb.position_embeddings.shape[-1])
    table = emb.interpolate_pos_encoding(dummy, h, w).detach().clone()

    def frozen(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if (height, width) != (h, w):  # internal invariant: artifacts have one input size
            raise ValueError(f"position embeddings were frozen for {h}x{w}, got {height}x{width}")
        return table.to(embeddings.dtype)

    emb.interpolate_pos_encoding = frozen
    return True


class EmbeddingHead(torch.nn.Module):
    """Wrap a transformers model so that ``forward(pixel_values) -> (N, dim)`` is the embedding."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
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
