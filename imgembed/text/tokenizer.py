"""Text tokenization at inference time: the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library.

No transformers import: an artifact's text tower carries ``text/tokenizer.json`` (the checkpoint's fast
tokenizer, serialised at export) and the manifest records how it is applied (``max_length`` with special
tokens included, ``padding``, the pad id). The export gate checks that these ids equal what the transformers
tokenizer of the checkpoint gives on the parity captions, so the two cannot drift apart silently.

:class:`TokenBatches` hands a caption list to code that slices batches (parity gate, calibration, timing):
each slice is tokenized and padded on its own, exactly as the runtime pads a batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from imgembed.errors import ArtifactError

PADDING = ("longest", "max_length")


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """``texts`` as a list of str (a single str is one text); anything else is a TypeError naming the item."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(t).__name__}")
    return out


class TextTokenizer:
    """Tokenizes captions into the int64 ``input_ids`` a text engine takes.

    ``record``: the manifest's ``text.tokenizer`` entry: ``max_length`` (tokens, specials included; longer
    texts are truncated, keeping the end token), ``padding`` ("longest": pad a batch to its longest text;
    "max_length": always to ``max_length``), ``pad_id``.
    """

    def __init__(self, path: str | Path, record: Mapping[str, Any], *, json_text: str | None = None):
        """Read ``path`` (a tokenizer.json), or take its content from ``json_text`` (``path`` then only names
        it in errors)."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # a dependency of imgembed; only a broken install lacks it
            raise ArtifactError(f"the tokenizers library is missing ({e}); pip install tokenizers") from None
        self.path = Path(path)
        self.max_length = int(record["max_length"])
        self.padding = str(record["padding"])
        self.pad_id = int(record["pad_id"])
        self.padding_side = str(record.get("padding_side", "right"))
        if self.padding_side not in ("right", "left"):
            raise ArtifactError(f"{self.path}: padding_side {self.padding_side!r}; expected 'right' or 'left'")
        if self.padding not in PADDING:
            raise ArtifactError(f"{self.path}: padding {self.padding!r}; expected one of {list(PADDING)}")
        try:
            self._tok = Tokenizer.from_file(str(self.path)) if json_text is None else Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ArtifactError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)

    @classmethod
    def from_str(cls, json_text: str, record: Mapping[str, Any]) -> "TextTokenizer":
        """A tokenizer from the JSON text of a tokenizer.json (used at export, before files are written)."""
        return cls(record.get("file", "tokenizer.json"), record, json_text=json_text)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Truncated, unpadded token ids of each text (specials included)."""
        texts = check_texts(texts)
        return [e.ids for e in self._tok.encode_batch(texts)] if texts else []

    def pad(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """int64 ``(N, L)``: ``L`` the longest row ("longest") or ``max_length``, padded with ``pad_id`` on the
        tokenizer's side (right unless the checkpoint's tokenizer pads left)."""
        length = self.max_length if self.padding == "max_length" else max((len(r) for r in ids), default=1)
        out = np.full((len(ids), max(length, 1)), self.pad_id, dtype=np.int64)
        for i, row in enumerate(ids):
            if self.padding_side == "left":
                out[i, out.shape[1] - len(row):] = row
            else:
                out[i, :len(row)] = row
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenize and pad one batch of texts."""
        return self.pad(self.ids(texts))


class TokenBatches:
    """A caption list that slices into padded id batches (``batches[i:j]`` -> int64 array), for code written
    against arrays of model inputs (the parity gate, INT8 calibration, the engine timing)."""

    def __init__(self, tokenizer: TextTokenizer, texts: Sequence[str]):
        self.tokenizer = tokenizer
        self._ids = tokenizer.ids(texts)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("TokenBatches take slices: batches[i:j]")
        return self.tokenizer.pad(self._ids[index])
