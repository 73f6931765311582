"""TensorRT backend: runs a serialized engine on a CUDA GPU, buffers held in torch CUDA tensors.

Written against TensorRT's name-based tensor API (TensorRT >= 8.6: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``), which TensorRT 10 and 11 keep. ``tensorrt`` and ``torch``
are imported on activation only, so this module imports on any machine.

Not yet run on GPU hardware; the pure-Python parts (profiles,
keys, compatibility, chunking) are tested, the CUDA path is written to the documented API only.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgembed.artifact import ArtifactFile, ArtifactFiles
from imgembed.errors import ArtifactError, BackendUnavailableError, EngineMismatchError, ImgembedError
from imgembed.runtime.base import InputSpec, Runner
from imgembed.runtime.gpu import current_gpu
from imgembed.runtime.runners.tensorrt_plans import BatchProfile, EngineEnv, plan_chunks, select_engine

if TYPE_CHECKING:
    from imgembed.artifact import Manifest

INSTALL_HINT = ("install TensorRT from NVIDIA's index (pip install tensorrt-cu12, or tensorrt-cu13 for CUDA 13) "
                "on a machine with an NVIDIA GPU and a CUDA build of torch")


def import_tensorrt():
    """The ``tensorrt`` module, or BackendUnavailableError saying how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    return tensorrt


def tensorrt_unavailable(device: str = "cuda") -> str | None:
    """Why TensorRT cannot run on ``device`` here, or None (no GPU work is done to find out)."""
    if device != "cuda":
        return f"TensorRT runs on CUDA GPUs only, not on {device!r}"
    try:
        import_tensorrt()
        import torch
    except (BackendUnavailableError, ImportError) as e:
        return str(e)
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def current_env() -> EngineEnv:
    """This machine's GPU and TensorRT version (what engines are keyed by)."""
    trt = import_tensorrt()
    return EngineEnv(current_gpu(), str(trt.__version__))


def _torch_dtype(trt, torch, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise ArtifactError(f"engine I/O tensor of TensorRT type {dtype}; expected one of {sorted(map(str, table))}")
    return table[dtype]


class TrtRunner(Runner):
    """Runs a TensorRT engine file mapping (N, 3, H, W) float32 -> (N, dim) float32 on CUDA device 0.

    Batches beyond the engine's profile are split (larger than max) or zero-padded (smaller than min).
    """

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path | ArtifactFile, output_dim: int, *, name: str | None = None):
        """``engine_path``: a plan file, or an artifact's file whose verified bytes are deserialized."""
        self.source = engine_path if isinstance(engine_path, ArtifactFile) else None
        self.engine_path = self.source.path if self.source else Path(engine_path)
        if self.source is None and not self.engine_path.is_file():
            raise ArtifactError(f"TensorRT engine {self.engine_path} does not exist")
        self.profile: BatchProfile | None = None
        self._engine = self._context = self._runtime = None
        super().__init__(InputSpec("pixel_values", "float32", (None, None, None, None)), output_dim,
                         name or f"tensorrt[{self.engine_path.name}]")

    def _activate_impl(self) -> None:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError("TensorRT needs a CUDA device; torch.cuda.is_available() is False")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        plan = self.source.read() if self.source is not None else self.engine_path.read_bytes()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT {trt.__version__} could not deserialize {self.engine_path} on "
                f"{torch.cuda.get_device_name(0)}: engines only load with the TensorRT version and GPU model "
                "that built them; rebuild with `imgembed export NAME --trt`")
        self._engine, self._context = engine, engine.create_execution_context()
        self._bind_io(trt, torch)

    def _bind_io(self, trt, torch) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"{self.engine_path}: expected one input and one output, got {inputs} -> {outputs}")
        self._in, self._out = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(trt, torch, engine.get_tensor_dtype(self._in))
        self._out_dtype = _torch_dtype(trt, torch, engine.get_tensor_dtype(self._out))
        lo, opt, hi = engine.get_tensor_profile_shape(self._in, 0)
        self.profile = BatchProfile(int(lo[0]), int(opt[0]), int(hi[0]))
        shape = tuple(engine.get_tensor_shape(self._in))
        self.input_spec = InputSpec(self._in, "float32", (None, *(d if d > 0 else None for d in shape[1:])))

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        parts = [self._run(x[start:stop], size) for start, stop, size in plan_chunks(len(x), self.profile)]
        return np.concatenate(parts)

    def _run(self, x: np.ndarray, size: int) -> np.ndarray:
        import torch

        n = len(x)
        if size > n:  # below the profile's min batch: zero-pad, drop the padding's outputs
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        stream = torch.cuda.current_stream()
        inp = torch.from_numpy(np.ascontiguousarray(x)).to("cuda", dtype=self._in_dtype)
        ctx = self._context
        if not ctx.set_input_shape(self._in, tuple(inp.shape)):
            raise ImgembedError(f"{self.name}: TensorRT rejected input shape {tuple(inp.shape)} "
                                f"(profile {self.profile})")
        out = torch.empty(tuple(ctx.get_tensor_shape(self._out)), dtype=self._out_dtype, device="cuda")
        ctx.set_tensor_address(self._in, inp.data_ptr())
        ctx.set_tensor_address(self._out, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise ImgembedError(f"{self.name}: TensorRT execute_async_v3 failed for a batch of {size}")
        stream.synchronize()
        return out[:n].float().cpu().numpy()

    def _deactivate_impl(self) -> None:
        self._context = self._engine = self._runtime = None

    def describe(self) -> dict:
        return {**super().describe(), "engine": str(self.engine_path),
                "profile": None if self.profile is None else self.profile.to_dict()}


def engine_records(manifest: "Manifest") -> list[dict]:
    """The artifact's TensorRT engines as the plan records :func:`~.trt_engines.select_engine` chooses from."""
    out = []
    for e in manifest.engines:
        if e.backend == "tensorrt" and e.target is not None:
            out.append({**e.target.model_dump(), "id": e.id, "file": e.files.get("plan"), "precision": e.precision})
    return out


def artifact_engine(artifact: str | Path, precision: str | None = None, env: EngineEnv | None = None,
                    files: ArtifactFiles | None = None) -> tuple[ArtifactFile, dict]:
    """The engine file (and its record) of ``artifact`` that runs on this machine, through the artifact's
    resolver (``files``; by default one that checks every sha256): its bytes are verified when read."""
    from imgembed.artifact import read_manifest, verify

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if files is None:
        verify(artifact, manifest)
        files = ArtifactFiles.of(artifact, manifest)
    record = select_engine(engine_records(manifest), env or current_env(), precision, where=str(artifact))
    return files.file(record.get("file"), f"tensorrt engine {record.get('key', record.get('precision'))!r} file"), \
        record


def load_trt_runner(artifact: str | Path, precision: str | None = None) -> TrtRunner:
    """A TrtRunner over the engine of ``artifact`` built for this GPU and TensorRT version."""
    from imgembed.artifact import read_manifest

    path, record = artifact_engine(artifact, precision)
    dim = read_manifest(artifact).output.dim
    return TrtRunner(path, dim, name=f"tensorrt[{Path(artifact).name}-{record['precision']}]")
