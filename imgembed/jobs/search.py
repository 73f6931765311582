"""``imgembed search``: the photos of an embedding index nearest to a text or an image query.

    imgembed embed artifacts/clip-b32-text photos/ --out photos.parquet
    imgembed search photos.parquet "a red bicycle" --artifact artifacts/clip-b32-text -k 10
    imgembed search photos.parquet photos/cat.jpg --artifact artifacts/clip-b32-text --json

The index is the Parquet output of ``imgembed embed``; rows whose image failed have no vector and are
skipped. Its metadata records the artifact's manifest sha256 but not its path, so ``--artifact`` names the
artifact that embeds the query, and an artifact with another manifest is refused (vectors of another model
are not comparable). A query that is an existing file is an image query, anything else a text query (which
needs an artifact exported with ``--text``); ``--image`` / ``--text`` force the kind. An image query that is
a path of the index needs no artifact: its stored vector is used. Scores are cosine similarities; the search
is exact, with FAISS (``IndexFlatIP``) when it is installed and numpy otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgembed.artifact import read_manifest
from imgembed.errors import BackendUnavailableError
from imgembed.jobs import JobError
from imgembed.jobs.parquet import Limits
from imgembed.runtime.results import Embeddings
from imgembed.text.scoring import Ranking, rank

KINDS = ("image", "text")


class SearchError(JobError):
    """A search cannot run: no readable index, no artifact to embed the query, or a query it cannot embed."""


class IndexMismatchError(SearchError):
    """The artifact is not the one that embedded the index: vectors of another model are not comparable."""


@dataclass(frozen=True)
class Hit:
    rank: int      # 1 = best
    score: float   # cosine similarity
    path: str


# ------------------------------------------------------------------------------------------ the index
def load_index(path: str | Path, limits: Limits = Limits()) -> Embeddings:
    """The index's vectors (failed rows skipped), paths and metadata; SearchError if it has no vector,
    :class:`~imgembed.jobs.parquet.IndexFormatError` if it is not a well-formed job output within ``limits``."""
    from imgembed.jobs.parquet import read_embeddings

    path = Path(path)
    if not path.is_file():
        raise SearchError(f"index {path} does not exist; write one with `imgembed embed ARTIFACT PHOTOS "
                          f"--out {path.name}`")
    index = read_embeddings(path, limits)
    if not len(index.vectors):
        raise SearchError(f"index {path} holds no vectors (all {len(index.errors)} rows are failed images)")
    return index


def check_artifact(artifact: str | Path, index: Embeddings, where: str) -> None:
    """IndexMismatchError unless ``artifact`` is the artifact that embedded ``index`` (same manifest sha256
    when the index records it; else the same model name and dimension)."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    meta = index.metadata
    from imgembed.jobs.folder import manifest_sha256

    recorded, sha = meta.get("manifest_sha256"), manifest_sha256(artifact)
    dim = manifest.output.dim
    if recorded is not None and recorded != sha:
        problem = f"manifest sha256 {sha[:12]}..., the index records {recorded[:12]}..."
    elif dim != index.vectors.shape[1]:
        problem = f"dim {dim}, the index has {index.vectors.shape[1]}"
    elif recorded is None and meta.get("model") not in (None, manifest.name):
        problem = f"model {manifest.name!r}, the index records {meta.get('model')!r}"
    else:
        return
    raise IndexMismatchError(f"{artifact} did not embed {where} ({problem}; index model {meta.get('model')!r}, "
                             f"{meta.get('precision')}): vectors of another model are not comparable. Pass the "
                             "artifact that embedded the index, or re-embed the photos with this one")


# ------------------------------------------------------------------------------------------ the query
def query_kind(query: str, force: str | None = None) -> str:
    """``force`` ("image" / "text"), else "image" when ``query`` is an existing file, else "text"."""
    if force is not None:
        if force not in KINDS:
            raise ValueError(f"query kind {force!r}; expected one of {list(KINDS)}")
        if force == "image" and not Path(query).is_file():
            raise SearchError(f"image query {query!r} is not a file")
        return force
    return "image" if Path(query).is_file() else "text"


def embed_query(emb, query: str, kind: str, artifact: str | Path) -> np.ndarray:
    """The query's vector ``(dim,)``: the image tower for an image, the text tower for a text (SearchError
    naming ``--text`` when the artifact has none)."""
    if kind == "image":
        return emb.embed([query])[0]
    if "text" not in emb.towers:
        raise SearchError(f"{artifact} has no text tower, so it cannot embed the text query {query!r}: export "
                          f"the model with `imgembed export {emb.name} --text` (CLIP and SigLIP models) and embed "
                          "the photos with that artifact, or pass an image file as the query")
    return emb.embed_text([query])[0]


# ----------------------------------------------------------------------------------------- the search
def _faiss(required: bool | None):
    """The faiss module when it is to be used: ``required`` True (must be installed), None (if installed),
    False (never)."""
    if required is False:
        return None
    try:
        import faiss
    except ImportError:
        if required:
            raise BackendUnavailableError("--faiss needs FAISS, which is not installed: pip install faiss-cpu") \
                from None
        return None
    return faiss


def nearest(vectors: np.ndarray, query: np.ndarray, k: int, use_faiss: bool | None = None) -> Ranking:
    """The ``k`` rows of ``vectors`` most cosine-similar to ``query`` (exact: FAISS IndexFlatIP on unit
    vectors, or numpy via :func:`imgembed.text.scoring.rank`)."""
    faiss = _faiss(use_faiss)
    if faiss is None:
        return rank(query, vectors, k)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = np.asarray(query, np.float32).reshape(1, -1)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(np.ascontiguousarray(unit, np.float32))
    scores, ids = index.search(np.ascontiguousarray(q / max(float(np.linalg.norm(q)), 1e-12), np.float32),
                               min(k, len(unit)))
    return Ranking(ids, scores)


def search(index_path: str | Path, query: str, *, k: int = 10, artifact: str | Path | None = None,
           kind: str | None = None, use_faiss: bool | None = None, backend: str = "auto",
           threads: int | None = None, limits: Limits = Limits()) -> tuple[list[Hit], str, Embeddings]:
    """(hits best first, the query kind, the index) of one query; see the module docstring."""
    index = load_index(index_path, limits)
    kind = query_kind(query, kind)
    paths = index.paths
    if artifact is None:
        if kind == "image" and query in paths:  # a photo of the index: its stored vector
            vector = index.vectors[paths.index(query)]
        else:
            raise SearchError(f"a {kind} query needs --artifact DIR, the artifact that embedded {index_path} (model "
                              f"{index.metadata.get('model')!r}), to embed it: the index records that artifact's "
                              "manifest sha256 but not its path")
    else:
        import imgembed

        check_artifact(artifact, index, str(index_path))
        with imgembed.load(artifact, backend=backend, threads=threads, workers=0) as emb:
            vector = embed_query(emb, query, kind, artifact)
    found = nearest(index.vectors, vector, k, use_faiss)
    hits = [Hit(r + 1, float(s), paths[int(i)]) for r, (i, s) in enumerate(zip(found.indices[0], found.scores[0],
                                                                                 strict=True))]
    return hits, kind, index
