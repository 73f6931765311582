"""The Embedder: inputs -> decode -> preprocess -> runner -> vectors, in bounded batches.

``load()`` picks the runner: an artifact directory runs on the engine that
:func:`~imgembed.runtime.backends.select_engine` picks for this host (after its checksums are verified), a
registry name runs the PyTorch original. Whatever the backend, decoding and preprocessing are
the one implementation in :mod:`imgembed.preprocess` (``decode="exact"``, the default, HF-identical) or its
fast variant in :mod:`imgembed.preprocess.fast` (``decode="fast"``). Each item becomes a uint8 model-size crop;
a uint8-input artifact takes the crops as they are, every other runner gets them normalised to float32
NCHW. ``workers=N`` decodes in N threads overlapped with inference (:mod:`imgembed.runtime.pipeline`);
``load()`` pipelines by default (one decode thread per core), ``workers=0`` decodes inline.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from imgembed.artifact import ArtifactFiles, Engine, Manifest, engine_files, read_manifest, verify
from imgembed.errors import ArtifactError, ImageDecodeError, UnknownModelError
from imgembed.models.registry import ModelSpec, get_spec, registry
from imgembed.preprocess import PreprocessSpec
from imgembed.preprocess.fast import check_mode, load_crop
from imgembed.runtime.base import Runner
from imgembed.runtime.inputs import model_input, takes_crops
from imgembed.runtime.pipeline import default_workers, pipelined_batches
from imgembed.runtime.results import Embeddings

DEFAULT_BATCH_SIZE = 16
ON_ERROR = ("raise", "report")


class Embedder:
    """Embeds images with one runner. Thread-safe for concurrent ``embed`` calls on ORT and torch CPU."""

    def __init__(self, runner: Runner, preprocess: PreprocessSpec, *, name: str, precision: str,
                 normalized: bool, manifest: Manifest | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_pixels: int = 64_000_000, decode: str = "exact", workers: int = 0):
        self.runner = runner.activate()
        self.preprocess = preprocess
        self.name = name
        self.precision = precision
        self.normalized = normalized
        self.manifest = manifest
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.decode = check_mode(decode)
        self.workers = workers
        self.artifact_path: Path | None = None   # set by load_artifact
        self.engine: Engine | None = None         # the artifact engine that runs (set by load_artifact)
        self._text = None                        # the text tower's encoder, opened on first use
        self._text_options: dict = {}            # backend/device/threads of the text tower (load_artifact)

    @property
    def dim(self) -> int:
        return self.runner.output_dim

    @property
    def input_format(self) -> str:
        """``"uint8"`` when the runner takes uint8 NHWC crops (a uint8 artifact), else ``"float32"`` (NCHW)."""
        return "uint8" if takes_crops(self.runner) else "float32"

    def model_input(self, crops: np.ndarray) -> np.ndarray:
        """The runner's input for uint8 ``(N, H, W, 3)`` crops (see :func:`imgembed.runtime.inputs.model_input`)."""
        return model_input(self.runner, crops, self.preprocess)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, backend={self.runner.backend}, precision={self.precision}, dim={self.dim})"

    def close(self) -> None:
        self.runner.deactivate()
        if self._text is not None:
            self._text.close()
            self._text = None

    # -- text tower (artifacts exported with --text) ----------------------------------------------------
    @property
    def towers(self) -> list[str]:
        """The towers this embedder can run: ``["image"]``, or ``["image", "text"]``."""
        from imgembed.runtime.text import describe_towers

        return describe_towers(self.manifest) if self.artifact_path is not None else ["image"]

    @property
    def space(self) -> dict | None:
        """The shared image-text space (dim, normalisation, scoring), or None without a text tower."""
        space = self.manifest.space if self.manifest is not None else None
        return None if space is None else space.model_dump()

    @property
    def text(self):
        """The :class:`~imgembed.runtime.text.TextEncoder` of this artifact (opened on first use)."""
        if self._text is None:
            from imgembed.runtime.text import open_text

            if self.artifact_path is None:
                raise ArtifactError(f"{self.name}: text embeddings need an artifact exported with --text "
                                    f"(imgembed export {self.name} --text); a registry original embeds images only")
            self._text = open_text(self.artifact_path, self.manifest, **self._text_options)
        return self._text

    def embed_text(self, texts, *, batch_size: int | None = None) -> np.ndarray:
        """Embed captions into the image embedding space: float32 ``(N, dim)``, in input order."""
        return self.text.embed(texts, batch_size=batch_size)

    def _vectors(self, images_or_vectors) -> np.ndarray:
        if isinstance(images_or_vectors, np.ndarray) and images_or_vectors.dtype.kind == "f" \
                and images_or_vectors.ndim == 2 and images_or_vectors.shape[1] == self.dim:
            return images_or_vectors
        return self.embed(images_or_vectors)

    def rank(self, images_or_vectors, texts, k: int | None = None):
        """For each text, the images best first: a :class:`~imgembed.text.scoring.Ranking` (indices into the
        images, cosine scores). Images are anything :meth:`embed` takes, or their (N, dim) vectors."""
        from imgembed.text.scoring import rank

        return rank(self.embed_text(texts), self._vectors(images_or_vectors), k)

    def classify(self, images_or_vectors, labels, template: str = "a photo of a {}.") -> np.ndarray:
        """Zero-shot label probabilities ``(N_images, N_labels)``: each label in ``template``, scored as the
        model defines (CLIP softmax over the labels, SigLIP sigmoid per label)."""
        from imgembed.text.scoring import probabilities
        from imgembed.text.tokenizer import check_texts

        labels = check_texts(labels, "labels")
        if not labels:
            raise ValueError("labels must hold at least one label")
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain {{}} where the label goes")
        return probabilities(self._vectors(images_or_vectors), self.embed_text([template.format(x) for x in labels]),
                             self.space or {})

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def embed_pixels(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Embed already-preprocessed pixels in the runner's input format: float32 NCHW, or uint8 NHWC crops
        for a uint8 artifact (see :attr:`input_format`)."""
        bs = self.batch_size if batch_size is None else batch_size
        return np.concatenate([self.runner.infer(pixels[i:i + bs]) for i in range(0, len(pixels), bs)])

    def embed(self, items: Iterable[Any], *, batch_size: int | None = None, on_error: str = "raise",
              workers: int | None = None, decode: str | None = None):
        """Embed images (paths, PIL images, uint8 arrays, encoded bytes).

        ``on_error="raise"`` (default): returns float32 ``(N, dim)``; the first undecodable item raises
        ImageDecodeError naming it. ``on_error="report"``: returns :class:`~imgembed.runtime.results.Embeddings`,
        the vectors of every good item and one error per bad item (the good items are never lost). ``workers`` (decode
        threads, default the Embedder's) and ``decode`` ("exact" | "fast") override the Embedder's settings.
        """
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}; expected one of {list(ON_ERROR)}")
        if isinstance(items, (str, bytes, os.PathLike)) or not hasattr(items, "__iter__"):
            items = [items]  # a single image is a batch of one
        vectors, indices, errors = [], [], []
        for res in self.iter_batches(items, batch_size=batch_size, workers=workers, decode=decode):
            if res.errors and on_error == "raise":
                raise res.errors[0][1]
            vectors.append(res.vectors)
            indices += res.indices
            errors += [(i, str(e)) for i, e in res.errors]
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return out if on_error == "raise" else Embeddings(indices, out, errors)

    def iter_batches(self, items: Iterable[Any], *, batch_size: int | None = None, workers: int | None = None,
                     decode: str | None = None, catch: tuple = (ImageDecodeError,)) -> Iterator[Embeddings]:
        """Stream :class:`~imgembed.runtime.results.Embeddings` batches over ``items`` (consumed lazily, in order,
        bounded memory); failures of the types in ``catch`` are reported in the batches, never raised."""
        bs = self.batch_size if batch_size is None else batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        mode = check_mode(self.decode if decode is None else decode)
        workers = self.workers if workers is None else workers

        def prepare(pair: tuple[int, Any]) -> np.ndarray:
            """One model input, made in a decode thread: the crop, or (float runners) its normalised CHW."""
            index, item = pair
            crop = load_crop(item, self.preprocess, mode, name=self._item_name(item, index),
                             max_pixels=self.max_pixels)
            return self.model_input(crop[None])[0]

        def infer(inputs: list[np.ndarray]) -> np.ndarray:
            return self.runner.infer(np.stack(inputs))

        return pipelined_batches(prepare, infer, enumerate(items), batch_size=bs, workers=workers, catch=catch,
                                 dim=self.dim)

    @staticmethod
    def _item_name(item: Any, index: int) -> str | None:
        return None if isinstance(item, (str, os.PathLike)) else f"item {index}"


def load_artifact(path: str | Path, *, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, verify_checksums: bool = True,
                  allow_failed: bool = False, decode: str = "exact", workers: int | None = None,
                  require_signature: str | Path | None = None, signature: str | Path | None = None) -> Embedder:
    """An Embedder over an exported artifact, on the engine :func:`~imgembed.runtime.backends.select_engine`
    picks for ``backend`` ("auto" or a backend name) and ``device``; ``decode``/``workers``: see
    :class:`Embedder`. ``require_signature``: a PEM public key; the artifact must carry a signature by its
    private key over exactly its files (``signature``, default ``NAME.sig`` beside the directory), checked
    before the manifest is read (:func:`imgembed.artifact.signing.verify_signature`; SignatureError otherwise)."""
    from imgembed.runtime.backends import require_device

    path = Path(path)
    require_device(device)
    if require_signature is not None:
        from imgembed.artifact.signing import verify_signature

        verify_signature(path, require_signature, signature)
    manifest = read_manifest(path)
    return _open_artifact(path, manifest, backend=backend, device=device, threads=threads, batch_size=batch_size,
                          verify_checksums=verify_checksums, allow_failed=allow_failed, decode=decode,
                          workers=workers)


def _open_artifact(path: Path, manifest: Manifest, *, backend: str, device: str, threads: int | None, batch_size: int,
                   verify_checksums: bool, allow_failed: bool, decode: str, workers: int | None) -> Embedder:
    """:func:`load_artifact` after the manifest was read: select, verify and open the engine."""
    from imgembed.runtime.backends import open_engine, select_engine

    if manifest.status != "passed" and not allow_failed:
        failures = manifest.parity.failures if manifest.parity is not None else []
        raise ArtifactError(f"{path} failed its parity gate at export ({failures}); "
                            "pass allow_failed=True to load it anyway")
    engine, _ = select_engine(manifest, backend, device, where=str(path))
    if verify_checksums:  # the engine's own files are hashed once, when the runner reads them
        verify(path, manifest, hashed_on_read=engine_files(engine))
    files = ArtifactFiles.of(path, manifest, check_sha=verify_checksums)
    runner = open_engine(path, manifest, engine, device=device, threads=threads, files=files)
    emb = Embedder(runner, manifest.preprocess_spec(), name=manifest.name,
                   precision=engine.precision, normalized=manifest.output.normalized,
                   manifest=manifest, batch_size=batch_size, decode=decode, workers=_workers(workers))
    emb.artifact_path = path
    emb.engine = engine
    emb._text_options = {"backend": backend, "device": device, "threads": threads, "files": files}
    return emb


def load_original(spec: ModelSpec | str, *, weights: str | Path | None = None, random_init: bool = False,
                  backend: str = "torch", device: str = "cpu", threads: int | None = None,
                  precision: str = "fp32", batch_size: int = DEFAULT_BATCH_SIZE, attn: str = "sdpa",
                  decode: str = "exact", workers: int | None = None) -> Embedder:
    """An Embedder over the PyTorch original of a registry model (backend "torch" or "torch-compile").

    With ``weights`` (or the hub), the checkpoint's preprocessor_config.json decides the preprocessing
    (:func:`imgembed.models.checkpoint.resolve_preprocess`); the registry's is the default.
    """
    from imgembed.models.checkpoint import with_checkpoint_preprocess
    from imgembed.models.families import load_original as build
    from imgembed.runtime.backends import open_original, require_device

    spec = get_spec(spec) if isinstance(spec, str) else spec
    spec, _ = with_checkpoint_preprocess(spec, weights, random_init)
    backend = "torch" if backend == "auto" else backend
    require_device(device)
    head = build(spec, weights=weights, random_init=random_init, attn=attn)
    runner = open_original(head, spec.input_hw, spec.embedding.dim, spec.name, backend=backend, device=device,
                           threads=threads, precision=precision)
    return Embedder(runner, spec.preprocess, name=spec.name, precision=precision,
                    normalized=spec.embedding.normalize, batch_size=batch_size, decode=decode,
                    workers=_workers(workers))


def _workers(workers: int | None) -> int:
    """Decode threads: ``None`` means the default, decoding pipelined with inference on every core."""
    return default_workers() if workers is None else int(workers)


def load(name_or_path: str | Path, **kwargs: Any) -> Embedder:
    """Load an artifact directory (its best engine for this host) or a registry name (PyTorch original).

    Artifact keywords: backend ("auto" or a name of :mod:`imgembed.runtime.backends`), device, threads,
    batch_size, verify_checksums, allow_failed, decode, workers, require_signature (a PEM public key), signature.
    Registry keywords: weights (save_pretrained dir), random_init, backend ("torch" | "torch-compile"),
    device, threads, precision, batch_size, decode, workers.
    ``decode="fast"`` decodes large JPEGs at reduced size (see :mod:`imgembed.preprocess.fast`); ``workers=N``
    decodes in N threads overlapped with inference (default: one per core; 0 decodes inline).
    """
    p = Path(name_or_path)
    if p.is_dir():
        return load_artifact(p, **kwargs)
    if str(name_or_path) in registry():
        return load_original(str(name_or_path), **kwargs)
    if p.exists() or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        raise ArtifactError(f"{p} is not an artifact directory (expected a directory with manifest.json)"
                            if p.exists() else f"artifact directory {p} does not exist")
    get_spec(str(name_or_path))  # raises UnknownModelError with close matches
    raise UnknownModelError(str(name_or_path))  # pragma: no cover - get_spec always raises here
