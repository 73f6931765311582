"""ONNX Runtime backend: CPU always, CUDA when onnxruntime-gpu and a GPU are present."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError
from .base import InputSpec, Runner

_ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def resolve_providers(device: str) -> list[str]:
    """Execution providers for ``device`` ("cpu" or "cuda"); a missing CUDA provider is a typed error."""
    avail = available_providers()
    if not avail:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise BackendUnavailableError(
                f"ONNX Runtime CUDA provider not available (have {avail}); install onnxruntime-gpu "
                "(pip install 'imgembed[gpu]') on a machine with an NVIDIA GPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BackendUnavailableError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


class OrtRunner(Runner):
    """Runs an ONNX model with ONNX Runtime. The session is created on activate()."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, output_dim: int, *, device: str = "cpu",
                 threads: int | None = None, providers: Sequence[str] | None = None, name: str | None = None):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ArtifactError(f"ONNX model {self.model_path} does not exist")
        self.device = device
        self.providers = list(providers) if providers else resolve_providers(device)
        self.threads = threads
        self.session = None
        super().__init__(InputSpec("pixel_values", "float32", (None, None, None, None)), output_dim,
                         name or f"onnxruntime[{self.model_path.parent.name or self.model_path.name}]")

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types; wrap with the file name
            raise ArtifactError(f"ONNX Runtime could not load {self.model_path}: {e}") from None
        inp = self.session.get_inputs()[0]
        shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_spec = InputSpec(inp.name, _ORT_TO_NUMPY.get(inp.type, inp.type), shape)
        self._output_name = self.session.get_outputs()[0].name

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self.input_spec.name: x})[0]

    def _deactivate_impl(self) -> None:
        self.session = None
