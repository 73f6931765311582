"""The backend table: every engine imgembed can run, by name.

A :class:`Backend` row says what it runs (an artifact's engine files, or the PyTorch original), on which
devices and at which precisions, whether it is usable here (library, device, CPU features) and how to open a
:class:`~imgembed.runtime.base.Runner`. Every consumer goes through this table: ``imgembed.load``, ``embed``,
``serve``, ``parity``, the Ray actors, the export's engine race and ``bench``. A new backend is one runner
module plus one :func:`register_backend` line at the bottom of this file, and it must pass the conformance
suite (tests/test_runtime_conformance.py).

Artifacts hold one or more *engines* (the manifest's ``engines``, :class:`imgembed.artifact.Engine`: backend,
precision, files, measured speed);
:func:`select_engine` picks the one to run for ``backend="auto"`` or a named backend on this host.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from imgembed.artifact import ArtifactFile, ArtifactFiles, Engine, Manifest, TextTower
from imgembed.errors import ArtifactError, BackendUnavailableError
from imgembed.runtime.base import Runner

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUTO = "auto"


class DegradedEngineWarning(UserWarning):
    """An artifact's engine runs here in a slower or higher-precision mode than it was exported for."""


@dataclass(frozen=True)
class EngineRef:
    """One engine of an artifact directory, as recorded in its manifest."""

    directory: Path
    record: Engine
    output_dim: int
    label: str                    # for runner names: "<artifact>-<precision>"
    files: ArtifactFiles | None = None   # the artifact's resolver; None for the work directory of an export

    def file(self, key: str = "model") -> Path | ArtifactFile:
        """The engine's ``key`` file: through the artifact's resolver (verified bytes on read), or a plain path
        in an export's own work directory."""
        rel = self.record.files.get(key)
        if not rel:
            raise ArtifactError(f"{self.directory}: engine {self.record.id!r} records no {key!r} file")
        if self.files is not None:
            return self.files.file(rel, f"engine {self.record.id!r} file {key!r}")
        return self.directory / rel

    def has_file(self, key: str) -> bool:
        return bool(self.record.files.get(key))


@dataclass(frozen=True)
class OriginalRef:
    """The PyTorch original of a model (an EmbeddingHead), shared by every runner built on it."""

    module: Any
    input_hw: tuple[int, int]
    output_dim: int
    label: str


Target = EngineRef | OriginalRef
Open = Callable[[Target, str, "int | None", str], Runner]   # (target, device, threads, precision) -> Runner


@dataclass(frozen=True)
class Backend:
    name: str
    runs: str                                       # "artifact" | "original"
    precisions: Callable[[str], tuple[str, ...]]    # device -> precisions it runs there
    open: Open
    unavailable: Callable[[str], str | None]        # device -> why not here, None when usable
    description: str = ""

    def check(self, device: str) -> None:
        """Raise BackendUnavailableError (naming the reason) unless this backend runs on ``device`` here."""
        check_device(device)
        reason = self.unavailable(device) if self.precisions(device) else f"{self.name} does not run on {device}"
        if reason:
            raise BackendUnavailableError(f"backend {self.name!r} cannot run on {device}: {reason}")


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a row of the table."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[name]


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise BackendUnavailableError(f"unknown device {device!r}; expected one of {list(DEVICES)}")


def require_device(device: str) -> None:
    """Fail fast (one clear line) when ``device`` cannot be used at all on this machine."""
    check_device(device)
    if device == "cuda":
        reason = cuda_unavailable()
        if reason:
            raise BackendUnavailableError(f"--device cuda: {reason}")


def cuda_unavailable() -> str | None:
    """Why no CUDA device can be used here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed, so no CUDA device can be probed"
    if not torch.cuda.is_available():
        return "no usable NVIDIA GPU here (torch.cuda.is_available() is False)"
    return None


def backend_table(device: str | None = None) -> list[dict]:
    """Every backend with what it runs and whether it is usable (for ``imgembed backends`` and reports)."""
    rows = []
    for b in BACKENDS.values():
        for dev in ([device] if device else DEVICES):
            precisions = b.precisions(dev)
            if not precisions:
                continue
            rows.append({"backend": b.name, "device": dev, "runs": b.runs, "precisions": list(precisions),
                         "available": b.unavailable(dev) is None, "reason": b.unavailable(dev),
                         "description": b.description})
    return rows


# ------------------------------------------------------------------------------------------- engines
def engines_of(manifest: Manifest | TextTower) -> list[Engine]:
    """The engines of an artifact's tower, default first, then by measured speed (fastest first)."""
    default = manifest.default_engine
    return sorted(manifest.engines, key=lambda e: (e.id != default, -(e.img_per_s or 0.0)))


def _unmet(engine: Engine) -> str | None:
    """Why this host lacks what ``engine`` needs to run as exported and gated (CPU instructions), or None."""
    from imgembed.runtime.host import int8_saturation, missing_bf16_instructions

    reasons = [missing_bf16_instructions() if engine.inference_precision == "bf16" else None,
               int8_saturation(engine.backend) if engine.needs_vnni else None]
    return "; ".join(r for r in reasons if r) or None


