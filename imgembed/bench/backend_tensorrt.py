"""Benchmark backend ``tensorrt``: the engines that ``imgembed export NAME --trt`` put into artifacts.

Only parity-gated engines are benchmarked: an artifact without an engine for this GPU and TensorRT
version at its precision is skipped with a note saying how to build one. CUDA only; ``tensorrt`` is
imported when a runner is built, never at import time. UNVERIFIED on hardware (no GPU in this project).
"""
from __future__ import annotations

from ..runtime.base import Runner
from .backends import Backend, OriginalCache, Variant, register_backend
from .targets import BenchModel


def _precisions(device: str) -> tuple[str, ...]:
    return ("fp32", "fp16", "int8") if device == "cuda" else ()


def _unavailable(device: str) -> str | None:
    if device != "cuda":
        return None  # no variants on the CPU: nothing to explain
    from ..runtime.trt_runner import tensorrt_unavailable

    return tensorrt_unavailable(device)


def _build(model: BenchModel, variant: Variant, device: str, threads: int, original: OriginalCache) -> Runner:
    from ..runtime.trt_runner import TrtRunner, artifact_engine

    assert variant.artifact is not None
    path, record = artifact_engine(variant.artifact.path, variant.precision)
    return TrtRunner(path, model.spec.embedding.dim,
                     name=f"tensorrt[{variant.artifact.path.name}-{record['precision']}-b{record['profile']['max']}]")


register_backend(Backend("tensorrt", "artifact", _precisions, _build, _unavailable))
