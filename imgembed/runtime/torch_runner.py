"""PyTorch backend: runs the original model (an EmbeddingHead) eagerly."""
from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError
from .base import InputSpec, Runner


class TorchRunner(Runner):
    """Runs a ``torch.nn.Module`` mapping (N, 3, H, W) float32 -> (N, dim). CPU unless device="cuda"."""

    backend = "torch"

    def __init__(self, module, input_hw: tuple[int, int], output_dim: int, *, device: str = "cpu",
                 threads: int | None = None, name: str = "torch"):
        try:
            import torch
        except ImportError:
            raise BackendUnavailableError("PyTorch is not installed: pip install torch") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device 'cuda' requested but torch.cuda.is_available() is False")
        self.module = module
        self.device = device
        self.threads = threads
        super().__init__(InputSpec("pixel_values", "float32", (None, 3, *input_hw)), output_dim, name)

    def _activate_impl(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.module = self.module.eval().to(self.device)

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device))
        return out.float().cpu().numpy()