def _target_mismatch(engine: Engine) -> str | None:
    """Why a TensorRT plan cannot run on this GPU / TensorRT version (it was built for another), or None."""
    if engine.target is None:
        return None
    from imgembed.runtime.runners.tensorrt import current_env
    from imgembed.runtime.runners.tensorrt_plans import incompatibilities

    return "; ".join(incompatibilities(engine.target, current_env())) or None


def _degraded(engine: Engine, unmet: str, where: str) -> Engine:
    """``engine`` as it runs on a host that lacks what it needs, with a :class:`DegradedEngineWarning`: a BF16
    hint falls back to FP32 (exact), an 8-bit engine gated with VNNI runs on saturating kernels (may drift)."""
    from imgembed.runtime.host import int8_saturation, missing_bf16_instructions

    what, how = [], []
    if engine.inference_precision == "bf16" and missing_bf16_instructions():
        engine = engine.model_copy(update={"inference_precision": "fp32"})
        what.append("was exported for native BF16")
        how.append("it runs in FP32 here (same vectors within the FP32 gate, slower)")
    if engine.needs_vnni and int8_saturation(engine.backend):
        what.append("was gated with VNNI int8 kernels")
        how.append("its vectors may drift past the gate here: check with `imgembed parity` on this host, or "
                   "re-export here (the portable 7-bit engine of an INT8 export runs exactly everywhere)")
    warnings.warn(f"{where}: engine {engine.id} {' and '.join(what)} but {unmet}; {'; '.join(how)}",
                  DegradedEngineWarning, stacklevel=3)
    return engine


def select_engine(manifest: Manifest | TextTower, backend: str = AUTO, device: str = "cpu",
                  where: str = "artifact") -> tuple[Engine, list[str]]:
    """The engine of ``manifest`` to run on ``device`` here, and notes on what was passed over.

    ``backend="auto"``: the first engine (default first, then fastest) whose backend is usable here and whose
    CPU needs are met; if only engines with unmet CPU needs remain, the first of those runs with a
    :class:`DegradedEngineWarning` (a BF16 engine computes in FP32; an 8-bit engine gated with VNNI runs with
    the saturating kernels of this CPU). A named backend must be one of the artifact's engines and usable
    here, else BackendUnavailableError says what the artifact holds.
    """
    check_device(device)
    engines = engines_of(manifest)
    held = ", ".join(f"{e.id} ({e.backend}, {e.precision})" for e in engines)
    if backend != AUTO:
        get_backend(backend)
        engines = [e for e in engines if e.backend == backend]
        if not engines:
            raise BackendUnavailableError(f"{where} has no {backend!r} engine; it holds: {held}")
    notes, degraded = [], []
    for engine in engines:
        b = BACKENDS.get(engine.backend)
        reason = (f"backend {engine.backend!r} is not known to this imgembed" if b is None
                  else (b.unavailable(device) if engine.precision in b.precisions(device)
                        else f"{b.name} does not run {engine.precision} on {device}")) or _target_mismatch(engine)
        if reason:
            notes.append(f"{engine.id}: {reason}")
            continue
        unmet = _unmet(engine) if device == "cpu" else None
        if unmet:
            notes.append(f"{engine.id}: {unmet}")
            degraded.append((engine, unmet))
            continue
        return engine, notes
    if degraded:
        return _degraded(*degraded[0], where), notes
    raise BackendUnavailableError(f"{where}: no engine can run on {device} here ({'; '.join(notes)}); "
                                  f"the artifact holds: {held}")


def open_engine(directory: Path, manifest: Manifest, engine: Engine, *, device: str = "cpu",
                threads: int | None = None, files: ArtifactFiles | None = None, dim: int | None = None,
                name: str | None = None) -> Runner:
    """A (not yet active) runner over one engine of an artifact; its files are read through ``files`` (by
    default the resolver of the manifest's ``files`` with sha256 checks). ``dim`` / ``name``: the tower's
    (default: the image tower's)."""
    files = files or ArtifactFiles.of(directory, manifest)
    ref = EngineRef(Path(directory), engine, dim or manifest.output.dim,
                    f"{name or manifest.name}-{engine.precision}", files)
    return get_backend(engine.backend).open(ref, device, threads, engine.precision)


def open_original(module: Any, input_hw: tuple[int, int], output_dim: int, label: str, *, backend: str = "torch",
                  device: str = "cpu", threads: int | None = None, precision: str = "fp32") -> Runner:
    """A (not yet active) runner over a PyTorch original."""
    b = get_backend(backend)
    if b.runs != "original":
        originals = sorted(n for n, x in BACKENDS.items() if x.runs == "original")
        raise BackendUnavailableError(f"backend {backend!r} runs exported artifacts, not PyTorch originals; "
                                      f"original backends: {originals}")
    b.check(device)
    if precision not in b.precisions(device):
        raise BackendUnavailableError(f"backend {backend!r} runs {list(b.precisions(device))} on {device}, "
                                      f"not {precision!r}")
    return b.open(OriginalRef(module, tuple(input_hw), output_dim, label), device, threads, precision)


