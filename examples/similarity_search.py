"""Similarity search over the Parquet output of ``imgembed embed`` (numpy; FAISS if it is installed).

    imgembed export clip-vit-b32 --int8 --uint8-input --out artifacts/clip-b32
    imgembed embed artifacts/clip-b32 photos/ --decode fast --out photos.parquet
    python examples/similarity_search.py photos.parquet photos/cat.jpg -k 5
    python examples/similarity_search.py photos.parquet photos/cat.jpg --pca 64      # search in 64 dims

The query is a path that is in the table (its stored vector is used) or any image file (embedded with the
artifact named by --artifact). Cosine similarity = dot product of unit vectors.

Text queries ("a red bicycle") need an artifact exported with --text: ``imgembed search photos.parquet
"a red bicycle" --artifact DIR`` does text and image queries from the command line, and
examples/text_search.py shows text search and zero-shot labels with the Python API.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from imgembed.jobs.parquet import read_embeddings
from imgembed.jobs.pca import PCA


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k(index: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row ids) of the k rows of ``index`` most cosine-similar to ``query`` (both unit length)."""
    try:
        import faiss  # optional: exact inner-product search, much faster on millions of rows
    except ImportError:
        scores = index @ query
        ids = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
        ids = ids[np.argsort(-scores[ids])]
        return scores[ids], ids
    ix = faiss.IndexFlatIP(index.shape[1])
    ix.add(np.ascontiguousarray(index, np.float32))
    scores, ids = ix.search(np.ascontiguousarray(query[None], np.float32), k)
    return scores[0], ids[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help="Parquet written by `imgembed embed ... --out X.parquet`")
    ap.add_argument("query", help="a path in the table, or an image file to embed with --artifact")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--artifact", help="artifact to embed a query image that is not in the table")
    ap.add_argument("--pca", type=int, default=0, help="reduce to this many dimensions first (0: no)")
    args = ap.parse_args(argv)

    table = read_embeddings(args.table)
    print(f"{len(table.paths)} vectors of {table.metadata.get('model')} ({table.metadata.get('precision')}), "
          f"{len(table.failures)} failed rows skipped")
    vectors = unit(table.vectors)
    if args.query in table.paths:
        query = vectors[table.paths.index(args.query)]
    elif args.artifact:
        import imgembed
        query = unit(imgembed.load(args.artifact).embed([args.query]))[0]
    else:
        print(f"{args.query} is not in the table; pass --artifact to embed it", file=sys.stderr)
        return 2
    if args.pca:
        pca = PCA.fit(vectors, args.pca)
        vectors, query = pca.transform(vectors, normalize=True), pca.transform(query[None], normalize=True)[0]
        print(f"PCA to {args.pca} dims keeps {pca.explained_variance_ratio.sum():.1%} of the variance")
    scores, ids = top_k(vectors, query, min(args.k, len(vectors)))
    for score, i in zip(scores, ids, strict=True):
        print(f"{score:.4f}  {table.paths[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
