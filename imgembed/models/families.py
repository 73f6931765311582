"""Model families: one :class:`Family` record each, and the PyTorch originals built from them.

A family is a flat record (Optimum's per-architecture spec, without the inheritance): which transformers
classes build it, how a full image-text checkpoint yields its vision tower, which export-time surgery its
graph needs, and which ONNX Runtime transformer fusion applies. :data:`FAMILIES` is the only list of
families; the registry validates ``family:`` against it, and no other code branches on a family name.

:func:`load_original` builds the PyTorch original of a registry entry from one of three sources:

* the Hugging Face hub (``spec.source``; real code path for users with internet),
* a local directory written by ``save_pretrained`` (``weights=DIR``),
* the real architecture with random weights from the registry's ``arch`` (``random_init=True``), seeded
  so that the same original can be rebuilt later from a manifest (:func:`original_from_source`).

The ``module`` family is the user's own ``torch.nn.Module`` (:mod:`imgembed.models.user_module`): it has no
transformers classes and no registry entries; its originals are rebuilt from a ``module`` source record.

This module imports torch only inside the functions that need it, so the registry (and ``import imgembed``)
can use the records without it. The original is an :class:`~imgembed.models.heads.EmbeddingHead`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from imgembed.errors import WeightsError

if TYPE_CHECKING:
    from imgembed.models.heads import EmbeddingHead
    from imgembed.models.registry import ModelSpec

DEFAULT_SEED = 0
MODULE_FAMILY = "module"   # a user's own nn.Module (imgembed.models.user_module)


# ------------------------------------------------------------------------------- vision-tower hooks
def encoder_only(raw: Mapping[str, Any]) -> dict | None:
    """The checkpoint is the image encoder itself: its config.json is read as is."""
    return None


def clip_vision_tower(raw: Mapping[str, Any]) -> dict | None:
    """A full CLIPModel checkpoint yields its vision config (the top-level projection_dim sizes
    visual_projection; vision_config's copy may be a stale default)."""
    if raw.get("model_type") != "clip":
        return None
    vision = dict(raw.get("vision_config") or {})
    vision["projection_dim"] = raw.get("projection_dim", vision.get("projection_dim", 512))
    return vision


def siglip_vision_tower(raw: Mapping[str, Any]) -> dict | None:
    """A full SiglipModel checkpoint (image + text) yields its vision config; its ``vision_model.*``
    weights load into SiglipVisionModel under the same names, the text tower is left out."""
    if raw.get("model_type") != "siglip":
        return None
    return dict(raw.get("vision_config") or {})


# ---------------------------------------------------------------------------- export-surgery hooks
def freeze_position_embeddings(head: "EmbeddingHead", spec: "ModelSpec") -> bool:
    """Precompute DINOv2's interpolated position embeddings for the fixed input size.

    DINOv2 checkpoints carry a 37x37 (518 px) grid that is bicubically interpolated on every forward; traced,
    that is a Resize node run at every inference, and ONNX's cubic resize is a known source of mismatch
    (antialias, border handling). PyTorch computes the table once here, with its own kernel, and the graph
    gets a constant. Valid because artifacts have a fixed input size. Returns True if applied.
    """
    import torch

    emb = getattr(head.model, "embeddings", None)
    if emb is None or not hasattr(emb, "interpolate_pos_encoding"):
        return False
    h, w = spec.input_hw
    patches = (h // emb.patch_size) * (w // emb.patch_size)
    with torch.no_grad():
        dummy = torch.zeros(1, patches + 1, emb.position_embeddings.shape[-1])
        table = emb.interpolate_pos_encoding(dummy, h, w).detach().clone()

    def frozen(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if (height, width) != (h, w):  # internal invariant: artifacts have one input size
            raise ValueError(f"position embeddings were frozen for {h}x{w}, got {height}x{width}")
        return table.to(embeddings.dtype)

    emb.interpolate_pos_encoding = frozen
    return True


def freeze_rope(head: "EmbeddingHead", spec: "ModelSpec") -> bool:
    """Precompute DINOv3's rotary (cos, sin) tables for the fixed input size.

    DINOv3 derives its RoPE angles from the patch grid of every input (arange, cos, sin on the traced
    shape). The artifact has one input size, so PyTorch computes the tables once and the graph gets
    constants. Returns True if applied.
    """
    import torch

    rope = getattr(head.model, "rope_embeddings", None)
    if rope is None:
        return False
    h, w = spec.input_hw
    with torch.no_grad():
        cos, sin = (t.detach().clone() for t in rope(torch.zeros(1, 3, h, w)))

    def frozen(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(pixel_values.shape[-2:]) != (h, w):  # internal invariant: artifacts have one input size
            raise ValueError(f"RoPE tables were frozen for {h}x{w}, got {tuple(pixel_values.shape[-2:])}")
        return cos.to(pixel_values.dtype), sin.to(pixel_values.dtype)

    rope.forward = frozen
    return True


def fold_layer_scale(head: "EmbeddingHead", spec: "ModelSpec | None" = None) -> int:
    """Fold DINOv2's LayerScale into the preceding Linear (lambda*(xW+b) = x(lambda*W) + lambda*b).

    Exact up to float rounding; it lets ONNX Runtime's attention/skip-layernorm fusion match DINOv2 like
    ViT. Changes ``head`` in place; returns the number of folded scales. Only used on export copies.
    """
    import torch

    folded = 0
    layers = list(getattr(getattr(head.model, "encoder", None), "layer", []))
    with torch.no_grad():
        for layer in layers:
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
    for layer in layers:
        for attr in ("layer_scale1", "layer_scale2"):
            if hasattr(getattr(layer, attr, None), "lambda1") and bool((getattr(layer, attr).lambda1 == 1).all()):
                setattr(layer, attr, torch.nn.Identity())
    return folded


@dataclass(frozen=True)
class Surgery:
    """One export-time change to a copy of the original; ``apply`` returns whether it changed anything."""

    name: str
    apply: Callable[["EmbeddingHead", "ModelSpec"], Any]
    only_when_optimizing: bool = False  # exists to let ORT's fusion match, so skipped without it


FROZEN_POSITIONS = Surgery("frozen-position-embeddings", freeze_position_embeddings)
FROZEN_ROPE = Surgery("frozen-rope-tables", freeze_rope)
FOLDED_LAYER_SCALE = Surgery("folded-layer-scale", fold_layer_scale, only_when_optimizing=True)


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class TextTower:
    """The text side of an image-text family: how its text embeddings are made and scored against images.

    The original is built from the full image-text model (``model_class``; its text tower and projection),
    so a text vector is what ``model.get_text_features(**tokenizer(texts))`` gives in transformers.
    ``scores``: "softmax" (CLIP: logit_scale * cosine, softmax over the labels) or "sigmoid" (SigLIP:
    logit_scale * cosine + logit_bias, an independent probability per label). ``reference_mask``: the
    reference passes the tokenizer's attention mask (CLIP, as transformers users do; the exported graph
    takes input_ids only, which the gate proves equivalent under causal attention); SigLIP is run without
    one, as it was trained.
    """

    model_class: str
    config_class: str
    projection: str | None      # attribute of the full model that projects the pooled text, None: none
    scores: str
    reference_mask: bool
    tokenizer_format: str       # "clip" (byte-level BPE, </w> word ends) | "sentencepiece" (▁ word starts)


@dataclass(frozen=True)
class Family:
    """What differs between model families, as data and small hooks."""

    name: str
    config_class: str | None    # transformers config class of the image encoder (None: not a transformers model)
    model_class: str | None     # transformers model class whose outputs hold the embedding
    ort_model_type: str | None  # onnxruntime.transformers.optimizer model_type, None = no transformer fusion
    is_transformer: bool | None = True  # None: each model says, in its arch's "transformer" key
    vision_tower: Callable[[Mapping[str, Any]], dict | None] = encoder_only  # full checkpoint -> vision config
    surgery: tuple[Surgery, ...] = ()
    config_input_size: str | None = "image_size"  # config.json key that is the input size (None: it is not)
    text: TextTower | None = None  # image-text families: the text tower sharing the embedding space
    in_registry: bool = True    # False: models of this family are not registry entries (user modules)

    def transformer(self, spec: "ModelSpec") -> bool:
        """Whether ``spec`` is a transformer (INT8 presets, SmoothQuant candidates) or a CNN."""
        return self.is_transformer if self.is_transformer is not None else bool(spec.arch.get("transformer"))

    def prepare_export(self, head: "EmbeddingHead", spec: "ModelSpec", optimize: bool) -> list[str]:
        """Export-time surgery on a copy of the original; returns the names of what was applied."""
        return [s.name for s in self.surgery if (optimize or not s.only_when_optimizing) and s.apply(head, spec)]

    def config_from_raw(self, raw: Mapping[str, Any], weights: Path) -> Any:
        """The encoder config of a local checkpoint: the vision tower of a full checkpoint, else its own."""
        cfg_cls = _transformers_attr(self.config_class)
        vision = self.vision_tower(raw)
        return cfg_cls(**vision) if vision is not None else cfg_cls.from_pretrained(str(weights))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("clip", "CLIPVisionConfig", "CLIPVisionModelWithProjection", "clip", vision_tower=clip_vision_tower,
           text=TextTower("CLIPModel", "CLIPConfig", "text_projection", "softmax", reference_mask=True,
                          tokenizer_format="clip")),
    Family("vit", "ViTConfig", "ViTModel", "vit"),
    # DINOv2's image_size is its position-embedding grid (518), not the input size
    Family("dinov2", "Dinov2Config", "Dinov2Model", "vit", surgery=(FROZEN_POSITIONS, FOLDED_LAYER_SCALE),
           config_input_size=None),
    Family("dinov2-reg", "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", "vit",
           surgery=(FROZEN_POSITIONS, FOLDED_LAYER_SCALE), config_input_size=None),
    Family("dinov3", "DINOv3ViTConfig", "DINOv3ViTModel", "vit", surgery=(FROZEN_ROPE,)),
    Family("siglip", "SiglipVisionConfig", "SiglipVisionModel", "clip", vision_tower=siglip_vision_tower,
           text=TextTower("SiglipModel", "SiglipConfig", None, "sigmoid", reference_mask=False,
                          tokenizer_format="sentencepiece")),
    Family("resnet", "ResNetConfig", "ResNetModel", None, is_transformer=False, config_input_size=None),
    Family(MODULE_FAMILY, None, None, None, is_transformer=None, config_input_size=None, in_registry=False),
)}


def family_of(spec: "ModelSpec") -> Family:
    """The :class:`Family` record of a registry entry."""
    return FAMILIES[spec.family]


# -------------------------------------------------------------------------------------- originals
def __getattr__(name: str) -> Any:
    """``EmbeddingHead`` is importable from here without importing torch with this module."""
    if name == "EmbeddingHead":
        from imgembed.models.heads import EmbeddingHead

        return EmbeddingHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _transformers_attr(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _config_from_dir(spec: "ModelSpec", weights: Path) -> Any:
    """Read ``config.json`` of a local checkpoint; a full image-text checkpoint yields its vision config."""
    cfg_path = weights / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{weights}: no config.json; expected a directory written by save_pretrained") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{cfg_path}: unreadable config ({e})") from None
    return family_of(spec).config_from_raw(raw, weights)


def _from_pretrained(model_cls: Any, source: str, **kw: Any) -> Any:
    """``model_cls.from_pretrained`` under imgembed's safe-loading policy (see SECURITY.md).

    Weights come from safetensors, or from a pickle-based ``pytorch_model.bin`` only through
    ``torch.load(weights_only=True)`` (tensors and primitive containers; no code runs). TF/Flax
    conversion is off, and ``model_cls`` is a concrete transformers class, so no remote code is ever
    imported (``trust_remote_code`` does not exist on this path).
    """
    return model_cls.from_pretrained(source, weights_only=True, from_tf=False, from_flax=False, **kw)


def has_safetensors(path: Path) -> bool:
    """Whether a checkpoint directory holds safetensors weights; then a .bin beside them is never read."""
    return any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))


