"""Artifacts: the directory export writes and every reader loads, and its typed, versioned manifest.

* :mod:`.schema` — the format-2 types (:class:`Manifest`, :class:`Engine`, ...) and the JSON Schema;
* :mod:`.migrate` — older formats migrated in memory;
* :mod:`.read` — :func:`read_manifest` (parse, migrate, validate) and :func:`verify` (sha256 of every file);
* :mod:`.files` — the one resolver for every path a manifest names, and verified bytes for engines;
* :mod:`.store` — atomic writes, the export lock, ONNX external-data checks.
"""
from imgembed.artifact.files import ArtifactFile, ArtifactFiles, engine_files
from imgembed.artifact.read import parse_manifest, read_manifest, verify, write_manifest
from imgembed.artifact.schema import (
    FORMAT_VERSION,
    MANIFEST,
    Candidate,
    Engine,
    ExportRecord,
    GpuTarget,
    Host,
    Input,
    Manifest,
    Output,
    ParityRecord,
    Preprocess,
    Selection,
    Space,
    TextTower,
    Tokenizer,
    json_schema,
)
from imgembed.artifact.store import (
    MODEL_FILE,
    atomic_path,
    check_external_data,
    clean_stale,
    export_lock,
    file_checksums,
    sha256_file,
    staged_directory,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "ArtifactFile", "ArtifactFiles", "Candidate", "Engine",
    "ExportRecord", "GpuTarget", "Host", "Input", "Manifest", "Output", "ParityRecord", "Preprocess", "Selection",
    "Space", "TextTower", "Tokenizer", "atomic_path", "check_external_data", "clean_stale", "engine_files",
    "export_lock", "file_checksums", "json_schema", "parse_manifest", "read_manifest", "sha256_file",
    "staged_directory", "verify", "write_bytes_atomic", "write_json_atomic", "write_manifest",
]
