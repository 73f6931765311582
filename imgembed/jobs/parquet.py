"""The Parquet layout of embedding jobs, and atomic writes and bounded reads of it (pyarrow; the ``data`` extra).

One row per input image::

    path          string                          the input path as listed
    vector        fixed_size_list<float32>[dim]   the embedding; null when the image failed
    error         string                          null when embedded; else why the image failed (names the file)
    size          int64                           the file's size when it was embedded (null: it could not be read)
    mtime_ns      int64                           its modification time, ns
    content_hash  string                          blake2b-128 of its bytes (``--verify content``; else null)

File-level metadata (schema metadata key ``imgembed``, a JSON object): model name, precision, dim,
normalized, input_format, decode mode, the artifact's manifest sha256 (null for a PyTorch original),
imgembed version, created time, row and failure counts. Read it back with :func:`read_embeddings`.

A file read here may come from anywhere, so every read is checked against its Parquet footer first: the
footer's length, the schema above, the metadata's types, the row count and decoded size it declares, and what
its string columns decode to (counted on their dictionaries: one long path repeated a million times)
(:class:`Limits`) -- a small file that would decode to gigabytes is refused before anything is allocated.
Every problem is an :class:`IndexFormatError` naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from imgembed.artifact import atomic_path
from imgembed.errors import BackendUnavailableError
from imgembed.jobs import JobError, printable
from imgembed.runtime.results import Embeddings

META_KEY = b"imgembed"
IDENTITY_COLUMNS = ("size", "mtime_ns", "content_hash")
STRING_COLUMNS = ("path", "error", "content_hash")
MAX_DIM = 65536
MAX_FOOTER_BYTES = 64 << 20
# (key, accepted types) of the metadata fields imgembed reads; other keys are kept as they are
META_TYPES = {"model": (str,), "precision": (str,), "dim": (int,), "normalized": (bool,),
              "manifest_sha256": (str, type(None)), "input_format": (str, type(None)), "decode": (str, type(None)),
              "rows": (int,), "failed": (int,), "verify": (str,)}
Identity = tuple  # (size, mtime_ns, content_hash or None) of a file, see imgembed.jobs.folder.identify


class IndexFormatError(JobError):
    """A Parquet file is not a well-formed, reasonably sized imgembed job output (schema, metadata, size)."""


@dataclass(frozen=True)
class Limits:
    """What a job output may declare before it is read: rows, decoded bytes, and decoded bytes per byte of
    file above ``ratio_floor`` (float32 vectors hardly compress; a bomb compresses thousands of times)."""

    rows: int = 50_000_000
    bytes: int = 32 << 30
    ratio: float = 64.0
    ratio_floor: int = 64 << 20


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
    return pa.schema([("path", pa.string()), ("vector", pa.list_(pa.float32(), dim)), ("error", pa.string()),
                      ("size", pa.int64()), ("mtime_ns", pa.int64()), ("content_hash", pa.string())])


def rows_table(chunk: Embeddings, dim: int, identities: Mapping[str, Identity | None] | None = None):
    """An Arrow table in :func:`schema` layout of a chunk of job output (named inputs), one row per input in
    input order; ``identities`` (by path) fill the identity columns (null where absent)."""
    pa, _ = _pa()
    order, vectors, errors = chunk.rows(dim)
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    mask = pa.array([e is not None for e in errors], pa.bool_())
    vector = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), type=pa.list_(pa.float32(), dim),
                                               mask=mask)
    paths = [chunk.names[i] for i in order]
    ids = [(identities or {}).get(p) or (None, None, None) for p in paths]
    columns = [pa.array([i[k] for i in ids], t) for k, t in enumerate((pa.int64(), pa.int64(), pa.string()))]
    return pa.Table.from_arrays([pa.array(paths, pa.string()), vector, pa.array(errors, pa.string()), *columns],
                                schema=schema(dim))


def write_atomic(table, path: Path, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``path`` through a temporary sibling and ``os.replace`` (never half a file)."""
    _, pq = _pa()
    if metadata is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


