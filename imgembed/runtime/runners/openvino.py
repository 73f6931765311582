"""OpenVINO backend: runs an OpenVINO IR (``model.xml`` + ``model.bin``) on the CPU.

The IR's weights decide INT8 (NNCF inserts FakeQuantize nodes); the *inference precision hint* decides how
the remaining float ops run: ``f32``, or ``bf16`` on CPUs with AVX512_BF16 / AMX-BF16. The hint is always
set explicitly, because OpenVINO's CPU plugin otherwise picks BF16 by itself on such CPUs, and an FP32
artifact must compute in FP32 wherever it runs.

Compiled models are shared by threads; each thread gets its own infer request, so concurrent ``infer``
calls (the server's batcher, ``embed`` from several threads) are safe.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from imgembed.artifact import ArtifactFile
from imgembed.errors import ArtifactError, BackendUnavailableError, ImgembedError
from imgembed.runtime.base import InputSpec, Runner

INSTALL_HINT = "pip install 'imgembed[openvino]' (openvino and nncf)"
HINTS = {"fp32": "f32", "bf16": "bf16"}
_OV_TO_NUMPY = {"f32": "float32", "f16": "float16", "u8": "uint8", "i64": "int64"}


def import_openvino():
    """The ``openvino`` module, or BackendUnavailableError saying how to get it."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(f"OpenVINO is not installed ({e}); {INSTALL_HINT}") from None
    return openvino


def openvino_unavailable(device: str) -> str | None:
    """Why OpenVINO cannot run on ``device`` here, or None."""
    if device != "cpu":
        return f"imgembed runs OpenVINO on the CPU only, not on {device!r}"
    try:
        import_openvino()
    except BackendUnavailableError as e:
        return str(e)
    return None


def compile_config(threads: int | None, hint: str) -> dict[str, str]:
    """The CPU plugin properties imgembed compiles with (latency hint, explicit inference precision)."""
    if hint not in HINTS:
        raise ValueError(f"OpenVINO inference precision {hint!r}; expected one of {list(HINTS)}")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[hint]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    return config


class OpenVinoRunner(Runner):
    """Runs an OpenVINO IR. ``inference_precision``: "fp32" or "bf16" (see the module docstring)."""

    backend = "openvino"

    def __init__(self, model_path: str | Path | ArtifactFile, output_dim: int, *, device: str = "cpu",
                 threads: int | None = None, inference_precision: str = "fp32", name: str | None = None,
                 weights: ArtifactFile | None = None):
        """``model_path``: the ``.xml`` (its ``.bin`` beside it), or an artifact's file with its ``weights``
        file, whose verified bytes are what OpenVINO reads."""
        reason = openvino_unavailable(device)
        if reason:
            raise BackendUnavailableError(reason)
        self.source = model_path if isinstance(model_path, ArtifactFile) else None
        self.weights = weights
        if self.source is not None and weights is None:
            self.weights = self.source.beside(self.source.name.rsplit(".", 1)[0] + ".bin",
                                              f"{self.source.field} weights (.bin beside it)")
        self.model_path = self.source.path if self.source else Path(model_path)
        if self.source is None and (not self.model_path.is_file() or not self.model_path.with_suffix(".bin").is_file()):
            raise ArtifactError(f"OpenVINO model {self.model_path} (with {self.model_path.with_suffix('.bin').name}) "
                                "does not exist")
        if inference_precision not in HINTS:
            raise ValueError(f"inference_precision={inference_precision!r}; expected one of {list(HINTS)}")
        self.device, self.threads, self.inference_precision = device, threads, inference_precision
        self._compiled = None
        self._local = threading.local()
        super().__init__(InputSpec("pixel_values", "float32", (None, None, None, None)), output_dim,
                         name or f"openvino[{self.model_path.parent.name or self.model_path.name}]")

    def _activate_impl(self) -> None:
        ov = import_openvino()
        core = ov.Core()
        try:
            if self.source is not None:  # an artifact's engine: the verified bytes, never the paths
                model = core.read_model(self.source.read(), self.weights.read())
            else:
                model = core.read_model(str(self.model_path))
            self._compiled = core.compile_model(model, "CPU", compile_config(self.threads, self.inference_precision))
        except ImgembedError:
            raise
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long C++ traces
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"OpenVINO could not load {self.model_path}: {first}") from None
        port = self._compiled.inputs[0]
        pshape = port.get_partial_shape()
        shape = tuple(d.get_length() if d.is_static else None for d in pshape)
        dtype = _OV_TO_NUMPY.get(port.get_element_type().get_type_name(), "float32")
        names = port.get_names()
        name = next((n for n in ("pixel_values", "input_ids") if n in names), port.get_any_name())
        self.input_spec = InputSpec(name, dtype, shape)
        self._local = threading.local()

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self._compiled.create_infer_request()
        return req

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        result = self._request().infer({0: x})
        return np.array(result[0], dtype=np.float32, copy=True)

    def _deactivate_impl(self) -> None:
        self._compiled = None
        self._local = threading.local()

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "inference_precision": self.inference_precision}
