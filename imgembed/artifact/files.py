"""The one resolver for every file an artifact's manifest names, and the verified bytes that engines receive.

A path a manifest names (engine files, ONNX external data, OpenVINO ``.xml``/``.bin``, TensorRT plans, the
text tokenizer, the entries of ``files``) is accepted only when it is

- a string in canonical relative POSIX form: not absolute, no ``..``, ``.`` or empty parts, no backslash or NUL;
- inside the artifact directory once symlinks are resolved;
- listed in the manifest's ``files`` with a sha256;
- a regular file (devices, FIFOs, sockets and directories are refused after a ``stat``, before any read) of
  at most :data:`MAX_FILE_BYTES`.

Anything else is an :class:`~imgembed.errors.IntegrityError` that names the manifest field and the path.
:meth:`ArtifactFiles.read` then reads the file once through one file descriptor, hashes those bytes and
returns them: engines are built from the returned bytes, never by reopening the path, so the bytes that
were hashed are the bytes that run.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping

from imgembed.artifact.schema import MANIFEST
from imgembed.errors import IntegrityError

if TYPE_CHECKING:
    from imgembed.artifact.schema import Engine, Manifest
MAX_FILE_BYTES = 64 << 30   # 64 GiB: larger than any engine imgembed writes, small enough to refuse a runaway file
MAX_PATH_CHARS = 1024
_CHUNK = 1 << 30
_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


class ArtifactFiles:
    """Resolves and reads the files of one artifact directory against its manifest's ``files`` mapping.

    ``check_sha=False`` (``verify_checksums=False``, for debugging) keeps every path rule and skips only the
    sha256 comparison.
    """

    def __init__(self, directory: str | Path, files: Mapping[str, Any] | None, *, check_sha: bool = True,
                 max_bytes: int = MAX_FILE_BYTES):
        self.directory = Path(directory)
        self.root = Path(os.path.realpath(self.directory))
        self.files = dict(files) if isinstance(files, Mapping) else {}
        self.check_sha = check_sha
        self.max_bytes = max_bytes
        self.where = self.directory / MANIFEST

    @classmethod
    def of(cls, directory: str | Path, manifest: "Manifest", *, check_sha: bool = True) -> "ArtifactFiles":
        return cls(directory, manifest.files, check_sha=check_sha)

    def _refuse(self, field: str, rel: Any, problem: str) -> IntegrityError:
        shown = repr(rel) if isinstance(rel, str) else f"{rel!r:.80} ({type(rel).__name__})"
        return IntegrityError(f"{self.where}: {field} {shown[:300]} {problem}; refused")

    def check_shape(self, rel: Any, field: str) -> str:
        """``rel`` if it is a canonical relative POSIX path, else IntegrityError (no file system access)."""
        if not isinstance(rel, str) or not rel:
            raise self._refuse(field, rel, "is not a relative path (expected a non-empty string)")
        if len(rel) > MAX_PATH_CHARS or "\x00" in rel or "\\" in rel:
            raise self._refuse(field, rel, f"is not a relative POSIX path (at most {MAX_PATH_CHARS} characters, "
                                           "no NUL or backslash)")
        if rel.startswith("/") or os.path.isabs(rel):
            raise self._refuse(field, rel, "points outside the artifact (an absolute path)")
        parts = rel.split("/")
        if ".." in parts:
            raise self._refuse(field, rel, "points outside the artifact (it climbs out with '..')")
        if any(p in ("", ".") for p in parts) or PurePosixPath(rel).as_posix() != rel:
            raise self._refuse(field, rel, "points outside the artifact (not a canonical relative path: "
                                           "empty or '.' parts)")
        return rel

    def inside(self, rel: Any, field: str) -> Path:
        """The real path of ``rel`` if its shape is canonical and it resolves inside the directory."""
        rel = self.check_shape(rel, field)
        try:
            real = Path(os.path.realpath(self.directory / rel))
        except (OSError, ValueError) as e:
            raise self._refuse(field, rel, f"cannot be resolved ({e})") from None
        if real == self.root or self.root not in real.parents:
            raise self._refuse(field, rel, f"points outside the artifact (it resolves to {real})")
        return real

    def resolve(self, rel: Any, field: str) -> Path:
        """The real path of ``rel`` after every rule but the sha256 (see the module docstring); reads nothing."""
        real = self.inside(rel, field)
        if rel not in self.files:
            raise self._refuse(field, rel, "is not listed in the manifest's 'files' with a sha256")
        self._check_stat(self._stat(real, field, rel), field, rel)
        return real

    def _stat(self, real: Path, field: str, rel: str) -> os.stat_result:
        try:
            return os.stat(real)
        except FileNotFoundError:
            raise self._refuse(field, rel, "is missing from the artifact") from None
        except (OSError, ValueError) as e:
            raise self._refuse(field, rel, f"cannot be read ({e})") from None

    def _check_stat(self, st: os.stat_result, field: str, rel: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise self._refuse(field, rel, f"is {kind}, not a regular file")
        if st.st_size > self.max_bytes:
            raise self._refuse(field, rel, f"is {st.st_size} bytes, over the limit of {self.max_bytes}")

    def read(self, rel: Any, field: str) -> bytes:
        """The bytes of ``rel``, read once through one descriptor and checked against the listed sha256."""
        real = self.resolve(rel, field)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise self._refuse(field, rel, f"cannot be opened ({e.strerror})") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            self._check_stat(st, field, rel)
            data = _read_exactly(f, st.st_size)
        if data is None:
            raise self._refuse(field, rel, "changed size while it was read")
        if self.check_sha:
            digest = hashlib.sha256(data).hexdigest()
            if digest != self.files[rel]:
                raise IntegrityError(f"{self.directory}: sha256 mismatch for [{rel!r}] ({field}: the bytes read "
                                     f"hash to {digest[:16]}..., the manifest lists {str(self.files[rel])[:16]}...): "
                                     "the artifact was modified or corrupted after export; re-export it")
        return data

    def file(self, rel: Any, field: str) -> "ArtifactFile":
        """A handle on ``rel`` whose shape is checked now and whose bytes are read (and verified) on demand."""
        return ArtifactFile(self, self.check_shape(rel, field), field)


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact as a manifest field names it; :meth:`read` returns its verified bytes."""

    files: ArtifactFiles
    rel: str
    field: str

    @property
    def path(self) -> Path:
        """The file's path in the artifact (for names in messages; never opened by engines)."""
        return self.files.directory / self.rel

    @property
    def name(self) -> str:
        return posixpath.basename(self.rel)

    def read(self) -> bytes:
        return self.files.read(self.rel, self.field)

    def beside(self, location: Any, field: str) -> "ArtifactFile":
        """A file named relative to this one's folder (ONNX external data), under the same rules."""
        self.files.check_shape(location, field)
        return self.files.file(posixpath.join(posixpath.dirname(self.rel), location), field)


def engine_files(engine: "Engine") -> set[str]:
    """The paths an engine record names in its ``files`` (the resolver judges them)."""
    return set(engine.files.values())


def _read_exactly(f: Any, size: int) -> bytes | None:
    """``size`` bytes from ``f``, or None when the file is shorter or longer than ``size``."""
    chunks, left = [], size
    while left:
        block = f.read(min(left, _CHUNK))
        if not block:
            return None
        chunks.append(block)
        left -= len(block)
    if f.read(1):
        return None
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]
