"""Scale-out with Ray Data: the same artifact and decode path, one runner per actor.

    import imgembed.jobs.ray as dist
    table = dist.embed_with_ray("artifacts/clip-vit-b32-int8", ["photos/"], decode="fast")
    table.paths, table.vectors, table.failures           # input order; failures = (path, error)

    ds = dist.embedding_dataset("artifacts/clip-vit-b32-int8", paths)   # a lazy ray.data.Dataset
    ds.write_parquet("s3://bucket/embeddings/")                          # columns path, vector, error

Paths are distributed as a Ray dataset; ``map_batches`` runs :class:`EmbedActor` (a callable class, so each
actor loads and verifies the artifact once) on ``concurrency`` actors of ``threads_per_actor`` CPUs each.
Every file path and the artifact directory must be readable from every node (a shared or network file
system). Vectors are those of the local runtime (tests/test_ray.py checks equality); INT8 artifacts quantize
activations per batch, so their vectors depend slightly on which images share a batch (cosine > 0.999).
``imgembed embed ARTIFACT DIR --out x.parquet --ray`` runs a resumable folder job with this engine.
Needs the ``ray`` extra: ``pip install 'imgembed[ray]'``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from imgembed.errors import BackendUnavailableError
from imgembed.jobs.folder import Engine, list_images, local_batches
from imgembed.runtime.results import Embeddings


def _ray():
    """The ray module, or a typed error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("Ray is not installed: pip install 'imgembed[ray]'") from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (e.g. ``ray://head:10001`` or ``auto``) or start a local Ray instance, unless
    Ray is already initialised in this process."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False)


class EmbedActor:
    """Ray Data callable class: loads the artifact once, embeds batches of ``{"path": [...]}`` rows into
    ``{"path", "vector" (n, dim) float32, "error" ("" when embedded)}``."""

    def __init__(self, artifact: str, decode: str = "exact", threads: int = 1, workers: int = 0,
                 backend: str = "auto"):
        from imgembed.runtime.embedder import load_artifact

        self.embedder = load_artifact(artifact, backend=backend, threads=threads, decode=decode, workers=workers)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        dim = self.embedder.dim
        chunks = list(local_batches(self.embedder, batch_size=max(1, len(paths)))(paths))
        order, vectors, errors = Embeddings.concat(chunks, dim, paths).rows(dim)
        return {"path": np.asarray([paths[i] for i in order], dtype=object), "vector": vectors,
                "error": np.asarray(["" if e is None else e for e in errors], dtype=object)}


def _default_concurrency(threads_per_actor: int) -> int:
    ray = _ray()
    return max(1, int(ray.available_resources().get("CPU", 1) // max(threads_per_actor, 1)))


def embedding_dataset(artifact: str | Path, paths: Sequence[str], *, batch_size: int = 16,
                      concurrency: int | None = None, threads_per_actor: int = 1, decode: str = "exact",
                      address: str | None = None, num_cpus: int | None = None, backend: str = "auto"):
    """A lazy ``ray.data.Dataset`` of rows ``path, vector, error`` for ``paths`` (see module doc)."""
    ray = _ray()
    init_ray(address, num_cpus)
    actors = concurrency or _default_concurrency(threads_per_actor)
    blocks = max(1, min(len(paths), actors * 4, -(-len(paths) // batch_size)))
    ds = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=blocks)
    return ds.map_batches(EmbedActor, fn_constructor_kwargs={"artifact": str(Path(artifact).resolve()),
                                                             "decode": decode, "threads": threads_per_actor,
                                                             "backend": backend},
                          batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads_per_actor)


def ray_batches(artifact: str | Path, **kwargs) -> Engine:
    """A folder-job engine (:class:`imgembed.jobs.folder.FolderJob`) running on Ray; ``kwargs`` as for
    :func:`embedding_dataset`."""
    def run(paths: Sequence[str]) -> Iterator[Embeddings]:
        position = {p: i for i, p in reversed(list(enumerate(paths)))}  # rows come back by path, in any order
        ds = embedding_dataset(artifact, paths, **kwargs)
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            vectors = np.asarray(b["vector"], np.float32).reshape(len(b["path"]), -1)
            index = [position[str(p)] for p in b["path"]]
            ok = [k for k, e in enumerate(b["error"]) if not e]
            yield Embeddings([index[k] for k in ok], vectors[ok],
                             [(index[k], str(e)) for k, e in enumerate(b["error"]) if e], paths)
    return run


def embed_with_ray(artifact: str | Path, inputs: str | Iterable[str], **kwargs) -> Embeddings:
    """Embed files / directories / globs on Ray; returns the rows in listing order (see module doc).

    ``kwargs``: batch_size, concurrency, threads_per_actor, decode, address, num_cpus, backend.
    """
    paths = list_images([inputs] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs])
    chunks = list(ray_batches(artifact, **kwargs)(paths)) if paths else []
    dim = next((c.vectors.shape[1] for c in chunks if c.indices), 0)
    return Embeddings.concat(chunks, dim, paths, {"artifact": str(artifact), "decode": kwargs.get("decode", "exact")})
