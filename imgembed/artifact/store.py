"""Artifact directories: ``model.onnx`` + ``manifest.json``, written atomically, verified on load.

Layout::

    artifacts/clip-vit-b32-int8/
        model.onnx        the graph (no external data for models under 2 GB; external data stays inside)
        manifest.json     how it was made, what it expects, sha256 of every file, the parity report

Atomic writes: everything is staged in a hidden sibling directory (``.NAME.staging-*``) and moved into
place only when complete. An existing artifact is exchanged with the staged one in a single atomic
``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere: renamed aside to ``.NAME.old-*``, then replaced, and
restored by the next export if a crash hit between the two renames), so a killed export leaves either
the old artifact or the new one, never a half-written one. Writers to one ``out`` are serialised by
``fcntl.flock`` on the hidden sibling ``.NAME.lock``; whoever takes the lock removes the leftovers of
killed writers. Hidden leftovers never hold a ``manifest.json`` once they are being discarded.

Loading checks: every file's sha256 against the manifest (missing, extra, modified, or listed outside
the directory -> :class:`IntegrityError`), and ONNX external-data locations must stay inside the
directory (:func:`check_external_data`, run before ONNX Runtime opens the model).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Collection, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, writers are not serialised
    fcntl = None  # type: ignore[assignment]

from imgembed.artifact.schema import MANIFEST
from imgembed.errors import ArtifactError, IntegrityError

MODEL_FILE = "model.onnx"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksums(directory: Path, skip: Collection[str] = ()) -> dict[str, str]:
    """sha256 of every file in ``directory`` (recursively) except the top-level manifest, by relative POSIX
    path (a ``manifest.json`` in a subfolder is a file like any other); the files in ``skip`` are listed with an
    empty digest."""
    rels = (rel for rel in (p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*")) if p.is_file())
            if rel != MANIFEST)
    return {rel: "" if rel in skip else sha256_file(directory / rel) for rel in rels}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is fsynced and renamed over ``path``,
    on any failure it is removed. Readers see the old file or the complete new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; an output gets the modes of any new file
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


_HELD = threading.local()  # per-thread re-entrancy count of export_lock, by lock path


@contextlib.contextmanager
def export_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside ``out`` (re-entrant within a thread).

    Every writer of ``out`` takes it (:func:`staged_directory` does), so two exports to one directory
    run their swap one after the other. On first acquisition the leftovers of killed writers are
    cleaned (:func:`clean_stale`). The lock file itself stays (empty, hidden).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = str(out.parent.resolve() / f".{out.name}.lock")
    held = getattr(_HELD, "counts", None) or {}
    _HELD.counts = held
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    with open(key, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        held[key] = 1
        try:
            clean_stale(out)
            yield
        finally:
            held[key] = 0
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def clean_stale(out: Path) -> list[Path]:
    """Remove ``.NAME.staging-*`` / ``.NAME.old-*`` / ``.NAME.work-*`` leftovers of killed writers (call
    under the lock; exports hold it from start to end, so no live work directory is removed).

    If a crash hit between the two renames of the fallback swap (``out`` missing, the previous artifact
    in ``.NAME.old-*/artifact``), the previous artifact is first moved back to ``out``.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(staging|old|work)-")
    stale = [p for p in out.parent.iterdir() if pattern.match(p.name) and p.is_dir()]
    for p in stale:
        kept = p / "artifact"
        if p.name.startswith(f".{out.name}.old-") and not out.exists() and (kept / MANIFEST).is_file():
            os.replace(kept, out)
        _discard(p)
    return stale


def _discard(path: Path) -> None:
    """Delete a directory tree, its manifests first so a half-deleted tree is never an artifact.

    Symlinks are removed, never followed (a swapped-out ``out`` may have been a link to a directory)."""
    if path.is_symlink():
        path.unlink()
        return
    for d in (path, path / "artifact"):
        if d.is_dir() and not d.is_symlink():
            with contextlib.suppress(OSError):
                (d / MANIFEST).unlink()
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on clean exit it atomically becomes ``out``.

    Holds :func:`export_lock` throughout. On an exception the staging directory is deleted and ``out``
    (if it existed) is left untouched.
    """
    out = Path(out)
    with export_lock(out):
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        stage.chmod(0o777 & ~_umask())  # mkdtemp creates 0700; the artifact gets the modes of any new directory
        try:
            yield stage
            _fsync_tree(stage)
        except BaseException:
            _discard(stage)
            raise
        _swap_into_place(stage, out)
        _fsync_tree(out.parent, recursive=False)


def _fsync_tree(directory: Path, recursive: bool = True) -> None:
    """Flush files and directory entries to disk, so that after a power loss the swapped-in artifact
    is complete, not renamed-but-empty (a SIGKILL needs no flush: the page cache survives it)."""
    paths = [*directory.rglob("*"), directory] if recursive else [directory]
    for p in paths:
        if p.is_symlink():
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # e.g. directories cannot be opened on Windows
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(stage: Path, out: Path) -> None:
    """Move ``stage`` to ``out`` atomically; an existing artifact at ``out`` is exchanged out and removed."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() or (not (out / MANIFEST).is_file() and any(out.iterdir())):
            _discard(stage)
            raise ArtifactError(f"{out} exists and is not an imgembed artifact; refusing to replace it")
        if _exchange(stage, out):  # ``stage`` now holds the previous artifact
            _discard(stage)
            return
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "artifact")  # fallback: a crash from here to the next line is undone by
        try:                               # clean_stale on the next export
            os.replace(stage, out)
        except BaseException:
            os.replace(old / "artifact", out)
            raise
        _discard(old)
        return
    os.replace(stage, out)


def check_external_data(model_path: str | Path) -> list[str]:
    """Refuse ONNX tensors whose external data lies outside the model's directory; return the locations.

    Run before ONNX Runtime opens a model: a location such as ``../x.bin``, ``/etc/passwd`` or a symlink
    leading out of the directory raises :class:`IntegrityError` naming it. Files that never mention
    ``location`` (every model under 2 GB that imgembed writes) are skipped without parsing.
    """
    model_path = Path(model_path)
    if not _mentions_location(model_path):
        return []
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    base, found = model_path.parent.resolve(), []
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (base / loc).resolve()
        if not loc or os.path.isabs(loc) or base not in target.parents:
            raise IntegrityError(f"{model_path}: tensor {tensor.name!r} has external data location {loc!r} "
                                 f"(resolves to {target}), outside the artifact directory {base}; refused")
        found.append(loc)
    return found


def _mentions_location(path: Path) -> bool:
    """Cheap pre-check: external data needs a ``location`` key, so a file without the bytes has none."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"location") >= 0


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)