def _footer_length(path: Path) -> int:
    """The length of the Parquet footer of ``path``, checked against the file before pyarrow parses it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
    except OSError as e:
        raise IndexFormatError(f"{path}: cannot be read ({e.strerror})") from None
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        raise IndexFormatError(f"{path}: not a Parquet file (expected PAR1 magic at both ends, {size} bytes)")
    length = int.from_bytes(tail[:4], "little")
    if length > min(size - 12, MAX_FOOTER_BYTES):
        raise IndexFormatError(f"{path}: corrupt Parquet footer (declares {length} bytes in a {size}-byte file)")
    return length


def parse_metadata(raw: bytes | None, path: Path) -> dict:
    """The ``imgembed`` metadata JSON, type-checked ({} when there is none)."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise IndexFormatError(f"{path}: the imgembed metadata is not JSON ({e})") from None
    except RecursionError:
        raise IndexFormatError(f"{path}: the imgembed metadata is JSON nested too deeply") from None
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{path}: the imgembed metadata is a JSON {type(meta).__name__}, expected an object")
    for key, types in META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or (bool in types) != isinstance(value, bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise IndexFormatError(f"{path}: metadata {key!r} is {value!r:.60}, expected {want}")
    return meta


def _check_schema(arrow_schema, path: Path) -> int:
    """The vector dimension, or IndexFormatError naming the column that is missing or of another type."""
    pa, _ = _pa()
    want = {"path": pa.string(), "error": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64(),
            "content_hash": pa.string()}
    names = arrow_schema.names
    for name in ("path", "vector", "error"):
        if name not in names:
            columns = printable(", ".join(names))[:200]
            raise IndexFormatError(f"{path}: no {name!r} column (columns: {columns}); expected the output of "
                                   "`imgembed embed ... --out X.parquet`")
    vector = arrow_schema.field("vector").type
    if not (pa.types.is_fixed_size_list(vector) and vector.value_type == pa.float32()
            and 0 < vector.list_size <= MAX_DIM):
        raise IndexFormatError(f"{path}: column 'vector' is {vector}, expected fixed_size_list<float>[1..{MAX_DIM}]")
    for name, t in want.items():
        if name in names and arrow_schema.field(name).type != t:
            raise IndexFormatError(f"{path}: column {name!r} is {arrow_schema.field(name).type}, expected {t}")
    return vector.list_size


def open_checked(path: str | Path, limits: Limits = Limits()):
    """(a ``pyarrow.parquet.ParquetFile``, its metadata dict) after checking footer, schema, metadata and
    declared size against ``limits``; see the module docstring."""
    _, pq = _pa()
    path = Path(path)
    _footer_length(path)
    try:
        pf = pq.ParquetFile(str(path))
        arrow_schema = pf.schema_arrow
        md = pf.metadata
    except Exception as e:
        raise IndexFormatError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    dim = _check_schema(arrow_schema, path)
    meta = parse_metadata((arrow_schema.metadata or {}).get(META_KEY), path)
    if meta.get("dim", dim) != dim:
        raise IndexFormatError(f"{path}: metadata says dim {meta['dim']}, the vector column has {dim}")
    rows = md.num_rows
    declared = max(sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)), rows * dim * 4)
    size = path.stat().st_size
    if rows > limits.rows or rows < 0:
        raise IndexFormatError(f"{path}: declares {rows} rows, more than the limit of {limits.rows}")
    _check_size(path, size, declared, f"{rows} rows of {dim} floats", limits)
    # A dictionary-encoded string column decodes to (its values' lengths) x (how often each is used): a small
    # file may repeat one long string millions of times, which the footer's sizes do not show.
    strings = _string_bytes(path, [c for c in STRING_COLUMNS if c in arrow_schema.names], md.num_row_groups)
    _check_size(path, size, rows * dim * 4 + strings, f"{rows} rows of {dim} floats and {strings} bytes of "
                "strings", limits)
    return pf, meta


def _check_size(path: Path, size: int, declared: int, what: str, limits: Limits) -> None:
    if declared > limits.bytes or (declared > limits.ratio_floor and declared > limits.ratio * size):
        raise IndexFormatError(f"{path}: a {size}-byte file declaring {declared} bytes of data ({what}): refused "
                               f"before reading (limits: {limits.bytes} bytes, and {limits.ratio:g}x the file "
                               f"size above {limits.ratio_floor} bytes)")


