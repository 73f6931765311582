"""The text tower at inference: captions -> tokenizer.json (tokenizers) -> text engine -> vectors.

An artifact exported with ``--text`` holds ``text/`` (engines + tokenizer.json) and a manifest ``text`` entry.
:func:`open_text` picks the text engine for this host with the same backend table and rules as the image
tower (:func:`~imgembed.runtime.backends.select_engine`). Captions are embedded longest-first in batches, so a
batch pads to similar lengths ("longest" padding), and the vectors come back in input order; the export gate
proved that padding and batch-mates do not change a vector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgembed.artifact import ArtifactFiles, Engine, Manifest, TextTower, Tokenizer
from imgembed.errors import ArtifactError
from imgembed.runtime.base import Runner
from imgembed.text.tokenizer import TextTokenizer, check_texts

DEFAULT_TEXT_BATCH = 32


def text_tower(manifest: Manifest, where: str) -> TextTower:
    """The artifact's text tower, or an ArtifactError saying how to export one."""
    if manifest.text is None:
        raise ArtifactError(f"{where} has no text tower; export it with `imgembed export {manifest.name} "
                            "--text` (CLIP and SigLIP models)")
    return manifest.text


class TextEncoder:
    """Embeds captions with one text runner. ``embed`` is safe to call from several threads (ONNX Runtime
    sessions and OpenVINO infer requests are per call / per thread)."""

    def __init__(self, runner: Runner, tokenizer: TextTokenizer, *, name: str, engine: Engine,
                 batch_size: int = DEFAULT_TEXT_BATCH):
        self.runner = runner.activate()
        self.tokenizer = tokenizer
        self.name = name
        self.engine = engine
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.runner.output_dim

    def embed(self, texts: Any, batch_size: int | None = None) -> np.ndarray:
        """float32 ``(N, dim)`` for ``texts`` (a string or a list of strings), in input order."""
        texts = check_texts(texts)
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        ids = self.tokenizer.ids(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            out[chunk] = self.runner.infer(self.tokenizer.pad([ids[i] for i in chunk]))
        return out

    def close(self) -> None:
        self.runner.deactivate()


def open_text(path: str | Path, manifest: Manifest, *, backend: str = "auto", device: str = "cpu",
              threads: int | None = None, batch_size: int = DEFAULT_TEXT_BATCH,
              files: ArtifactFiles | None = None) -> TextEncoder:
    """The text encoder of an artifact; the tokenizer and engine files are read through ``files`` (by default
    the resolver of the manifest's ``files``, sha256 checked)."""
    from imgembed.runtime.backends import open_engine, select_engine

    path = Path(path)
    files = files or ArtifactFiles.of(path, manifest)
    text = text_tower(manifest, str(path))
    engine, _ = select_engine(text, backend, device, where=f"{path} (text tower)")
    tokenizer = read_tokenizer(files, text.tokenizer)
    name = f"{manifest.name}-text"
    runner = open_engine(path, manifest, engine, device=device, threads=threads, files=files, dim=text.dim, name=name)
    return TextEncoder(runner, tokenizer, name=name, engine=engine, batch_size=batch_size)


def read_tokenizer(files: ArtifactFiles, record: Tokenizer) -> TextTokenizer:
    """The text tower's tokenizer from the verified bytes of its tokenizer.json."""
    data = files.read(record.file, "text tokenizer file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{files.directory / record.file}: tokenizer.json is not UTF-8 ({e})") from None
    return TextTokenizer(files.directory / record.file, record.model_dump(by_alias=True), json_text=text)


def describe_towers(manifest: Manifest | None) -> list[str]:
    """The towers an artifact holds ("image", and "text" when exported with --text)."""
    return ["image", "text"] if manifest is not None and manifest.text is not None else ["image"]
