"""Batch jobs: the decode/inference pipeline (:mod:`.pipeline`), resumable folder jobs writing Parquet
(:mod:`.folder`, :mod:`.parquet`). Kept import-light: nothing here imports torch or onnxruntime."""
from __future__ import annotations

from ..errors import ImgembedError


class JobError(ImgembedError):
    """A folder job cannot run or resume (e.g. its work directory was made with another model)."""


__all__ = ["JobError"]
