"""Benchmark backend ``torch-compile``: the PyTorch original under ``torch.compile`` with CUDA graphs.

CUDA only (on a CPU, inductor compiles C++ for minutes per batch size, which a benchmark should not hide in
its warm-up). Each batch size is compiled and captured once, during the warm-up calls, then replayed:
the fastest the PyTorch original gets at fixed batch sizes. Labels: torch-compile-fp32/-fp16/-bf16.
"""
from __future__ import annotations

from ..runtime.base import Runner
from .backends import Backend, OriginalCache, Variant, register_backend
from .targets import BenchModel


def _precisions(device: str) -> tuple[str, ...]:
    return ("fp32", "fp16", "bf16") if device == "cuda" else ()


def _build(model: BenchModel, variant: Variant, device: str, threads: int, original: OriginalCache) -> Runner:
    from ..runtime.torch_runner import TorchRunner

    return TorchRunner(original.get(), model.spec.input_hw, model.spec.embedding.dim, device=device,
                       threads=threads, dtype=variant.precision, compile=True, cuda_graphs=True,
                       name=f"torch-compile[{model.spec.name}-{variant.precision}]")


register_backend(Backend("torch-compile", "original", _precisions, _build))
