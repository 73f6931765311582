"""The served models: artifact arguments -> unique model ids -> loaded embedders.

Model ids: ``ID=PATH`` sets the id explicitly; otherwise the id is the manifest name when no other served
artifact has that name, and ``NAME-PRECISION`` when several do (e.g. an int8 and an fp32 export of one
model). ``NAME-PRECISION`` is always accepted as an alias. Two artifacts that still resolve to one id are
refused with :class:`DuplicateModelError` naming both paths.

An artifact exported with ``--text`` is served with both towers: its text encoder is opened at load time (so
a text engine this host cannot run fails the start, like an image engine) and gets its own batcher.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from imgembed.artifact import read_manifest
from imgembed.runtime.embedder import Embedder, load_artifact
from imgembed.serve.batcher import Batcher
from imgembed.serve.config import ServeConfig, ServeConfigError
from imgembed.serve.errors import DuplicateModelError

_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


@dataclass
class ServedModel:
    """One model behind the server: its id, aliases, embedder and (once the app starts) its batchers: one
    for images, and one for texts when the artifact has a text tower."""

    id: str
    aliases: tuple[str, ...]
    path: Path
    embedder: Embedder
    batcher: Batcher | None = None
    text_batcher: Batcher | None = None

    @property
    def towers(self) -> list[str]:
        """``["image"]``, or ``["image", "text"]`` for an artifact exported with ``--text``."""
        return self.embedder.towers

    @property
    def has_text(self) -> bool:
        return "text" in self.towers

    def describe(self) -> dict:
        e = self.embedder
        text = None
        if self.has_text:
            t = e.text
            text = {"max_length": t.tokenizer.max_length, "precision": t.engine.precision,
                    "backend": t.runner.backend, "engine": t.engine.id}
        return {"id": self.id, "aliases": list(self.aliases), "name": e.name, "precision": e.precision,
                "dim": e.dim, "normalized": e.normalized, "input_size": list(e.preprocess.output_hw),
                "backend": e.runner.backend, "engine": e.engine.id if e.engine is not None else None,
                "batch_invariant": not self.batch_dependent, "towers": self.towers,
                "space": e.space if self.has_text else None, "text": text}

    @property
    def batch_dependent(self) -> bool:
        """True for an engine that quantizes activations per batch (dynamic INT8): an image's vector shifts
        slightly with the other images of its batch."""
        engine = self.embedder.engine
        return engine is not None and not engine.batch_invariant

    def infer_fn(self, batch_invariant: bool) -> Callable[[np.ndarray], np.ndarray]:
        """The batcher's inference function: the runner's, or -- for a batch-dependent artifact served
        ``batch_invariant`` -- one call per image, so a vector never depends on the other images."""
        infer = self.embedder.runner.infer
        if not (batch_invariant and self.batch_dependent):
            return infer
        return lambda x: np.concatenate([infer(x[i:i + 1]) for i in range(len(x))])

    def text_infer_fn(self, batch_invariant: bool) -> Callable[[np.ndarray], np.ndarray]:
        """The text batcher's inference function: a 1-d object array of texts -> their vectors, in order, in
        one call of the text engine (one call per text for a batch-dependent engine served ``batch_invariant``)."""
        encoder = self.embedder.text
        alone = batch_invariant and not encoder.engine.batch_invariant

        def infer(texts: np.ndarray) -> np.ndarray:
            return encoder.embed(list(texts), batch_size=1 if alone else max(1, len(texts)))

        return infer

    def warm_up(self, max_batch: int) -> None:
        """Run batches of 1 and ``max_batch`` zero images (and short texts, with a text tower) so the first real
        request pays no set-up cost."""
        h, w = self.embedder.preprocess.output_hw
        for n in sorted({1, max_batch}):  # zeros in the runner's input format (crops or pixels)
            self.embedder.runner.infer(np.zeros_like(self.embedder.model_input(np.zeros((n, h, w, 3), np.uint8))))
            if self.has_text:
                self.embedder.text.embed(["a photo."] * n, batch_size=n)


@dataclass(frozen=True)
class ArtifactArg:
    """A parsed ``[ID=]PATH`` command-line argument with its manifest's name and precision."""

    path: Path
    name: str
    precision: str
    explicit_id: str | None = None


def parse_artifact_arg(arg: str) -> ArtifactArg:
    """``PATH`` or ``ID=PATH`` -> ArtifactArg (the manifest is read, not yet verified)."""
    explicit, _, rest = arg.partition("=")
    if rest and explicit and set(explicit) <= _ID_CHARS and not Path(arg).exists():
        path, model_id = Path(rest), explicit
    else:
        path, model_id = Path(arg), None
    manifest = read_manifest(path)
    return ArtifactArg(path, manifest.name, manifest.precision, model_id)


def assign_ids(args: Sequence[ArtifactArg]) -> list[tuple[str, tuple[str, ...]]]:
    """(id, aliases) for each artifact, in order; DuplicateModelError when two would share an id."""
    names = Counter(a.name for a in args if a.explicit_id is None)
    ids = [a.explicit_id or (a.name if names[a.name] == 1 else f"{a.name}-{a.precision}") for a in args]
    seen: dict[str, Path] = {}
    for model_id, a in zip(ids, args, strict=True):
        if model_id in seen:
            raise DuplicateModelError(f"artifacts {seen[model_id]} and {a.path} both resolve to model id "
                                      f"{model_id!r}; name them explicitly with ID=PATH")
        seen[model_id] = a.path
    alias_count = Counter(f"{a.name}-{a.precision}" for a in args)
    out = []
    for model_id, a in zip(ids, args, strict=True):
        alias = f"{a.name}-{a.precision}"
        out.append((model_id, (alias,) if alias_count[alias] == 1 and alias not in seen else ()))
    return out


def load_models(args: Sequence[str], config: ServeConfig) -> list[ServedModel]:
    """Verify and load every artifact on the engine ``config.backend`` selects on ``config.device``; errors
    name the bad argument."""
    if not args:
        raise ServeConfigError("no artifacts to serve: pass at least one artifact directory")
    parsed = [parse_artifact_arg(a) for a in args]
    models = []
    for a, (model_id, aliases) in zip(parsed, assign_ids(parsed), strict=True):
        emb = load_artifact(a.path, backend=config.backend, device=config.device, threads=config.threads,
                            batch_size=config.max_batch, workers=0)
        if "text" in emb.towers:
            _ = emb.text  # opened now: a text engine this host cannot run fails the start, naming the artifact
        models.append(ServedModel(model_id, aliases, a.path, emb))
    return models
