"""Artifact directories: ``model.onnx`` + ``manifest.json``, written atomically, verified on load.

Layout::

    artifacts/clip-vit-b32-int8/
        model.onnx        the graph (no external data for models under 2 GB; external data stays inside)
        manifest.json     how it was made, what it expects, sha256 of every file, the parity report

Atomic writes: everything is staged in a hidden sibling directory and moved into place with
``os.replace`` only when complete; an existing artifact is swapped out the same way, so a crash leaves
either the old artifact or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, IntegrityError

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` (recursively) except the manifest, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on clean exit it atomically becomes ``out``.

    On an exception the staging directory is deleted and ``out`` (if it existed) is left untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _swap_into_place(stage, out)


def _swap_into_place(stage: Path, out: Path) -> None:
    """Move ``stage`` to ``out``; an existing ``out`` is renamed aside first and removed afterwards."""
    old = None
    if out.exists():
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            shutil.rmtree(stage, ignore_errors=True)
            raise ArtifactError(f"{out} exists and is not an imgembed artifact; refusing to replace it")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "artifact")
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old / "artifact", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | Path) -> dict:
    """Load and sanity-check ``manifest.json`` (no checksum verification; see :func:`verify`)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not an imgembed artifact: no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or "files" not in manifest or "model" not in manifest:
        raise ArtifactError(f"{path}: not an imgembed manifest (missing 'files' or 'model')")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest['format_version']} is newer than this imgembed "
                            f"supports ({FORMAT_VERSION}); upgrade imgembed")
    return manifest


def verify(directory: str | Path, manifest: dict | None = None) -> dict:
    """Check every file listed in the manifest against its sha256; extra or missing files are errors."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    expected: dict[str, str] = manifest["files"]
    for rel in expected:
        p = (directory / rel).resolve()
        if directory.resolve() not in p.parents:
            raise IntegrityError(f"{directory / MANIFEST}: file entry {rel!r} points outside the artifact")
    actual = file_checksums(directory)
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise IntegrityError(f"{directory}: files listed in the manifest are missing: {missing}")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise IntegrityError(f"{directory}: files not listed in the manifest: {extra}")
    bad = [rel for rel in expected if expected[rel] != actual[rel]]
    if bad:
        raise IntegrityError(f"{directory}: sha256 mismatch for {bad}: the artifact was modified or corrupted "
                             "after export; re-export it")
    return manifest
