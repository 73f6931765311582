"""Benchmark backends: a small table of backend name -> how to build a Runner, and what it can run.

Each :class:`Backend` says which devices it runs on, whether it runs the PyTorch *original* or an exported
*artifact*, which precisions it runs per device, whether it is available here, and a ``build`` function
returning a :class:`~imgembed.runtime.base.Runner`. Benchmarks and the pytest-benchmark suites go through
:func:`plan_variants` and :func:`build_runner` only, so adding a backend (TensorRT, OpenVINO...) is one module
defining a ``Backend`` plus a call to :func:`register_backend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import BackendUnavailableError
from ..runtime.base import Runner
from .targets import ArtifactRef, BenchModel

BASELINE = ("torch", "fp32")  # every ratio is against the PyTorch original in FP32
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Variant:
    """One thing to benchmark: a backend at a precision, on the original or on one artifact."""

    label: str
    backend: str
    precision: str
    artifact: ArtifactRef | None = None

    @property
    def is_original(self) -> bool:
        return self.artifact is None

    @property
    def is_baseline(self) -> bool:
        return (self.backend, self.precision) == BASELINE and self.is_original


class OriginalCache:
    """Builds a model's PyTorch original once and hands it to every torch variant."""

    def __init__(self, model: BenchModel, attn: str = "sdpa"):
        self.model, self.attn, self._module = model, attn, None

    def get(self):
        if self._module is None:
            self._module = self.model.build_original(self.attn)
        return self._module


Build = Callable[[BenchModel, Variant, str, int, OriginalCache], Runner]


@dataclass(frozen=True)
class Backend:
    name: str
    runs: str                                   # "original" | "artifact"
    precisions: Callable[[str], tuple[str, ...]]  # device -> precisions this backend runs there
    build: Build
    unavailable: Callable[[str], str | None] = lambda device: None  # device -> reason, None if available


def _build_torch(model: BenchModel, variant: Variant, device: str, threads: int, original: OriginalCache) -> Runner:
    """The PyTorch original (shared, FP32) or a copy of it cast to FP16 / BF16 (TorchRunner's ``dtype``)."""
    from ..runtime.torch_runner import TorchRunner

    return TorchRunner(original.get(), model.spec.input_hw, model.spec.embedding.dim, device=device,
                       threads=threads, dtype=variant.precision, name=f"torch[{model.spec.name}-{variant.precision}]")


def _build_ort(model: BenchModel, variant: Variant, device: str, threads: int, original: OriginalCache) -> Runner:
    """An ONNX Runtime session over the variant's artifact (CPU or CUDA provider)."""
    from ..artifact import MODEL_FILE
    from ..runtime.ort_runner import OrtRunner

    assert variant.artifact is not None
    return OrtRunner(variant.artifact.path / MODEL_FILE, model.spec.embedding.dim, device=device, threads=threads,
                     name=f"onnxruntime[{variant.artifact.path.name}]")


def _ort_unavailable(device: str) -> str | None:
    """Why ONNX Runtime cannot run on ``device`` here, or None."""
    from ..runtime.ort_runner import available_providers

    if device == "cuda" and "CUDAExecutionProvider" not in available_providers():
        return (f"ONNX Runtime has no CUDAExecutionProvider (providers: {available_providers()}); "
                "install onnxruntime-gpu to benchmark artifacts on the GPU")
    return None


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "original", lambda d: ("fp32", "fp16", "bf16") if d == "cuda" else ("fp32",),
                     _build_torch),
    # ORT's CUDA provider has no integer MatMul/Conv kernels: INT8 artifacts are CPU artifacts; FP16 ones
    # (export --fp16) are GPU artifacts (they run on the CPU, slowly).
    "onnxruntime": Backend("onnxruntime", "artifact",
                           lambda d: ("fp32", "fp16") if d == "cuda" else ("fp32", "int8"), _build_ort,
                           _ort_unavailable),
}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; e.g. a ``tensorrt`` module registering itself on import."""
    BACKENDS[backend.name] = backend


def _variants_of(backend: Backend, model: BenchModel, device: str, notes: list[str]) -> list[Variant]:
    """The variants one backend contributes for ``model`` on ``device``."""
    precisions = backend.precisions(device)
    if not precisions:  # a backend of another device (tensorrt on the CPU): nothing to run, nothing to explain
        return []
    if backend.runs == "original":
        return [Variant(f"{backend.name}-{p}", backend.name, p) for p in precisions]
    out = []
    for art in model.artifacts:
        if art.precision not in precisions:
            notes.append(f"{model.spec.name}: {backend.name} does not run {art.precision} artifacts on {device}; "
                         f"skipped {art.path}")
            continue
        out.append(Variant(f"{backend.name}-{art.precision}", backend.name, art.precision, art))
    return out


def plan_variants(model: BenchModel, device: str, *, compare_original: bool = True,
                  notes: list[str] | None = None) -> list[Variant]:
    """Every (backend, precision, artifact) to run for ``model`` on ``device``; the baseline comes first.

    Unavailable backends and unsupported precisions are skipped with a line appended to ``notes``.
    """
    if device not in DEVICES:
        raise BackendUnavailableError(f"unknown device {device!r}; expected one of {list(DEVICES)}")
    notes = notes if notes is not None else []
    variants: list[Variant] = []
    for backend in BACKENDS.values():
        if backend.runs == "original" and not compare_original:
            continue
        reason = backend.unavailable(device)
        if reason:
            notes.append(f"{backend.name} skipped on {device}: {reason}")
            continue
        variants += _variants_of(backend, model, device, notes)
    return _unique_labels(sorted(variants, key=lambda v: not v.is_baseline))


def _unique_labels(variants: list[Variant]) -> list[Variant]:
    """Two artifacts at one precision (e.g. two INT8 presets) get their directory name in the label."""
    labels = [v.label for v in variants]
    return [Variant(f"{v.label}[{v.artifact.path.name}]", v.backend, v.precision, v.artifact)
            if labels.count(v.label) > 1 and v.artifact is not None else v for v in variants]


def build_runner(model: BenchModel, variant: Variant, device: str, threads: int, original: OriginalCache) -> Runner:
    """The Runner for ``variant`` (not yet activated)."""
    backend = BACKENDS.get(variant.backend)
    if backend is None:
        raise BackendUnavailableError(f"unknown benchmark backend {variant.backend!r}; "
                                      f"expected one of {sorted(BACKENDS)}")
    return backend.build(model, variant, device, threads, original)


# Backends defined in their own modules; each registers itself on import (GPU libraries load lazily).
OPTIONAL_BACKEND_MODULES: tuple[str, ...] = ("imgembed.bench.backend_torch_compile", "imgembed.bench.backend_tensorrt")


def _register_optional_backends() -> None:
    import importlib

    for module in OPTIONAL_BACKEND_MODULES:
        importlib.import_module(module)


_register_optional_backends()
