"""Folder jobs: embed every image under directories / globs into one Parquet file, resumably.

    job = FolderJob(out="embeddings.parquet", paths=list_images(["photos/", "more/*.jpg"]), meta=job_metadata(emb))
    result = job.run(local_batches(emb, batch_size=16, workers=4))

While it runs, finished rows are checkpointed as numbered part files in a work directory next to the output
(``.NAME.work/part-000001.parquet``...; each written atomically), every ``part_rows`` rows or
``part_seconds`` seconds. A rerun after a crash or Ctrl-C reads the parts, skips the paths they hold and
embeds only the rest, so no image is embedded twice and at most one part's worth of work is redone. When
every path is done the parts (and the rows of a previous output of the same model, so re-running over a
grown folder embeds only the new files) are streamed into the output (one row per listed path, in processing
order: listing order for a local run), written atomically with the job's metadata, and the work directory is
removed. Memory stays bounded whatever the number of images (parts are read back in record batches). Bad
files are rows with an ``error`` and never stop the job. The work directory records the model (name, precision,
manifest sha256, decode mode); resuming it with another model is a :class:`~imgembed.jobs.JobError`.
Concurrent jobs on one output are serialised by a lock file beside it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent jobs on one output are not serialised
    fcntl = None  # type: ignore[assignment]

import numpy as np

from .. import __version__
from ..artifact import MANIFEST, sha256_file, write_json_atomic
from ..runtime.results import Embeddings
from . import JobError
from .parquet import concat, iter_batches, read_metadata, read_table, rows_table, write_atomic, write_batches_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IDENTITY_KEYS = ("model", "precision", "dim", "manifest_sha256", "decode", "input_format")
# pending paths -> chunks (any order) whose indices point into the paths given and whose names are those paths
Engine = Callable[[Sequence[str]], Iterator[Embeddings]]


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.job.lock`` beside ``out`` for the duration of a job."""
    with open(out.parent / f".{out.name}.job.lock", "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _images_in(directory: Path) -> list[str]:
    return [str(f) for f in sorted(directory.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]


def list_images(inputs: Iterable[str]) -> list[str]:
    """Files as given; directories -> their image files (recursive, sorted); glob patterns (``*``, ``?``,
    ``[``, ``**``) -> matching files (sorted; directories among them expanded). Duplicates removed, order kept.
    A name that matches nothing is kept, so the job reports it as a failed row."""
    out: list[str] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += _images_in(p)
        elif not p.exists() and any(c in s for c in "*?["):
            for m in sorted(glob.glob(s, recursive=True)):
                out += _images_in(Path(m)) if Path(m).is_dir() else [m]
        else:
            out.append(s)
    return list(dict.fromkeys(out))


def job_metadata(embedder) -> dict:
    """What identifies the vectors of a job: the model, its precision and artifact, the decode mode."""
    manifest_sha = None
    if embedder.manifest is not None and getattr(embedder, "artifact_path", None) is not None:
        manifest_sha = sha256_file(Path(embedder.artifact_path) / MANIFEST)
    return {"model": embedder.name, "precision": embedder.precision, "dim": int(embedder.dim),
            "normalized": bool(embedder.normalized), "manifest_sha256": manifest_sha,
            "input_format": embedder.input_format, "decode": embedder.decode}


def local_batches(embedder, *, batch_size: int | None = None, workers: int | None = None) -> Engine:
    """An engine running ``embedder`` in this process (pipelined decode threads, see runtime.pipeline)."""
    def run(paths: Sequence[str]) -> Iterator[Embeddings]:
        for res in embedder.iter_batches(paths, batch_size=batch_size, workers=workers, catch=(Exception,)):
            yield Embeddings(res.indices, res.vectors, [(i, _message(e)) for i, e in res.errors], paths)
    return run


def _message(e: BaseException) -> str:
    """An error row's text: decode errors as they are, anything unexpected with its type."""
    from ..errors import ImageDecodeError

    return str(e) if isinstance(e, ImageDecodeError) else f"{type(e).__name__}: {e}"


def _has_error(src: Path) -> np.ndarray:
    """Per row of ``src``: is it a failure row?"""
    return ~read_table(src, ["error"]).column("error").is_null().to_numpy()


@dataclass
class JobResult:
    out: Path
    complete: bool        # False when stopped early (max_parts); rerun to finish
    rows: int             # rows in the output (complete) or checkpointed so far
    failed: int           # failure rows among them
    embedded_now: int     # images processed by this run
    resumed: int          # paths found done (parts or previous output) and skipped
    seconds: float


@dataclass
class FolderJob:
    """One resumable job; see the module docstring."""

    out: Path
    paths: Sequence[str]
    meta: dict
    part_rows: int = 1024
    part_seconds: float = 60.0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.work = self.out.parent / f".{self.out.name}.work"
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")

    def run(self, engine: Engine, *, max_parts: int | None = None,
            progress: Callable[[int, int, int], None] | None = None) -> JobResult:
        """Embed the pending paths, checkpointing parts; assemble the output when all are done.

        ``progress(done, total, failed)`` is called after each chunk. ``max_parts`` stops after writing that
        many parts in this run (a test hook simulating an interruption; the output is then not written).
        """
        t0 = time.perf_counter()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with job_lock(self.out):
            self._open_work_dir()
            done = self._done_paths()
            pending = [p for p in self.paths if p not in done]
            n_done = len(self.paths) - len(pending)
            stopped, processed = self._process(engine, pending, n_done, max_parts, progress)
            if stopped:
                rows, failed = self._checkpoint_counts()
                return JobResult(self.out, False, rows, failed, processed, n_done, time.perf_counter() - t0)
            rows, failed = self._assemble()
        return JobResult(self.out, True, rows, failed, processed, n_done, time.perf_counter() - t0)

    # -- work directory ------------------------------------------------------------------------------
    def _identity(self, meta: dict) -> dict:
        return {k: meta.get(k) for k in IDENTITY_KEYS}

    def _open_work_dir(self) -> None:
        """Create the work directory, or check that an existing one was made by the same model."""
        record = self.work / "job.json"
        if record.is_file():
            found, want = self._identity(json.loads(record.read_text())), self._identity(self.meta)
            diff = ", ".join(f"{k}={found[k]!r} (this run: {want[k]!r})" for k in IDENTITY_KEYS if found[k] != want[k])
            if diff:
                raise JobError(f"{self.work} holds a stopped job made with {diff}; rerun with the same model and "
                               f"settings, or delete {self.work} to start over")
            return
        self.work.mkdir(exist_ok=True)
        write_json_atomic(record, self.meta)

    def _parts(self) -> list[Path]:
        return sorted(self.work.glob("part-*.parquet"))

    def _previous_output(self) -> Path | None:
        """An existing output made with the same model (its rows count as done: incremental reruns)."""
        if not self.out.is_file():
            return None
        try:
            same = self._identity(read_metadata(self.out)) == self._identity(self.meta)
        except JobError:
            return None
        return self.out if same else None

    def _sources(self) -> list[Path]:
        """Where finished rows are: the previous output (if any), then the parts in order."""
        previous = self._previous_output()
        return ([previous] if previous is not None else []) + self._parts()

    def _done_paths(self) -> set[str]:
        done: set[str] = set()
        for src in self._sources():
            done.update(read_table(src, ["path"]).column("path").to_pylist())
        return done

    def _checkpoint_counts(self) -> tuple[int, int]:
        tables = [read_table(p, ["path", "error"]) for p in self._parts()]
        return sum(t.num_rows for t in tables), sum(t.num_rows - t.column("error").null_count for t in tables)

    # -- processing ----------------------------------------------------------------------------------
    def _process(self, engine: Engine, pending: list[str], n_done: int, max_parts: int | None,
                 progress: Callable[[int, int, int], None] | None) -> tuple[bool, int]:
        """Run ``engine`` over ``pending``, writing parts; returns (stopped early?, images processed)."""
        seq = len(self._parts()) + 1
        written, processed, failed, buffer, last = 0, 0, 0, [], time.monotonic()
        stream = engine(pending) if pending else iter(())
        try:
            for chunk in stream:
                buffer.append(chunk)
                processed += chunk.inputs
                failed += len(chunk.errors)
                if progress is not None:
                    progress(n_done + processed, len(self.paths), failed)
                if sum(c.inputs for c in buffer) >= self.part_rows or time.monotonic() - last >= self.part_seconds:
                    self._write_part(seq, buffer)
                    seq, written, buffer, last = seq + 1, written + 1, [], time.monotonic()
                    if max_parts is not None and written >= max_parts:
                        return True, processed
            if buffer:
                self._write_part(seq, buffer)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return False, processed

    def _write_part(self, seq: int, chunks: list[Embeddings]) -> None:
        dim = int(self.meta["dim"])
        table = concat([rows_table(r, dim) for r in chunks], dim)
        write_atomic(table, self.work / f"part-{seq:06d}.parquet")

    def _kept_rows(self, listed: set[str]) -> Iterator[tuple[Path, np.ndarray]]:
        """(source, mask of rows to keep) for each source: listed paths, first occurrence only."""
        seen: set[str] = set()
        for src in self._sources():
            keep = []
            for p in read_table(src, ["path"]).column("path").to_pylist():
                keep.append(p in listed and p not in seen)
                seen.add(p)
            yield src, np.asarray(keep, bool)

    def _assemble(self) -> tuple[int, int]:
        """Previous output + parts -> the output, streamed (bounded memory) and written atomically: one row
        per listed path, in processing order (listing order for a local run), then the work dir is removed."""
        listed = set(self.paths)
        masks = list(self._kept_rows(listed))
        rows = int(sum(m.sum() for _, m in masks))
        failed = sum(int(np.sum(m & _has_error(src))) for src, m in masks)
        meta = dict(self.meta, rows=rows, failed=failed, imgembed_version=__version__,
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

        def batches() -> Iterator:
            for src, mask in masks:
                start = 0
                for batch in iter_batches(src):
                    n = batch.num_rows
                    if mask[start:start + n].any():
                        yield batch.filter(mask[start:start + n])
                    start += n

        write_batches_atomic(self.out, int(self.meta["dim"]), batches(), meta)
        shutil.rmtree(self.work, ignore_errors=True)
        return rows, failed
