"""imgembed: export image-embedding models to ONNX, optimize them, check parity, and serve them.

    import imgembed
    emb = imgembed.load("artifacts/clip-vit-b32-int8")     # an artifact directory (ONNX Runtime)
    emb = imgembed.load("clip-vit-b32", random_init=True)  # or a registry name (PyTorch original)
    vecs = emb.embed(["a.jpg", pil_image, uint8_array, jpeg_bytes])  # float32 (N, D)
    texts = emb.embed_text(["a red bicycle"])             # artifacts exported with --text (CLIP, SigLIP)
    imgembed.similarity(texts, vecs)                      # cosine matrix (1, N)
    imgembed.export_module("pkg.mod:factory", "artifacts/mine", name="mine", preprocess="imagenet")  # your own

Heavy backends (torch, onnxruntime) are imported only when used, so ``import imgembed`` stays cheap and
works where an optional backend is missing.
"""
from __future__ import annotations

__version__ = "0.2.0"

from imgembed.errors import (
    ArtifactError,
    BackendUnavailableError,
    ExportError,
    ImageDecodeError,
    ImgembedError,
    IntegrityError,
    ParityError,
    RegistryError,
    SignatureError,
    UnknownModelError,
    WeightsError,
)
from imgembed.models.registry import ModelSpec, get_spec, list_models


def load(name_or_path, **kwargs):
    """Load an embedder from an artifact directory or a registry name; see :func:`imgembed.runtime.load`."""
    from imgembed.runtime.embedder import load as _load

    return _load(name_or_path, **kwargs)


def similarity(a, b):
    """Cosine similarity matrix of two sets of vectors; see :func:`imgembed.text.scoring.similarity`."""
    from imgembed.text.scoring import similarity as _similarity

    return _similarity(a, b)


def export_module(module, out, **kwargs):
    """Export your own ``torch.nn.Module`` (images -> vectors) to an artifact, gated on parity against itself;
    see :func:`imgembed.export.module_export.export_module`."""
    from imgembed.export.module_export import export_module as _export_module

    return _export_module(module, out, **kwargs)


__all__ = ["load", "similarity", "export_module", "get_spec", "list_models", "ModelSpec", "ImgembedError",
           "UnknownModelError",
           "RegistryError", "ImageDecodeError", "ArtifactError", "IntegrityError", "SignatureError", "ExportError",
           "ParityError", "BackendUnavailableError", "WeightsError", "__version__"]