def _from_dir(model_cls: Any, spec: "ModelSpec", path: Path, attn: str, extra: dict) -> Any:
    """The encoder from a local save_pretrained directory (a full image-text checkpoint gives its tower)."""
    if not path.is_dir():
        raise WeightsError(f"weights directory {path} does not exist (expected a save_pretrained directory)")
    config = _config_from_dir(spec, path)
    if family_of(spec).is_transformer:
        config._attn_implementation = attn
    safetensors = has_safetensors(path)
    try:
        return _from_pretrained(model_cls, str(path), config=config, use_safetensors=safetensors or None, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: cannot load weights ({type(e).__name__}: {e}); expected model.safetensors "
                           "or a pytorch_model.bin loadable with torch.load(weights_only=True)") from None


def _build(spec: "ModelSpec", weights: str | Path | None, random_init: bool, seed: int, attn: str) -> Any:
    """The transformers model of ``spec``: seeded random init, a local save_pretrained dir, or the hub."""
    import torch

    fam = family_of(spec)
    if fam.model_class is None:
        raise WeightsError(f"model {spec.name!r} is a user module (family {fam.name!r}): it is rebuilt from its "
                           "manifest's source record (original_from_source), not from a registry entry")
    model_cls = _transformers_attr(fam.model_class)
    extra = {"attn_implementation": attn} if fam.is_transformer else {}
    if random_init:
        config = _transformers_attr(fam.config_class)(**dict(spec.arch), **extra)
        torch.manual_seed(seed)
        return model_cls(config)
    if weights is not None:
        return _from_dir(model_cls, spec, Path(weights), attn, extra)
    if spec.source is None:
        raise WeightsError(f"model {spec.name!r} has no weight source; pass --random-init or --weights DIR")
    try:
        return _from_pretrained(model_cls, spec.source.hub, revision=spec.source.revision, **extra)
    except OSError as e:
        raise WeightsError(
            f"could not load {spec.source.hub}@{spec.source.revision} from the Hugging Face hub ({e}). "
            "Offline? Pass --weights DIR (a save_pretrained directory) or --random-init."
        ) from None


