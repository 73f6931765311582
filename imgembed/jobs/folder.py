"""Folder jobs: embed every image under directories / globs into one Parquet file, resumably.

    job = FolderJob(out="embeddings.parquet", paths=list_images(["photos/", "more/*.jpg"]), meta=job_metadata(emb))
    result = job.run(local_batches(emb, batch_size=16, workers=4))

While it runs, finished rows are checkpointed as numbered part files in a work directory next to the output
(``.NAME.work/part-000001.parquet``...; each written atomically), every ``part_rows`` rows or
``part_seconds`` seconds. A rerun after a crash or Ctrl-C reads the parts and embeds only the rest, so at
most one part's worth of work is redone. When every path is done the parts and the still-valid rows of a
previous output of the same model are streamed into the output (one row per listed path), written atomically
with the job's metadata, and the work directory is removed. Memory stays bounded whatever the number of
images. Bad files are rows with an ``error`` and never stop the job.

Every row records what it embedded: the file's size and mtime (ns), and with ``verify="content"`` a blake2b
hash of its bytes, taken before the file is read for embedding. A row is reused only when all of them still
match the file (and the output's model, precision, decode mode and artifact manifest sha256 match this run);
a changed file is embedded again and its new row replaces the old one; the row of a file no longer listed is
removed. Failure rows of a previous output are retried unless ``retry_failed=False`` (failures checkpointed
by the unfinished job itself are kept). An existing output, work directory or part made with another model is a
:class:`~imgembed.jobs.JobError` unless ``overwrite=True``, which starts over. Concurrent jobs on one output
are serialised by a lock file beside it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent jobs on one output are not serialised
    fcntl = None  # type: ignore[assignment]

import numpy as np

from imgembed import __version__
from imgembed.artifact import MANIFEST, sha256_file, write_json_atomic
from imgembed.jobs import JobError
from imgembed.jobs.parquet import (
    Identity,
    concat,
    iter_batches,
    read_checked,
    read_metadata,
    read_table,
    rows_table,
    write_atomic,
    write_batches_atomic,
)
from imgembed.jobs.walk import IMAGE_SUFFIXES, Listing, list_images, walk_inputs
from imgembed.runtime.results import Embeddings

IDENTITY_KEYS = ("model", "precision", "dim", "manifest_sha256", "decode", "input_format")
VERIFY_MODES = ("stat", "content")
# pending paths -> chunks (any order) whose indices point into the paths given and whose names are those paths
Engine = Callable[[Sequence[str]], Iterator[Embeddings]]

__all__ = ["IMAGE_SUFFIXES", "FolderJob", "JobResult", "Listing", "identify", "job_metadata", "list_images",
           "local_batches", "manifest_sha256", "walk_inputs"]


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.job.lock`` beside ``out`` for the duration of a job."""
    with open(out.parent / f".{out.name}.job.lock", "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def manifest_sha256(artifact_dir: str | Path) -> str:
    """The sha256 of an artifact's manifest file: what identifies the artifact that embedded a job output."""
    return sha256_file(Path(artifact_dir) / MANIFEST)


def identify(path: str, verify: str = "stat") -> Identity | None:
    """(size, mtime_ns, blake2b-128 hex of the bytes when ``verify == "content"``) of a file; None when it
    cannot be read."""
    try:
        st = os.stat(path)
        digest = None
        if verify == "content":
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            digest = h.hexdigest()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, digest)


def job_metadata(embedder) -> dict:
    """What identifies the vectors of a job: the model, its precision and artifact, the decode mode."""
    manifest_sha = None
    if embedder.manifest is not None and getattr(embedder, "artifact_path", None) is not None:
        manifest_sha = manifest_sha256(embedder.artifact_path)
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
    from imgembed.errors import ImageDecodeError

    return str(e) if isinstance(e, ImageDecodeError) else f"{type(e).__name__}: {e}"


@dataclass
class JobResult:
    out: Path
    complete: bool        # False when stopped early (max_parts); rerun to finish
    rows: int             # rows in the output (complete) or checkpointed so far
    failed: int           # failure rows among them
    embedded_now: int     # images processed by this run (= new + reembedded + retried)
    resumed: int          # rows reused: found done (parts or previous output) and still matching their file
    seconds: float
    new: int = 0          # listed paths that had no row
    reembedded: int = 0   # paths whose row no longer matched the file (changed since)
    retried: int = 0      # failure rows of the previous output tried again
    still_failing: int = 0  # of those, how many failed again
    removed: int = 0      # rows of the previous output whose file is no longer listed

    def summary(self) -> str:
        return (f"{self.resumed} reused, {self.reembedded} re-embedded (changed), {self.new} new, {self.retried} "
                f"retried ({self.still_failing} still failing), {self.removed} removed (no longer listed)")


