"""imgembed/artifact/store.py on its own: atomic file writes, the staged-directory swap (exchange and fallback,
crash recovery, concurrent writers), checksum verification, the external-data refusal and manifest errors.
Through the loader and under SIGKILL: test_artifact_integrity.py."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imgembed import artifact as A
from imgembed.artifact import store as S
from imgembed.errors import ArtifactError, IntegrityError

from .helpers import REPO, cli_env, external_data_model, hidden_leftovers, minimal_manifest


def _manifest(**changes) -> dict:
    """The smallest manifest read_manifest accepts (``files`` filled in by :func:`_make_artifact`)."""
    return minimal_manifest(**changes)


def _make_artifact(directory: Path, files: dict[str, bytes], **changes) -> A.Manifest:
    """Write ``files`` into ``directory`` with a manifest listing their sha256; returns the typed manifest."""
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    manifest = _manifest(files=A.file_checksums(directory), **changes)
    A.write_json_atomic(directory / A.MANIFEST, manifest)
    return A.parse_manifest(manifest)


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_path_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    with A.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".x.bin.")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]


def test_atomic_path_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with A.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_write_json_atomic_writes_indented_json(tmp_path):
    A.write_json_atomic(tmp_path / "m.json", {"a": [1, 2]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": [1, 2]} and text.endswith("\n") and "\n  " in text


def test_file_checksums_skip_the_manifest_and_use_posix_paths(tmp_path):
    _make_artifact(tmp_path, {"model.onnx": b"m", "sub/w.bin": b"w"})
    sums = A.file_checksums(tmp_path)
    assert sorted(sums) == ["model.onnx", "sub/w.bin"]
    assert sums["sub/w.bin"] == A.sha256_file(tmp_path / "sub" / "w.bin") == \
        "50e721e49c013f00c62cf59f2163542a9d8df02464efeb615d31051b0fddc326"  # sha256(b"w")


# ------------------------------------------------------------------------------------ staged_directory
def test_staged_directory_creates_the_artifact(tmp_path):
    out = tmp_path / "D"
    with A.staged_directory(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".D.staging-") and not out.exists()
        _make_artifact(stage, {"model.onnx": b"v1"})
    assert A.verify(out).files == {"model.onnx": A.sha256_file(out / "model.onnx")}
    assert hidden_leftovers(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside-fallback"])
def test_staged_directory_swaps_an_existing_artifact(tmp_path, monkeypatch, exchange):
    out = tmp_path / "D"
    _make_artifact(out, {"model.onnx": b"v1", "old-only.bin": b"x"})
    if not exchange:
        monkeypatch.setattr(S, "_exchange", lambda a, b: False)  # the path taken where renameat2 is missing
    with A.staged_directory(out) as stage:
        _make_artifact(stage, {"model.onnx": b"v2"})
    assert (out / "model.onnx").read_bytes() == b"v2" and not (out / "old-only.bin").exists()
    A.verify(out)
    assert hidden_leftovers(out) == []


def test_staged_directory_failure_leaves_the_old_artifact_untouched(tmp_path):
    out = tmp_path / "D"
    before = _make_artifact(out, {"model.onnx": b"v1"})
    with pytest.raises(RuntimeError, match="export failed"):
        with A.staged_directory(out) as stage:
            _make_artifact(stage, {"model.onnx": b"v2"})
            raise RuntimeError("export failed")
    assert A.verify(out) == before and (out / "model.onnx").read_bytes() == b"v1"
    assert hidden_leftovers(out) == []


def test_next_writer_restores_an_artifact_left_aside_by_a_crash(tmp_path):
    """A crash between the fallback's two renames leaves ``out`` missing and the previous artifact in
    ``.D.old-*/artifact``: the next lock holder moves it back and removes every leftover."""
    out = tmp_path / "D"
    before = _make_artifact(tmp_path / ".D.old-1" / "artifact", {"model.onnx": b"v1"})
    (tmp_path / ".D.staging-2").mkdir()  # a killed writer's half-staged directory
    with A.export_lock(out):
        pass
    assert A.verify(out) == before
    assert hidden_leftovers(out) == []


# ---------------------------------------------------------------------------------------------- verify
def test_verify_returns_the_manifest_of_an_intact_artifact(tmp_path):
    manifest = _make_artifact(tmp_path, {"model.onnx": b"m", "sub/w.bin": b"w"})
    assert A.verify(tmp_path) == manifest


def test_verify_names_a_missing_file(tmp_path):
    _make_artifact(tmp_path, {"model.onnx": b"m", "sub/w.bin": b"w"})
    (tmp_path / "sub" / "w.bin").unlink()
    with pytest.raises(IntegrityError, match=r"files listed in the manifest are missing: \['sub/w\.bin'\]"):
        A.verify(tmp_path)


def test_verify_names_an_extra_file(tmp_path):
    _make_artifact(tmp_path, {"model.onnx": b"m"})
    (tmp_path / "notes.txt").write_text("dropped in later")
    with pytest.raises(IntegrityError, match=r"files not listed in the manifest: \['notes\.txt'\]"):
        A.verify(tmp_path)


def test_verify_names_a_modified_file(tmp_path):
    _make_artifact(tmp_path, {"model.onnx": b"m", "sub/w.bin": b"w"})
    (tmp_path / "sub" / "w.bin").write_bytes(b"W")
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['sub/w\.bin'\].*re-export it"):
        A.verify(tmp_path)


def test_verify_names_an_unlisted_manifest_json_in_a_subfolder(tmp_path):
    """Only the top-level manifest.json is outside the checksums: one in a subfolder is an unlisted file."""
    _make_artifact(tmp_path, {"model.onnx": b"m"})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / A.MANIFEST).write_text("{}")
    with pytest.raises(IntegrityError, match=r"files not listed in the manifest: \['sub/manifest\.json'\]"):
        A.verify(tmp_path)


def test_verify_refuses_an_entry_outside_the_directory(tmp_path):
    art = tmp_path / "art"
    manifest = _make_artifact(art, {"model.onnx": b"m"})
    (tmp_path / "evil.bin").write_bytes(b"w")
    manifest.files["../evil.bin"] = A.sha256_file(tmp_path / "evil.bin")
    with pytest.raises(IntegrityError, match=re.escape("file entry '../evil.bin' points outside the artifact")):
        A.verify(art, manifest)


# ---------------------------------------------------------------------------------- check_external_data
def test_check_external_data_refuses_a_location_outside_and_names_it(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    model = external_data_model(art, "../w.bin")
    with pytest.raises(IntegrityError, match=r"tensor 'w' has external data location '\.\./w\.bin' .*refused"):
        A.check_external_data(model)


def test_check_external_data_lists_locations_inside(tmp_path):
    model = external_data_model(tmp_path, "weights.bin")
    assert A.check_external_data(model) == ["weights.bin"]


def test_check_external_data_skips_files_without_locations_and_rejects_garbage(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert A.check_external_data(tmp_path / "empty.onnx") == []
    (tmp_path / "bad.onnx").write_bytes(b"\xff location \xff" * 10)
    with pytest.raises(ArtifactError, match=r"bad\.onnx: not a readable ONNX model"):
        A.check_external_data(tmp_path / "bad.onnx")


# -------------------------------------------------------------------------------------- read_manifest
def test_read_manifest_of_a_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"artifact directory .*nope does not exist"):
        A.read_manifest(tmp_path / "nope")


def test_read_manifest_without_a_manifest(tmp_path):
    with pytest.raises(ArtifactError, match=r"is not an imgembed artifact: no manifest\.json"):
        A.read_manifest(tmp_path)


@pytest.mark.parametrize("text, error, message", [
    ("{not json", ArtifactError, r"unreadable manifest"),
    ("[1, 2]", ArtifactError, r"not an imgembed manifest \(missing \['files', 'name'"),
    (json.dumps({"files": {}}), ArtifactError, r"missing \['name', 'precision', 'input', 'output', 'preprocess'\]"),
    (json.dumps(_manifest(output={"dim": "512", "normalized": True})), ArtifactError,
     r"not a valid imgembed manifest \(format 2\): output\.dim: Input should be a valid integer"),
    (json.dumps(_manifest(status=None)), ArtifactError, r"status: Input should be 'passed' or 'failed'"),
    (json.dumps(_manifest(default_engine="gone")), ArtifactError,
     r"default_engine 'gone' is not one of the engines \['onnxruntime'\]"),
    (json.dumps(_manifest(engines=[{"id": "../x", "backend": "onnxruntime", "precision": "fp32", "files": {}}])),
     ArtifactError, r"engines\.0\.id: String should match pattern"),
    (json.dumps(_manifest(files={"model.onnx": "abc"})), IntegrityError, r"'files' must map relative paths"),
    (json.dumps(_manifest(format_version=A.FORMAT_VERSION + 1, versions={"imgembed": "9.1"})), ArtifactError,
     rf"artifact format {A.FORMAT_VERSION + 1} is newer than this imgembed reads \(formats up to "
     rf"{A.FORMAT_VERSION}\); install the imgembed release that wrote it \(imgembed 9\.1\) or newer"),
    (json.dumps(_manifest(format_version="2")), ArtifactError, r"'format_version' must be an integer, got '2'"),
    (json.dumps(_manifest(surprise=1)), ArtifactError, r"surprise: Extra inputs are not permitted"),
    (json.dumps(_manifest(export={"stages": [{"name": "x", "seconds": -1}]})), ArtifactError,
     r"export\.stages\.0\.seconds: Input should be greater than or equal to 0"),
    (json.dumps(_manifest(export={"stages": [{"name": "x" * 2001, "seconds": 1}]})), ArtifactError,
     r"export\.stages\.0\.name: String should have at most 2000 characters"),
], ids=["invalid-json", "not-an-object", "missing-keys", "dim-not-int", "status-null", "default-not-held",
        "engine-id-path", "bad-digest", "newer-format", "string-version", "unknown-key", "stage-negative-time",
        "stage-name-too-long"])
def test_read_manifest_errors(tmp_path, text, error, message):
    (tmp_path / A.MANIFEST).write_text(text)
    with pytest.raises(error, match=message):
        A.read_manifest(tmp_path)


# ---------------------------------------------------------------------------------- concurrent writers
WRITER = r"""
import json, os, sys
from pathlib import Path
import imgembed.artifact as A
out, wid, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for r in range(rounds):
    with A.staged_directory(out) as stage:
        payload = os.urandom(200_000) + f"{wid}-{r}".encode()
        (stage / "model.onnx").write_bytes(payload)
        manifest = json.loads(sys.argv[4])
        A.write_json_atomic(stage / "manifest.json", {**manifest, "created": f"{wid}-{r}",
                                                      "files": A.file_checksums(stage)})
print("done")
"""


def test_many_processes_writing_one_artifact(tmp_path):
    """6 processes x 5 staged writes to one directory: every write succeeds (the lock keeps each writer's
    cleanup away from the others' staging dirs), the survivor is complete and consistent, no leftovers."""
    out = tmp_path / "D"
    env = cli_env(OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(w), "5", json.dumps(_manifest())],
                              cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(6)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-1500:] for _, err in outputs]
    manifest = A.verify(out)
    assert (out / "model.onnx").read_bytes().endswith(manifest.created.encode())
    assert hidden_leftovers(out) == []
    assert json.loads((out / "manifest.json").read_text())["created"] in {f"{w}-{r}" for w in range(6)
                                                                         for r in range(5)}


def test_outputs_get_the_modes_of_new_files_not_private_temp_modes(tmp_path):
    old = os.umask(0o022)
    try:
        A.write_json_atomic(tmp_path / "m.json", {"a": 1})
        with A.staged_directory(tmp_path / "art") as stage:
            A.write_json_atomic(stage / "manifest.json", {"files": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "art" / "manifest.json").stat().st_mode) == 0o644
