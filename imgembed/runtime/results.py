"""One record for "vectors + errors": what an inference batch, ``embed(..., on_error="report")``, a folder
job's chunk and a job's output (``read_embeddings``, ``embed_with_ray``) all return.

Rows of ``vectors`` are the inputs that were embedded, ``indices`` says which input each row is, and
``errors`` holds one ``(input index, exception or message)`` per input that failed; the good inputs are
never lost to the bad ones. When the inputs are files, ``names`` holds them by input index, and
``paths`` / ``failures`` read the record by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass
class Embeddings:
    """Vectors of the embedded inputs and the failures, keyed by input index (see the module docstring)."""

    indices: list[int]                                   # input index of each row of ``vectors``, in order
    vectors: np.ndarray                                  # (len(indices), dim) float32
    errors: list[tuple[int, Any]] = field(default_factory=list)   # (input index, exception or message)
    names: Sequence[str] | None = field(default=None, repr=False)  # input names (paths) by index
    metadata: dict = field(default_factory=dict)         # e.g. a job output's model, precision, decode mode

    def __post_init__(self) -> None:
        if self.vectors.shape[0] != len(self.indices):
            raise ValueError(f"Embeddings: {len(self.indices)} indices but {self.vectors.shape[0]} vectors")

    @property
    def inputs(self) -> int:
        """How many inputs the record covers: embedded plus failed."""
        return len(self.indices) + len(self.errors)

    @property
    def paths(self) -> list[str]:
        """The name of each row of ``vectors`` (inputs that are files)."""
        return [self._names()[i] for i in self.indices]

    @property
    def failures(self) -> list[tuple[str, str]]:
        """``(name, message)`` of each failed input (inputs that are files)."""
        return [(self._names()[i], str(e)) for i, e in self.errors]

    def _names(self) -> Sequence[str]:
        if self.names is None:
            raise ValueError("these embeddings have no input names; read them by indices")
        return self.names

    def rows(self, dim: int) -> tuple[list[int], np.ndarray, list[str | None]]:
        """Every input in index order: (index, vector -- zeros where it failed --, error message or None)."""
        idx = list(self.indices) + [i for i, _ in self.errors]
        vectors = np.zeros((len(idx), dim), np.float32)
        vectors[:len(self.indices)] = self.vectors
        messages = [None] * len(self.indices) + [str(e) for _, e in self.errors]
        order = np.argsort(idx, kind="stable")
        return [idx[k] for k in order], vectors[order], [messages[k] for k in order]

    @classmethod
    def concat(cls, parts: Sequence["Embeddings"], dim: int, names: Sequence[str] | None = None,
               metadata: dict | None = None) -> "Embeddings":
        """One record from several (rows and errors sorted by input index)."""
        indices = [i for p in parts for i in p.indices]
        order = np.argsort(indices, kind="stable")
        vectors = np.concatenate([p.vectors for p in parts]) if indices else np.zeros((0, dim), np.float32)
        errors = sorted((e for p in parts for e in p.errors), key=lambda e: e[0])
        return cls([indices[k] for k in order], vectors[order], errors, names, metadata or {})
