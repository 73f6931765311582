"""The Parquet layout of embedding jobs, and atomic reads/writes of it (pyarrow; the ``data`` extra).

One row per input image::

    path    string                          the input path as listed
    vector  fixed_size_list<float32>[dim]   the embedding; null when the image failed
    error   string                          null when embedded; else why the image failed (names the file)

File-level metadata (schema metadata key ``imgembed``, a JSON object): model name, precision, dim,
normalized, input_format, decode mode, the artifact's manifest sha256 (null for a PyTorch original),
imgembed version, created time, row and failure counts. Read it back with :func:`read_embeddings`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..artifact import atomic_path
from ..errors import BackendUnavailableError
from ..runtime.results import Embeddings
from . import JobError

META_KEY = b"imgembed"


def _pa():
    """pyarrow, or a typed error saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BackendUnavailableError("Parquet output needs pyarrow: pip install 'imgembed[data]'") from None
    return pa, pq


def schema(dim: int):
    """The Arrow schema of job output for ``dim``-dimensional embeddings."""
    pa, _ = _pa()
    return pa.schema([("path", pa.string()), ("vector", pa.list_(pa.float32(), dim)), ("error", pa.string())])


def rows_table(chunk: Embeddings, dim: int):
    """An Arrow table in :func:`schema` layout of a chunk of job output (named inputs), one row per input in
    input order."""
    pa, _ = _pa()
    order, vectors, errors = chunk.rows(dim)
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    mask = pa.array([e is not None for e in errors], pa.bool_())
    vector = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), type=pa.list_(pa.float32(), dim),
                                               mask=mask)
    paths = [chunk.names[i] for i in order]
    return pa.Table.from_arrays([pa.array(paths, pa.string()), vector, pa.array(errors, pa.string())],
                                schema=schema(dim))


def write_atomic(table, path: Path, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``path`` through a temporary sibling and ``os.replace`` (never half a file)."""
    _, pq = _pa()
    if metadata is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


def read_metadata(path: str | Path) -> dict:
    """The ``imgembed`` metadata of a job output file ({} when it has none)."""
    _, pq = _pa()
    try:
        meta = pq.read_schema(str(path)).metadata or {}
    except Exception as e:
        raise JobError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def read_table(path: str | Path, columns: Sequence[str] | None = None):
    """The table (or some ``columns``) of a Parquet file, with a typed error if it cannot be read."""
    _, pq = _pa()
    try:
        return pq.read_table(str(path), columns=list(columns) if columns else None)
    except Exception as e:
        raise JobError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def iter_batches(path: str | Path, rows: int = 8192) -> Iterator:
    """Record batches of a Parquet file, ``rows`` at a time (bounded memory)."""
    _, pq = _pa()
    try:
        yield from pq.ParquetFile(str(path)).iter_batches(batch_size=rows)
    except Exception as e:
        raise JobError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def write_batches_atomic(path: Path, dim: int, batches: Iterable, metadata: dict) -> Path:
    """Stream record batches (:func:`schema` layout) into ``path`` with ``metadata``, through a temporary
    sibling and ``os.replace``: bounded memory, and never half a file at ``path``."""
    pa, pq = _pa()
    target = schema(dim).with_metadata({META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), target) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_batches([batch]).cast(target))
    return path


def read_embeddings(path: str | Path) -> Embeddings:
    """Load a job's Parquet output: vectors of the good rows as one float32 matrix, failures apart
    (``.paths``, ``.vectors``, ``.failures``, ``.metadata``; indices are row numbers in the file)."""
    table = read_table(path)
    errors = table.column("error").to_pylist()
    paths = table.column("path").to_pylist()
    ok = np.array([e is None for e in errors], bool)
    dim = table.schema.field("vector").type.list_size
    good = table.filter(ok) if len(ok) else table
    flat = good.column("vector").combine_chunks().flatten() if good.num_rows else None
    vectors = (np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim) if flat is not None
               else np.zeros((0, dim), np.float32))
    return Embeddings([k for k, good in enumerate(ok) if good], vectors,
                      [(k, e) for k, e in enumerate(errors) if e is not None], paths, read_metadata(path))


def concat(tables: Sequence, dim: int):
    """One table from several in :func:`schema` layout (an empty table when there are none)."""
    pa, _ = _pa()
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables) if tables else schema(dim).empty_table()
