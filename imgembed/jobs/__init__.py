"""Batch jobs: the decode/inference pipeline (:mod:`.pipeline`), resumable folder jobs writing Parquet
(:mod:`.folder`, :mod:`.parquet`). Kept import-light: nothing here imports torch or onnxruntime."""
from __future__ import annotations

import unicodedata

from imgembed.errors import ImgembedError


class JobError(ImgembedError):
    """A folder job cannot run or resume (e.g. its work directory was made with another model)."""


def printable(text: str) -> str:
    """``text`` with control and format characters (terminal escapes, bidi overrides, newlines) written as
    ``\\xNN`` / ``\\uNNNN``, for printing names read from files of unknown origin."""
    return "".join(c if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


__all__ = ["JobError", "printable"]
