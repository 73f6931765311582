"""Reading an artifact's manifest: parse, migrate older formats, validate against the format-2 types, and
check every file against its sha256."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection

from pydantic import ValidationError

from imgembed.artifact.schema import FORMAT_VERSION, MANIFEST, SHA256_PATTERN, Manifest
from imgembed.errors import ArtifactError, IntegrityError

REQUIRED_KEYS = ("files", "name", "precision", "input", "output", "preprocess")
MAX_MANIFEST_BYTES = 64 << 20   # a manifest is kilobytes; refuse a runaway file before parsing it


def read_manifest(directory: str | Path) -> Manifest:
    """Load, migrate and validate ``manifest.json`` (no checksum verification; see :func:`verify`).

    Every problem is one :class:`~imgembed.errors.ArtifactError` (``IntegrityError`` for ``files``) that
    names the manifest and the field."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not an imgembed artifact: no {MANIFEST}") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: manifest is larger than {MAX_MANIFEST_BYTES} bytes; refused")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({type(e).__name__}: {str(e)[:200]})") from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """A parsed ``manifest.json`` of any known format as a validated format-2 :class:`Manifest`."""
    from imgembed.artifact.migrate import migrate

    missing = [k for k in REQUIRED_KEYS if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise ArtifactError(f"{where}: not an imgembed manifest (missing {missing})")
    version = raw.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{where}: 'format_version' must be an integer, got {version!r:.80}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format {version} is newer than this imgembed reads (formats up to "
                            f"{FORMAT_VERSION}); install the imgembed release that wrote it "
                            f"({_writer(raw)}) or newer: pip install -U imgembed")
    files = raw["files"]
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(SHA256_PATTERN, v) for k, v in files.items()):
        raise IntegrityError(f"{where}: 'files' must map relative paths to sha256 hex digests, got {files!r:.200}")
    try:
        return Manifest.model_validate(migrate(raw))
    except ValidationError as e:
        raise ArtifactError(f"{where}: not a valid imgembed manifest (format {version}): {_first(e)}") from None
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:  # malformed beyond the types
        raise ArtifactError(f"{where}: not a valid imgembed manifest (format {version}): "
                            f"{type(e).__name__}: {str(e)[:200]}") from None


def _writer(raw: dict) -> str:
    versions = raw.get("versions")
    v = versions.get("imgembed") if isinstance(versions, dict) else None
    return f"imgembed {v}" if isinstance(v, str) and len(v) < 40 else "version unknown"


def _first(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{loc}: {first['msg']}{more}"[:400]


def verify(directory: str | Path, manifest: Manifest | None = None, hashed_on_read: Collection[str] = ()) -> Manifest:
    """Check every file listed in the manifest against its sha256; extra or missing files are errors.

    Every entry goes through the artifact's resolver (:mod:`.files`): a path that is not relative or resolves
    outside the directory is refused. ``hashed_on_read``: listed files whose sha256 the caller checks on the
    bytes it reads (:meth:`~.files.ArtifactFiles.read`), so they are not hashed twice; they must still exist.
    """
    from imgembed.artifact.files import ArtifactFiles
    from imgembed.artifact.store import file_checksums

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    expected: dict[str, str] = manifest.files
    resolver = ArtifactFiles(directory, expected)
    for rel in expected:
        resolver.inside(rel, "file entry")
    actual = file_checksums(directory, skip=set(hashed_on_read) & set(expected))
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise IntegrityError(f"{directory}: files listed in the manifest are missing: {missing}")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise IntegrityError(f"{directory}: files not listed in the manifest: {extra}")
    bad = [rel for rel in expected if expected[rel] != actual[rel] and actual[rel]]
    if bad:
        raise IntegrityError(f"{directory}: sha256 mismatch for {bad}: the artifact was modified or corrupted "
                             "after export; re-export it")
    return manifest


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Write ``manifest`` as ``directory/manifest.json`` atomically (validated on the way)."""
    from imgembed.artifact.store import write_bytes_atomic

    checked = Manifest.model_validate(manifest.model_dump(by_alias=True))
    write_bytes_atomic(Path(directory) / MANIFEST, checked.to_json().encode("utf-8"))