def _string_bytes(path: Path, columns: list[str], row_groups: int) -> int:
    """The bytes the string ``columns`` of ``path`` decode to, counted on their dictionaries and indices
    (read one row group at a time, never expanded)."""
    _, pq = _pa()
    import pyarrow.compute as pc

    total = 0
    try:
        pf = pq.ParquetFile(str(path), read_dictionary=columns)
        for i in range(row_groups):
            for column in pf.read_row_group(i, columns=columns).columns:
                for chunk in column.chunks:
                    if hasattr(chunk, "dictionary"):
                        used = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
                        total += pc.sum(used, min_count=0).as_py()
                    else:
                        total += chunk.nbytes
    except Exception as e:
        raise IndexFormatError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return total


def read_metadata(path: str | Path, limits: Limits = Limits()) -> dict:
    """The ``imgembed`` metadata of a job output file ({} when it has none), after :func:`open_checked`."""
    return open_checked(path, limits)[1]


def read_checked(path: str | Path, columns: Sequence[str] | None = None, limits: Limits = Limits()):
    """(the table, or some ``columns`` of it (absent ones are left out); its metadata dict) of a job output
    file, checked once by :func:`open_checked`."""
    pf, meta = open_checked(path, limits)
    names = pf.schema_arrow.names
    try:
        return pf.read(columns=[c for c in columns if c in names] if columns else None), meta
    except Exception as e:
        raise IndexFormatError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def read_table(path: str | Path, columns: Sequence[str] | None = None, limits: Limits = Limits()):
    """The table (or some ``columns``; absent ones are left out) of a checked job output file."""
    return read_checked(path, columns, limits)[0]


def iter_batches(path: str | Path, rows: int = 8192) -> Iterator:
    """Record batches of a checked job output file, ``rows`` at a time (bounded memory)."""
    pf, _ = open_checked(path)
    try:
        yield from pf.iter_batches(batch_size=rows)
    except Exception as e:
        raise IndexFormatError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def write_batches_atomic(path: Path, dim: int, batches: Iterable, metadata: dict) -> Path:
    """Stream record batches (:func:`schema` layout) into ``path`` with ``metadata``, through a temporary
    sibling and ``os.replace``: bounded memory, and never half a file at ``path``."""
    pa, pq = _pa()
    target = schema(dim).with_metadata({META_KEY: json.dumps(metadata).encode()})
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), target) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_batches([batch]).cast(target))
    return path


def read_embeddings(path: str | Path, limits: Limits = Limits()) -> Embeddings:
    """Load a job's Parquet output: vectors of the good rows as one float32 matrix, failures apart
    (``.paths``, ``.vectors``, ``.failures``, ``.metadata``; indices are row numbers in the file)."""
    table, meta = read_checked(path, ["path", "vector", "error"], limits)
    errors = table.column("error").to_pylist()
    paths = table.column("path").to_pylist()
    ok = np.array([e is None for e in errors], bool)
    if table.column("path").null_count or (ok & table.column("vector").is_null().to_numpy(zero_copy_only=False)).any():
        raise IndexFormatError(f"{path}: rows without a path, or without both a vector and an error")
    dim = table.schema.field("vector").type.list_size
    good = table.filter(ok) if len(ok) else table
    flat = good.column("vector").combine_chunks().flatten() if good.num_rows else None
    vectors = (np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim) if flat is not None
               else np.zeros((0, dim), np.float32))
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        first = printable(str(paths[np.flatnonzero(ok)[bad[0]]]))[:200]
        raise IndexFormatError(f"{path}: {len(bad)} vectors hold non-finite values (NaN or inf), the first that "
                               f"of '{first}'; expected finite embeddings")
    return Embeddings([k for k, good in enumerate(ok) if good], vectors,
                      [(k, e) for k, e in enumerate(errors) if e is not None], paths, meta)


def concat(tables: Sequence, dim: int):
    """One table from several in :func:`schema` layout (an empty table when there are none)."""
    pa, _ = _pa()
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables) if tables else schema(dim).empty_table()