def load_original(spec: "ModelSpec", weights: str | Path | None = None, random_init: bool = False,
                  seed: int = DEFAULT_SEED, attn: str = "eager") -> "EmbeddingHead":
    """The PyTorch original of ``spec`` as an :class:`EmbeddingHead` in eval mode (CPU, float32).

    ``attn="eager"`` keeps attention as plain MatMul/Softmax so ONNX Runtime can fuse it after export.
    """
    from imgembed.models.heads import EmbeddingHead

    if weights is not None and random_init:
        raise WeightsError("pass either weights=DIR or random_init=True, not both")
    model = _build(spec, weights, random_init, seed, attn)
    return EmbeddingHead(model.eval(), spec).eval()


def source_record(spec: "ModelSpec", weights: str | Path | None, random_init: bool,
                  seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """How the original was obtained, for the manifest and for :func:`original_from_source`."""
    if random_init:
        return {"kind": "random-init", "seed": seed, "arch": dict(spec.arch)}
    if weights is not None:
        return {"kind": "local", "path": str(Path(weights).resolve())}
    assert spec.source is not None
    return {"kind": "hub", "repo": spec.source.hub, "revision": spec.source.revision}


def original_from_source(spec: "ModelSpec", source: Mapping[str, Any], weights_override: str | Path | None = None,
                         attn: str = "eager", module: str | Callable | None = None,
                         trust_manifest_factory: bool = False) -> "EmbeddingHead":
    """Rebuild the PyTorch original recorded by :func:`source_record` (a manifest's ``source``).

    ``random-init`` reuses the seed (``spec.arch`` is the architecture); ``local`` loads the recorded
    directory, or ``weights_override`` when given (the directory moved); ``hub`` loads the recorded repo at
    the recorded revision, or ``weights_override`` when given (offline re-checks); ``module`` calls the factory
    the caller names in ``module`` (or the recorded one only with ``trust_manifest_factory``; see
    :func:`imgembed.models.user_module.original_from_record`; ``weights_override`` is the weights file, which must have
    the recorded sha256). Unknown kinds raise
    :class:`~imgembed.errors.WeightsError`.
    """
    kind = source.get("kind") if isinstance(source, Mapping) else None
    if kind == "module":
        from imgembed.models.user_module import original_from_record

        return original_from_record(spec, source, weights_override, module, trust_manifest_factory)
    if kind == "random-init":
        return load_original(spec, random_init=True, seed=int(source["seed"]), attn=attn)
    if kind in ("local", "hub") and weights_override is not None:
        return load_original(spec, weights=weights_override, attn=attn)
    if kind == "local":
        return load_original(spec, weights=source["path"], attn=attn)
    if kind == "hub":
        if spec.source is None:
            raise WeightsError(f"{spec.name}: the source records hub repo {source.get('repo')!r}, but the model's "
                               "registry entry has no hub source to pin")
        pinned = replace(spec, source=replace(spec.source, hub=str(source["repo"]),
                                              revision=str(source.get("revision", "main"))))
        return load_original(pinned, attn=attn)
    raise WeightsError(f"unknown source kind {kind!r} in {dict(source) if isinstance(source, Mapping) else source!r}; "
                       "expected 'random-init', 'local', 'hub' or 'module'")