@dataclass
class _Source:
    """A Parquet file of finished rows: the previous output or a part; its columns as Python lists."""

    path: Path
    previous: bool
    paths: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path, previous: bool) -> _Source:
        t, meta = read_checked(path, ["path", "error", "size", "mtime_ns", "content_hash"])
        cols = [t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows
                for c in ("size", "mtime_ns", "content_hash")]
        return cls(path, previous, t.column("path").to_pylist(),
                   [e is not None for e in t.column("error").to_pylist()], list(zip(*cols, strict=True)), meta)


@dataclass
class FolderJob:
    """One resumable job; see the module docstring."""

    out: Path
    paths: Sequence[str]
    meta: dict
    part_rows: int = 1024
    part_seconds: float = 60.0
    verify: str = "stat"
    retry_failed: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.work = self.out.parent / f".{self.out.name}.work"
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify {self.verify!r}; expected one of {list(VERIFY_MODES)}")
        self.meta = dict(self.meta, verify=self.verify)

    def run(self, engine: Engine, *, max_parts: int | None = None,
            progress: Callable[[int, int, int], None] | None = None) -> JobResult:
        """Embed the pending paths, checkpointing parts; assemble the output when all are done.

        ``progress(done, total, failed)`` is called after each chunk. ``max_parts`` stops after writing that
        many parts in this run (a test hook simulating an interruption; the output is then not written).
        """
        t0 = time.perf_counter()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with job_lock(self.out):
            previous = self._previous_output()
            self._open_work_dir()
            current = {p: identify(p, self.verify) for p in self.paths}
            sources = self._sources(previous)
            chosen = self._choose(sources, current)
            pending = [p for p in self.paths if p not in chosen]
            counts = self._classify(sources, pending, previous)
            retried = counts.pop("_retried_paths")
            n_done = len(self.paths) - len(pending)
            stopped, processed = self._process(engine, pending, current, n_done, max_parts, progress)
            if stopped:
                rows, failed = self._checkpoint_counts()
                return JobResult(self.out, False, rows, failed, processed, n_done, time.perf_counter() - t0,
                                 **counts)
            sources = self._sources(previous)
            rows, failed, failing = self._assemble(sources, self._choose(sources, current))
        counts["still_failing"] = len(retried & failing)
        return JobResult(self.out, True, rows, failed, processed, n_done, time.perf_counter() - t0, **counts)

    # -- work directory ------------------------------------------------------------------------------
    def _identity(self, meta: dict) -> dict:
        return {k: meta.get(k) for k in IDENTITY_KEYS}

    def _mismatch(self, found: dict) -> str:
        found, want = self._identity(found), self._identity(self.meta)
        return ", ".join(f"{k}={found[k]!r} (this run: {want[k]!r})" for k in IDENTITY_KEYS if found[k] != want[k])

    def _open_work_dir(self) -> None:
        """Create the work directory, or check that an existing one was made by the same model."""
        record = self.work / "job.json"
        if self.overwrite and self.work.is_dir() and not self.work.is_symlink():
            shutil.rmtree(self.work, ignore_errors=True)
        elif self.overwrite:
            with contextlib.suppress(OSError):  # a file or link in its place (or nothing)
                self.work.unlink()
        if os.path.lexists(record):
            try:
                found = json.loads(record.read_text(encoding="utf-8"))
                if not isinstance(found, dict):
                    raise ValueError(f"a JSON {type(found).__name__}, expected an object")
            except (OSError, ValueError, RecursionError) as e:
                why = "JSON nested too deeply" if isinstance(e, RecursionError) else e
                raise JobError(f"{record}: unreadable job record ({why}); delete {self.work} or pass --overwrite to "
                               "start over") from None
            diff = self._mismatch(found)
            if diff:
                raise JobError(f"{self.work} holds a stopped job made with {diff}; rerun with the same model and "
                               f"settings, or delete {self.work} (or pass --overwrite) to start over")
            return
        for part in self._parts() if self.work.is_dir() else ():  # parts without their job.json
            self._check_part(part)
        try:
            self.work.mkdir(exist_ok=True)
            write_json_atomic(record, self.meta)
        except OSError as e:
            raise JobError(f"{self.work}: cannot hold the job's work directory ({e.strerror}); delete it or pass "
                           "--overwrite to start over") from None

    def _parts(self) -> list[Path]:
        return sorted(self.work.glob("part-*.parquet"))

    def _previous_output(self) -> Path | None:
        """An existing output made with the same model (its valid rows are reused: incremental reruns);
        JobError if it was made with another one, unless ``overwrite``."""
        if self.overwrite or not self.out.exists():
            return None
        try:
            found = read_metadata(self.out)
        except JobError as e:
            raise JobError(f"{e}; pass --overwrite to replace {self.out}") from None
        diff = self._mismatch(found) if found else "no imgembed metadata"
        if diff:
            raise JobError(f"{self.out} holds vectors made with {diff}: vectors of another model are not "
                           f"comparable. Write to another --out, or pass --overwrite to replace it")
        return self.out

    def _sources(self, previous: Path | None) -> list[_Source]:
        """Where finished rows are: the previous output (if any), then the parts in order."""
        return ([_Source.read(previous, True)] if previous is not None else []) + \
            [self._part(p) for p in self._parts()]

    def _part(self, path: Path) -> _Source:
        """A checkpointed part, after :meth:`_check_part`."""
        src = _Source.read(path, False)
        self._check_part(path, src.meta)
        return src

    def _check_part(self, path: Path, found: dict | None = None) -> None:
        """JobError unless this job's model made the part (``found``: its metadata, read here if not given):
        each part carries the job's metadata, so parts left behind by another job (its job.json deleted) are
        never reused."""
        found = read_metadata(path) if found is None else found
        diff = self._mismatch(found) if found else "no imgembed metadata"
        if diff:
            raise JobError(f"{path} was made with {diff}; delete {self.work} (or pass --overwrite) to start over")

    def _choose(self, sources: list[_Source], current: dict) -> dict[str, tuple[int, int]]:
        """path -> (source, row) of the row to keep: the last one that still matches its file and is not a
        failure of the previous output to retry."""
        chosen: dict[str, tuple[int, int]] = {}
        for s, src in enumerate(sources):
            retry = src.previous and self.retry_failed
            for r, (path, failed, ident) in enumerate(zip(src.paths, src.failed, src.ids, strict=True)):
                if self._matches(ident, current.get(path)) and not (failed and retry):
                    chosen[path] = (s, r)
        return chosen

    def _matches(self, recorded: tuple, now: Identity | None) -> bool:
        """Does a row's (size, mtime_ns, content hash) match the file now (the hash only with verify content)?
        A file that could not be read then and now matches too (its failure row is kept or retried)."""
        if now is None:
            return recorded[0] is None and recorded[1] is None
        return tuple(recorded[:2]) == now[:2] and (self.verify != "content" or recorded[2] == now[2])

    def _classify(self, sources: list[_Source], pending: list[str], previous: Path | None) -> dict:
        """Counts of pending paths by why they run (new, changed, retried) and of removed rows."""
        before: dict[str, bool] = {}
        for src in sources:
            before.update(zip(src.paths, src.failed, strict=True))
        retried = {p for p in pending if before.get(p) is True}
        changed = sum(1 for p in pending if before.get(p) is False)
        listed = set(self.paths)
        removed = len({p for p in sources[0].paths if p not in listed}) if previous is not None else 0
        return {"new": sum(1 for p in pending if p not in before), "reembedded": changed, "retried": len(retried),
                "removed": removed, "_retried_paths": retried}

    def _checkpoint_counts(self) -> tuple[int, int]:
        tables = [read_table(p, ["path", "error"]) for p in self._parts()]
        return sum(t.num_rows for t in tables), sum(t.num_rows - t.column("error").null_count for t in tables)

    # -- processing ----------------------------------------------------------------------------------
    def _process(self, engine: Engine, pending: list[str], current: dict, n_done: int, max_parts: int | None,
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
                    self._write_part(seq, buffer, current)
                    seq, written, buffer, last = seq + 1, written + 1, [], time.monotonic()
                    if max_parts is not None and written >= max_parts:
                        return True, processed
            if buffer:
                self._write_part(seq, buffer, current)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return False, processed

    def _write_part(self, seq: int, chunks: list[Embeddings], current: dict) -> None:
        dim = int(self.meta["dim"])
        table = concat([rows_table(r, dim, current) for r in chunks], dim)
        write_atomic(table, self.work / f"part-{seq:06d}.parquet", self.meta)

    def _assemble(self, sources: list[_Source], chosen: dict[str, tuple[int, int]]) -> tuple[int, int, set[str]]:
        """The chosen rows of the previous output + parts -> the output, streamed (bounded memory) and written
        atomically, then the work dir is removed. Returns (rows, failure rows, their paths)."""
        masks = [np.zeros(len(src.paths), bool) for src in sources]
        for s, r in chosen.values():
            masks[s][r] = True
        failing = {p for p, (s, r) in chosen.items() if sources[s].failed[r]}
        meta = dict(self.meta, rows=len(chosen), failed=len(failing), imgembed_version=__version__,
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

        def batches() -> Iterator:
            for src, mask in zip(sources, masks, strict=True):
                if not mask.any():
                    continue
                start = 0
                for batch in iter_batches(src.path):
                    n = batch.num_rows
                    if mask[start:start + n].any():
                        yield batch.filter(mask[start:start + n])
                    start += n

        write_batches_atomic(self.out, int(self.meta["dim"]), batches(), meta)
        shutil.rmtree(self.work, ignore_errors=True)
        return len(chosen), len(failing), failing
