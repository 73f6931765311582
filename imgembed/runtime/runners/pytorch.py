"""PyTorch backend: runs the original model (an EmbeddingHead), eagerly or compiled, in FP32, FP16 or BF16.

Options (all default off, so the default runner is the plain FP32 original):
* ``dtype="fp16" | "bf16"``: the weights of a *copy* of the module are cast (the caller's module stays FP32),
  inputs are cast inside ``infer`` and outputs returned as float32. BF16 also runs on CPUs.
* ``compile=True``: ``torch.compile(dynamic=False)`` — one specialised graph per batch size, so it suits
  fixed batch sizes; ``compile_backend`` picks the dynamo backend ("inductor" by default).
* ``cuda_graphs=True`` (CUDA only): each batch size is captured once into a ``torch.cuda.CUDAGraph`` after
  three warm-up calls (the whole-network capture of PyTorch's CUDA-graphs guide) and replayed after that;
  inputs are copied into the captured static buffer. Every new batch size costs one capture and its memory.
"""
from __future__ import annotations

import copy

import numpy as np

from imgembed.errors import BackendUnavailableError
from imgembed.runtime.base import InputSpec, Runner

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GRAPH_WARMUP = 3


class TorchRunner(Runner):
    """Runs a ``torch.nn.Module`` mapping (N, 3, H, W) float32 -> (N, dim). CPU unless device="cuda"."""

    backend = "torch"

    def __init__(self, module, input_hw: tuple[int, int], output_dim: int, *, device: str = "cpu",
                 threads: int | None = None, name: str = "torch", dtype: str = "fp32", compile: bool = False,
                 cuda_graphs: bool = False, compile_backend: str = "inductor"):
        try:
            import torch
        except ImportError:
            raise BackendUnavailableError("PyTorch is not installed: pip install torch") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device 'cuda' requested but torch.cuda.is_available() is False")
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype!r}; expected one of {list(DTYPES)}")
        if cuda_graphs and device != "cuda":
            raise BackendUnavailableError(f"{name}: cuda_graphs=True needs device='cuda', got device={device!r}")
        if device == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise BackendUnavailableError(f"{name}: this GPU ({torch.cuda.get_device_name(0)}) has no BF16 support")
        self.module = module
        self.device, self.threads, self.dtype = device, threads, dtype
        self.compile, self.cuda_graphs, self.compile_backend = compile, cuda_graphs, compile_backend
        self._run_module = None
        self._graphs: dict[int, tuple] = {}
        super().__init__(InputSpec("pixel_values", "float32", (None, 3, *input_hw)), output_dim, name)

    def _activate_impl(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        module = self.module.eval()
        if self.dtype != "fp32":  # cast a copy: the caller's (often shared) FP32 original stays as it is
            module = copy.deepcopy(module).to(dtype=getattr(torch, DTYPES[self.dtype]))
        module = module.to(self.device)
        if self.compile:
            module = torch.compile(module, backend=self.compile_backend, dynamic=False)
        self._run_module, self._graphs = module, {}

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        import torch

        inp = torch.from_numpy(x).to(self.device, dtype=getattr(torch, DTYPES[self.dtype]))
        if self.cuda_graphs:
            out = self._replay(inp)
        else:
            with torch.inference_mode():
                out = self._run_module(inp)
        return out.float().cpu().numpy()

    def _replay(self, inp):
        """Run through the CUDA graph captured for this batch size (captured on first use)."""
        entry = self._graphs.get(inp.shape[0])
        if entry is None:
            entry = self._graphs[inp.shape[0]] = self._capture(inp)
        graph, static_in, static_out = entry
        static_in.copy_(inp)
        graph.replay()
        return static_out

    def _capture(self, inp) -> tuple:
        import torch

        static_in = inp.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):  # warm-up (and compilation) outside the capture, on a side stream
                self._run_module(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self._run_module(static_in)
        return graph, static_in, static_out

    def _deactivate_impl(self) -> None:
        self._run_module, self._graphs = None, {}

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "dtype": self.dtype, "compile": self.compile,
                "cuda_graphs": self.cuda_graphs}
