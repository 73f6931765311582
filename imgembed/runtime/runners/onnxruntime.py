"""ONNX Runtime backend: CPU always, CUDA when onnxruntime-gpu and a GPU are present."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from imgembed.artifact import ArtifactFile
from imgembed.errors import ArtifactError, BackendUnavailableError
from imgembed.runtime.base import InputSpec, Runner

_ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
                 "tensor(int64)": "int64"}
CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


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


def cuda_provider_options(cudnn_conv_algo_search: str | None = None, **options) -> dict[str, str]:
    """Options of ONNX Runtime's CUDAExecutionProvider (values as strings, as ORT takes them).

    ``cudnn_conv_algo_search``: EXHAUSTIVE (ORT's default: benchmark every cuDNN algorithm per new input
    shape; slow first call per batch size), HEURISTIC (cuDNN's pick, no benchmarking) or DEFAULT. Other
    keys (``device_id``, ``gpu_mem_limit``, ``arena_extend_strategy``...) are passed through.
    """
    out = {k: str(v) for k, v in options.items()}
    if cudnn_conv_algo_search is not None:
        if cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
            raise ValueError(f"cudnn_conv_algo_search={cudnn_conv_algo_search!r}; expected one of "
                             f"{list(CUDNN_CONV_ALGO_SEARCH)}")
        out["cudnn_conv_algo_search"] = cudnn_conv_algo_search
    return out


def _with_cuda_options(providers: list, options: dict[str, str]) -> list:
    return [("CUDAExecutionProvider", options) if p == "CUDAExecutionProvider" and options else p for p in providers]


def verified_external_data(source: ArtifactFile, model: bytes) -> dict[str, bytes]:
    """The verified bytes of every external-data file of ``model`` (the bytes of ``source``), by the location
    the model names; each location goes through the artifact's resolver. Models that never mention
    ``location`` (every model under 2 GB that imgembed writes) are not parsed."""
    if b"location" not in model:
        return {}
    import onnx

    from imgembed.artifact.store import _tensors

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{source.path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    found: dict[str, bytes] = {}
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if location not in found:
            field = f"{source.field} ({source.rel}) tensor {tensor.name!r} external data location"
            found[location] = source.beside(location, field).read()
    return found


class OrtRunner(Runner):
    """Runs an ONNX model with ONNX Runtime. The session is created on activate().

    ``cuda_options`` (device="cuda"): CUDAExecutionProvider options, see :func:`cuda_provider_options`.
    ``io_binding``: run through an ``IOBinding`` (input bound from host memory, output allocated by ORT on
    the session's device and copied back once) instead of ``session.run``.
    """

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path | ArtifactFile, output_dim: int, *, device: str = "cpu",
                 threads: int | None = None, providers: Sequence[str] | None = None, name: str | None = None,
                 cuda_options: dict | None = None, io_binding: bool = False):
        self.source = model_path if isinstance(model_path, ArtifactFile) else None
        self.model_path = self.source.path if self.source else Path(model_path)
        if self.source is None and not self.model_path.is_file():
            raise ArtifactError(f"ONNX model {self.model_path} does not exist")
        self.device = device
        self.providers = list(providers) if providers else resolve_providers(device)
        self.providers = _with_cuda_options(self.providers, cuda_provider_options(**(cuda_options or {})))
        self.io_binding = io_binding
        self.threads = threads
        self.session = None
        super().__init__(InputSpec("pixel_values", "float32", (None, None, None, None)), output_dim,
                         name or f"onnxruntime[{self.model_path.parent.name or self.model_path.name}]")

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        from imgembed.artifact import check_external_data

        opts = ort.SessionOptions()
        if self.source is not None:  # an artifact's engine: ORT gets the verified bytes, never the path
            model = self.source.read()
            for location, data in verified_external_data(self.source, model).items():
                opts.add_external_initializers_from_files_in_memory([location], [data], [len(data)])
        else:
            check_external_data(self.model_path)  # refuse data outside the directory before ORT reads it
            model = str(self.model_path)
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: unused-initializer notices of quantized graphs are noise
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types; wrap with the file name
            raise ArtifactError(f"ONNX Runtime could not load {self.model_path}: {e}") from None
        inp = self.session.get_inputs()[0]
        shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_spec = InputSpec(inp.name, _ORT_TO_NUMPY.get(inp.type, inp.type), shape)
        self._output_name = self.session.get_outputs()[0].name

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self._output_name], {self.input_spec.name: x})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_spec.name, x)
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        binding.bind_output(self._output_name, "cuda" if on_gpu else "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _deactivate_impl(self) -> None:
        self.session = None
