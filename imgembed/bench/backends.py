"""What a benchmark runs: variants planned from the runtime's backend table.

A :class:`Variant` is one backend at one precision, on the PyTorch original or on one engine of one
artifact. :func:`plan_variants` walks :data:`imgembed.runtime.backends.BACKENDS` (the one backend table:
nothing is registered here), skipping unusable backends with a note; :func:`build_runner` opens the runner
through the same table. Benchmarks and the pytest-benchmark suites go through these two functions only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from imgembed.bench.targets import ArtifactRef, BenchModel
from imgembed.errors import BackendUnavailableError
from imgembed.runtime.backends import BACKENDS, DEVICES, Backend, EngineRef, OriginalRef, get_backend
from imgembed.runtime.base import Runner

BASELINE = ("torch", "fp32")  # every ratio is against the PyTorch original in FP32


@dataclass(frozen=True)
class Variant:
    """One thing to benchmark: a backend at a precision, on the original or on one artifact engine."""

    label: str
    backend: str
    precision: str
    artifact: ArtifactRef | None = None
    engine: dict | None = field(default=None, compare=False)   # the artifact engine's manifest record

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


def _engine_label(backend: Backend, engine: dict) -> str:
    label = f"{backend.name}-{engine.precision}"
    if engine.inference_precision != "fp32" and engine.precision != engine.inference_precision:
        label += f"+{engine.inference_precision}"
    return label


def _variants_of(backend: Backend, model: BenchModel, device: str, notes: list[str],
                 precisions: Sequence[str] | None) -> list[Variant]:
    """The variants one backend contributes for ``model`` on ``device``."""
    runs = [p for p in backend.precisions(device) if precisions is None or p in precisions]
    if not runs:
        return []
    if backend.runs == "original":
        return [Variant(f"{backend.name}-{p}", backend.name, p) for p in runs]
    out = []
    for art in model.artifacts:
        seen: set[str] = set()   # an artifact's first engine of a kind (its default or fastest) gets the plain label
        for engine in art.engine_records():
            if engine.backend != backend.name:
                continue
            if engine.precision not in runs:
                notes.append(f"{model.spec.name}: {backend.name} does not run {engine.precision} engines on "
                             f"{device}; skipped {art.path}")
                continue
            label = _engine_label(backend, engine)
            if label in seen:
                prefix = f"{backend.name}-{engine.precision}-"
                label += f"[{engine.id.removeprefix(prefix)}]"
            seen.add(label)
            out.append(Variant(label, backend.name, engine.precision, art, engine))
    return out


def plan_variants(model: BenchModel, device: str, *, compare_original: bool = True,
                  notes: list[str] | None = None, engines: Sequence[str] | None = None,
                  precisions: Sequence[str] | None = None) -> list[Variant]:
    """Every (backend, precision, artifact engine) to run for ``model`` on ``device``; the baseline first.

    ``engines`` restricts the backends (the baseline stays when ``compare_original``); ``precisions``
    restricts the precisions of originals. Unusable backends are skipped with a line in ``notes``.
    """
    if device not in DEVICES:
        raise BackendUnavailableError(f"unknown device {device!r}; expected one of {list(DEVICES)}")
    if engines:
        for name in engines:
            get_backend(name)
    notes = notes if notes is not None else []
    variants: list[Variant] = []
    for backend in BACKENDS.values():
        if backend.runs == "original" and not compare_original:
            continue
        wanted = not engines or backend.name in engines
        if not wanted and not (compare_original and backend.name == BASELINE[0]):
            continue
        if not backend.precisions(device):
            continue  # a backend of another device (tensorrt on the CPU): nothing to run, nothing to explain
        reason = backend.unavailable(device)
        if reason:
            notes.append(f"{backend.name} skipped on {device}: {reason}")
            continue
        if not wanted:  # only the baseline of the torch backend
            variants.append(Variant(f"{BASELINE[0]}-{BASELINE[1]}", *BASELINE))
            continue
        only = precisions if backend.runs == "original" else None
        variants += _variants_of(backend, model, device, notes, only)
    return _unique_labels(sorted(variants, key=lambda v: not v.is_baseline))


def _unique_labels(variants: list[Variant]) -> list[Variant]:
    """Two artifacts at one precision (e.g. two INT8 presets) get their directory name in the label."""
    labels = [v.label for v in variants]
    return [Variant(f"{v.label}[{v.artifact.path.name}]", v.backend, v.precision, v.artifact, v.engine)
            if labels.count(v.label) > 1 and v.artifact is not None else v for v in variants]


def build_runner(model: BenchModel, variant: Variant, device: str, threads: int, original: OriginalCache) -> Runner:
    """The Runner for ``variant`` (not yet activated), opened through the runtime's backend table."""
    backend = get_backend(variant.backend)
    if variant.is_original:
        target = OriginalRef(original.get(), model.spec.input_hw, model.spec.embedding.dim, model.spec.name)
    else:
        assert variant.artifact is not None
        engine = variant.engine or variant.artifact.engine_records()[0]
        target = EngineRef(variant.artifact.path, engine, model.spec.embedding.dim,
                           f"{variant.artifact.path.name}-{engine.precision}", variant.artifact.files())
    return backend.open(target, device, threads, variant.precision)
