"""The runner interface shared by every backend (Polygraphy-style).

A runner turns a float32 NCHW batch of preprocessed pixels into a float32 (N, dim) batch of embeddings.
The base class does every check (active? right rank, dtype, channel and spatial size?) and the output
shape check, so backends implement only ``_activate_impl``, ``_infer_impl`` and ``_deactivate_impl``.
One conformance suite (tests/test_runtime_conformance.py) runs over every available runner.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from imgembed.errors import ImgembedError


@dataclass(frozen=True)
class InputSpec:
    """What a runner's input tensor must look like. ``None`` in shape is a dynamic (batch) axis."""

    name: str
    dtype: str            # numpy dtype name, e.g. "float32"
    shape: tuple          # (None, 3, H, W)
    layout: str = "NCHW"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "layout": self.layout}


class Runner(ABC):
    """Base runner. Use as a context manager or call activate()/deactivate()."""

    backend: str = "base"

    def __init__(self, input_spec: InputSpec, output_dim: int, name: str):
        self.input_spec = input_spec
        self.output_dim = output_dim
        self.name = name
        self.is_active = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- inference ---------------------------------------------------------------------------------
    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        """Embed a preprocessed batch: ``(N, C, H, W)`` float32 -> ``(N, dim)`` float32."""
        if not self.is_active:
            raise ImgembedError(f"{self.name}: runner is not active; call activate() or use it as a context manager")
        self._check_input(pixel_values)
        out = np.asarray(self._infer_impl(np.ascontiguousarray(pixel_values)), dtype=np.float32)
        expected = (pixel_values.shape[0], self.output_dim)
        if out.shape != expected:  # internal invariant: a backend returned the wrong shape
            raise ImgembedError(f"{self.name}: backend returned shape {out.shape}, expected {expected}")
        return out

    def _check_input(self, x: np.ndarray) -> None:
        spec = self.input_spec
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{self.name}: input must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.dtype(spec.dtype):
            raise TypeError(f"{self.name}: input dtype {x.dtype} but {spec.name!r} expects {spec.dtype}")
        if x.ndim != len(spec.shape) or x.shape[0] == 0:
            raise ValueError(f"{self.name}: input shape {x.shape} does not match {spec.name!r} {spec.shape} "
                             "(a non-empty batch is required)")
        for got, want in zip(x.shape[1:], spec.shape[1:], strict=True):
            if want is not None and got != want:
                raise ValueError(f"{self.name}: input shape {x.shape} does not match {spec.name!r} {spec.shape}")

    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, x: np.ndarray) -> np.ndarray: ...

    def _deactivate_impl(self) -> None:  # noqa: B027 - optional hook: most backends have nothing to release
        pass

    def describe(self) -> dict:
        return {"backend": self.backend, "name": self.name, "input": self.input_spec.to_dict(),
                "output_dim": self.output_dim}