# ------------------------------------------------------------------------------------------- the rows
def _open_torch(target: Target, device: str, threads: int | None, precision: str, compile: bool = False) -> Runner:
    from imgembed.runtime.runners.pytorch import TorchRunner

    assert isinstance(target, OriginalRef)
    prefix = "torch-compile" if compile else "torch"
    return TorchRunner(target.module, target.input_hw, target.output_dim, device=device, threads=threads,
                       dtype=precision, compile=compile, cuda_graphs=compile,
                       name=f"{prefix}[{target.label}-{precision}]")


def _open_torch_compiled(target: Target, device: str, threads: int | None, precision: str) -> Runner:
    return _open_torch(target, device, threads, precision, compile=True)


def _torch_unavailable(device: str) -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed"
    return cuda_unavailable() if device == "cuda" else None


def _open_ort(target: Target, device: str, threads: int | None, precision: str) -> Runner:
    from imgembed.runtime.runners.onnxruntime import OrtRunner

    assert isinstance(target, EngineRef)
    return OrtRunner(target.file(), target.output_dim, device=device, threads=threads,
                     name=f"onnxruntime[{target.label}]")


def _ort_unavailable(device: str) -> str | None:
    from imgembed.runtime.runners.onnxruntime import available_providers

    have = available_providers()
    if not have:
        return "onnxruntime is not installed: pip install onnxruntime"
    if device == "cuda" and "CUDAExecutionProvider" not in have:
        return (f"ONNX Runtime has no CUDAExecutionProvider (providers: {have}); install onnxruntime-gpu "
                "(pip install 'imgembed[gpu]') on a machine with an NVIDIA GPU")
    return None


def _open_openvino(target: Target, device: str, threads: int | None, precision: str) -> Runner:
    from imgembed.runtime.runners.openvino import OpenVinoRunner

    assert isinstance(target, EngineRef)
    weights = target.file("weights") if target.has_file("weights") else None
    return OpenVinoRunner(target.file(), target.output_dim, weights=weights, device=device, threads=threads,
                          inference_precision=target.record.inference_precision,
                          name=f"openvino[{target.label}]")


def _openvino_unavailable(device: str) -> str | None:
    from imgembed.runtime.runners.openvino import openvino_unavailable

    return openvino_unavailable(device)


def _open_tensorrt(target: Target, device: str, threads: int | None, precision: str) -> Runner:
    from imgembed.runtime.runners.tensorrt import TrtRunner, artifact_engine

    assert isinstance(target, EngineRef)
    if target.record.backend == "tensorrt" and target.record.target is not None:
        plan, profile = target.file("plan"), target.record.target.profile
    else:  # asked for by backend name (bench): the artifact's plan for this GPU, or EngineMismatchError
        plan, record = artifact_engine(target.directory, precision, files=target.files)
        profile = record["profile"]
    return TrtRunner(plan, target.output_dim, name=f"tensorrt[{target.label}-b{profile.get('max', '?')}]")


def _tensorrt_unavailable(device: str) -> str | None:
    from imgembed.runtime.runners.tensorrt import tensorrt_unavailable

    return tensorrt_unavailable(device)


register_backend(Backend(
    "torch", "original", lambda d: ("fp32", "fp16", "bf16") if d == "cuda" else ("fp32", "bf16"), _open_torch,
    _torch_unavailable, "the PyTorch original, eager"))
register_backend(Backend(
    "torch-compile", "original", lambda d: ("fp32", "fp16", "bf16") if d == "cuda" else (), _open_torch_compiled,
    _torch_unavailable, "the PyTorch original under torch.compile with CUDA graphs (CUDA only)"))
# ORT's CUDA provider has no integer MatMul/Conv kernels: INT8 engines are CPU engines; FP16 ones are GPU ones.
register_backend(Backend(
    "onnxruntime", "artifact", lambda d: ("fp32", "fp16") if d == "cuda" else ("fp32", "fp16", "int8"), _open_ort,
    _ort_unavailable, "ONNX Runtime (CPU; CUDA with onnxruntime-gpu)"))
register_backend(Backend(
    "openvino", "artifact", lambda d: ("fp32", "bf16", "int8") if d == "cpu" else (), _open_openvino,
    _openvino_unavailable, "OpenVINO IR on the CPU (pip install 'imgembed[openvino]')"))
register_backend(Backend(
    "tensorrt", "artifact", lambda d: ("fp32", "fp16", "int8") if d == "cuda" else (), _open_tensorrt,
    _tensorrt_unavailable, "TensorRT engines built by `imgembed export --trt` (CUDA only)"))
