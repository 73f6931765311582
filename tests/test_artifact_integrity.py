"""Artifact integrity through the loader: checksums on load, paths that escape the artifact (manifest
entries, ONNX external data), artifacts are ONNX + JSON only, atomic writes under SIGKILL and racing exports.
(Unit tests of imgembed/artifact.py: test_artifact.py; safe weights loading: test_export_safe_weights.py.)"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import imgembed
from imgembed import artifact as A
from imgembed.artifact import store as S
from imgembed.errors import ArtifactError, IntegrityError

from .helpers import REPO, cli_env, external_data_model, hidden_leftovers, start_cli

MODEL = "test-vit-tiny"


@pytest.fixture
def art(artifact_dir, tmp_path) -> Path:
    """A private, verified copy of the tiny ViT artifact that the test may tamper with."""
    dest = tmp_path / "art"
    shutil.copytree(artifact_dir(MODEL), dest)
    return dest


def _rewrite_manifest(directory: Path, **changes) -> dict:
    """What an attacker who controls the whole directory can do: edit the manifest, recompute checksums."""
    manifest = json.loads((directory / A.MANIFEST).read_text())
    manifest.update(changes)
    manifest["files"] = A.file_checksums(directory)
    (directory / A.MANIFEST).write_text(json.dumps(manifest))
    return manifest


# ------------------------------------------------------------------------------------------ checksums
def test_tampered_byte_is_refused(art):
    model = art / A.MODEL_FILE
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    model.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['model\.onnx'\]"):
        imgembed.load(art)


def test_truncated_model_is_refused(art):
    model = art / A.MODEL_FILE
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['model\.onnx'\]"):
        imgembed.load(art)


def test_extra_and_missing_files_are_refused(art):
    (art / "notes.txt").write_text("dropped in later")
    with pytest.raises(IntegrityError, match=r"not listed in the manifest: \['notes\.txt'\]"):
        imgembed.load(art)
    (art / "notes.txt").unlink()
    (art / A.MODEL_FILE).unlink()
    with pytest.raises(IntegrityError, match=r"missing: \['model\.onnx'\]"):
        imgembed.load(art)


@pytest.mark.parametrize("entry", ["../evil.bin", "sub/../../evil.bin", "EVIL_ABSOLUTE", ".", "link.bin"])
def test_manifest_entries_escaping_the_artifact_are_refused(art, entry):
    """Even with a correct sha256 of the outside file, an entry that resolves outside is refused."""
    evil = art.parent / "evil.bin"
    evil.write_bytes(b"outside")
    if entry == "EVIL_ABSOLUTE":
        entry = str(evil)
    if entry == "link.bin":
        (art / "link.bin").symlink_to(evil)
    manifest = json.loads((art / A.MANIFEST).read_text())
    manifest["files"][entry] = hashlib.sha256(b"outside").hexdigest()
    (art / A.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=re.escape(f"file entry {entry!r} points outside the artifact")):
        imgembed.load(art)


@pytest.mark.parametrize("files", [["model.onnx"], {"model.onnx": "not-a-digest"}, {"model.onnx": 5}, "x"])
def test_malformed_files_mapping_is_refused(art, files):
    manifest = json.loads((art / A.MANIFEST).read_text())
    manifest["files"] = files
    (art / A.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"'files' must map relative paths to sha256 hex digests"):
        imgembed.load(art)


# -------------------------------------------------------------------------------------- external data
def _forbid_ort_sessions(monkeypatch) -> None:
    """Make any ONNX Runtime session creation fail the test (refusals must come first)."""
    import onnxruntime

    def refuse(*a, **k):
        raise AssertionError("onnxruntime.InferenceSession was created for a refused model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


@pytest.mark.parametrize("location", ["../evil.bin", "sub/../../evil.bin", "ABSOLUTE", "link.bin"])
def test_external_data_outside_the_directory_is_refused_before_ort(tmp_path, monkeypatch, location):
    from imgembed.runtime.runners.onnxruntime import OrtRunner

    art = tmp_path / "art"
    art.mkdir()
    evil = tmp_path / "evil.bin"
    evil.write_bytes(np.full(4, 7, np.float32).tobytes())
    if location == "ABSOLUTE":
        location = str(evil)
    if location == "link.bin":
        (art / "link.bin").symlink_to(evil)
    model = external_data_model(art, location)
    _forbid_ort_sessions(monkeypatch)
    with pytest.raises(IntegrityError, match=re.escape(f"external data location {location!r}")) as ei:
        OrtRunner(model, 4).activate()
    assert "outside the artifact directory" in str(ei.value) and str(evil) in str(ei.value)


def test_external_data_inside_the_directory_runs(tmp_path):
    """Positive control: the same model with its data beside it loads and computes x + w."""
    from imgembed.runtime.runners.onnxruntime import OrtRunner

    (tmp_path / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = external_data_model(tmp_path, "weights.bin")
    assert A.check_external_data(model) == ["weights.bin"]
    with OrtRunner(model, 4) as runner:
        np.testing.assert_array_equal(runner.infer(np.ones((1, 4), np.float32)), [[1, 2, 3, 4]])


def test_checksum_valid_artifact_with_escaping_external_data_is_refused(art, monkeypatch):
    """An attacker who rewrites the whole directory (manifest included) still cannot make the loader read
    a file outside it: the checksums pass, the external-data check refuses."""
    (art.parent / "evil.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    external_data_model(art, "../evil.bin")
    _rewrite_manifest(art)
    A.verify(art)  # the checksums are consistent
    _forbid_ort_sessions(monkeypatch)
    with pytest.raises(IntegrityError, match=r"external data location '\.\./evil\.bin'"):
        imgembed.load(art)


def test_exported_artifact_has_no_external_data_and_skips_the_parse(artifact_dir):
    assert A.check_external_data(artifact_dir(MODEL) / A.MODEL_FILE) == []
    assert not S._mentions_location(artifact_dir(MODEL) / A.MODEL_FILE)


# ------------------------------------------------------------------------------------------- no pickle
def test_artifact_is_onnx_plus_json_only(artifact_dir):
    for precision in ("fp32", "int8"):
        art = artifact_dir("test-clip-tiny", precision)
        assert sorted(p.name for p in art.iterdir()) == ["manifest.json", "model.onnx"]
        manifest = json.loads((art / "manifest.json").read_text())  # plain JSON
        assert set(manifest["files"]) == {"model.onnx"}
        blob = (art / "model.onnx").read_bytes()
        assert not blob.startswith(b"\x80") and b"PK\x03\x04" not in blob[:4]  # neither pickle nor torch zip
        assert onnx.load_from_string(blob).graph.output[0].name == "embedding"


# --------------------------------------------------------------------------------- atomic writes / kill
def _fingerprint(directory: Path) -> dict:
    """Everything that identifies one artifact: its manifest and the sha256 of each file."""
    return {"manifest": json.loads((directory / A.MANIFEST).read_text()), "files": A.file_checksums(directory)}


def _no_visible_partial(out: Path) -> None:
    """Nothing but ``out`` itself looks like an artifact; hidden leftovers are '.'-prefixed, never hold a
    manifest, and nothing half-written sits at ``out``."""
    for name in hidden_leftovers(out):
        assert name.startswith("."), name
        assert not (out.parent / name / A.MANIFEST).exists(), f"{name} could be mistaken for an artifact"
    visible = [p.name for p in out.parent.iterdir() if not p.name.startswith(".")]
    assert visible == [out.name], visible


def _kill_at_step(args: list[str], step: str, timeout: float = 240) -> str:
    """Run the CLI; SIGKILL it as soon as it prints the step line ``step``. Returns the lines seen."""
    proc = start_cli(*args)
    seen, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stderr:
            seen.append(line.strip())
            if step in line:
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "export never reached the step"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, seen)
    return "\n".join(seen)


def test_sigkill_mid_export_leaves_previous_artifact_intact(artifact_dir, tmp_path):
    """Kill ``imgembed export`` (a) while it exports ONNX and (b) the moment it starts writing the artifact:
    each time D still verifies and loads -- the previous artifact in (a); in (b) the previous or the new
    one, complete -- and no partial artifact is visible. The next writer's lock cleans the leftovers."""
    out = tmp_path / "D"
    shutil.copytree(artifact_dir(MODEL), out)
    before = _fingerprint(out)
    x = np.random.default_rng(0).integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    vec_before = imgembed.load(out).embed(list(x))
    args = ["export", MODEL, "--random-init", "--out", str(out)]
    _kill_at_step(args, "exporting to ONNX")
    assert _fingerprint(out) == before
    np.testing.assert_array_equal(imgembed.load(out).embed(list(x)), vec_before)
    _no_visible_partial(out)
    _kill_at_step(args, "writing artifact to")
    A.verify(out)
    np.testing.assert_allclose(imgembed.load(out).embed(list(x)), vec_before, atol=1e-5)  # same seed
    _no_visible_partial(out)
    with A.export_lock(out):  # what the next export does first: leftovers of the killed swap are removed
        assert not [n for n in hidden_leftovers(out) if ".staging-" in n or ".old-" in n]


INJECT = r"""
import json, os, shutil, signal, sys
from pathlib import Path
import imgembed.artifact as A
import imgembed.artifact.store as S
src, out, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
die = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if point.startswith("fallback"):
    S._exchange = lambda a, b: False          # the rename-aside path of non-Linux systems
if point in ("after-exchange", "fallback-after-swap"):
    S._discard = die                           # killed before the old artifact is deleted
if point == "fallback-mid-swap":
    real = os.replace
    def replace(a, b):
        real(a, b)
        if Path(b).name == "artifact":         # old artifact moved aside, new one not yet in place
            die()
    os.replace = replace
with A.staged_directory(out) as stage:
    shutil.copy(src / A.MODEL_FILE, stage / A.MODEL_FILE)
    manifest = json.loads((src / A.MANIFEST).read_text())
    manifest["created"] = "NEW"
    manifest["files"] = A.file_checksums(stage)
    A.write_json_atomic(stage / A.MANIFEST, manifest)
    if point == "in-staging":
        die()
"""


@pytest.mark.parametrize("point, expect", [("in-staging", "old"), ("after-exchange", "new"),
                                           ("fallback-after-swap", "new"), ("fallback-mid-swap", "restored")])
def test_kill_at_each_point_of_the_swap(artifact_dir, tmp_path, point, expect):
    """SIGKILL injected at each step of staged_directory: ``out`` is always one complete artifact (for the
    fallback's mid-swap window, the next writer restores the old one), and the next writer removes every
    leftover."""
    src, out = artifact_dir(MODEL), tmp_path / "D"
    shutil.copytree(src, out)
    proc = subprocess.run([sys.executable, "-c", INJECT, str(src), str(out), point], env=cli_env(OMP_NUM_THREADS="1"),
                          cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if expect == "restored":
        assert not out.exists() and hidden_leftovers(out)  # the documented fallback window
        with A.export_lock(out):
            pass  # the next writer's lock runs clean_stale
    created = A.verify(out).created
    assert (created == "NEW") == (expect == "new")
    with A.export_lock(out):
        assert hidden_leftovers(out) == []
    A.verify(out)


def test_existing_non_artifact_directory_is_never_replaced(tmp_path):
    out = tmp_path / "D"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not an imgembed artifact; refusing to replace it"):
        with A.staged_directory(out) as stage:
            (stage / "manifest.json").write_text("{}")
    assert (out / "thesis.tex").read_text() == "precious" and hidden_leftovers(out) == []


def test_symlinked_output_is_replaced_without_touching_its_target(artifact_dir, tmp_path):
    target = tmp_path / "v1"
    shutil.copytree(artifact_dir(MODEL), target)
    before = _fingerprint(target)
    out = tmp_path / "current"
    out.symlink_to(target)
    with A.staged_directory(out) as stage:
        shutil.copy(target / A.MODEL_FILE, stage / A.MODEL_FILE)
        A.write_json_atomic(stage / A.MANIFEST, {**before["manifest"], "files": A.file_checksums(stage)})
    assert not out.is_symlink() and A.verify(out)
    assert _fingerprint(target) == before


def _ops(model: Path) -> Counter:
    """Node count per op type of an ONNX file."""
    return Counter(n.op_type for n in onnx.load(str(model)).graph.node)


def test_two_exports_to_one_directory_at_once(tmp_path):
    """fp32 and int8 exports of one model race to the same directory: both succeed and the result is one
    complete, verified artifact whose manifest describes the model file beside it."""
    out = tmp_path / "D"
    procs = [start_cli("export", "test-clip-tiny", "--random-init", "--backend", "onnxruntime", "--out", str(out),
                       *extra) for extra in ([], ["--int8", "--no-speed-check"])]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    manifest = A.verify(out)
    ops = _ops(out / A.MODEL_FILE)
    assert dict(ops) == manifest.export.op_counts
    quantized = ops["QuantizeLinear"] + ops["DequantizeLinear"] > 0   # static Q/DQ INT8
    assert quantized == (manifest.precision == "int8")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert not [n for n in hidden_leftovers(out) if ".staging-" in n or ".old-" in n]
    assert imgembed.load(out).embed([np.zeros((64, 64, 3), np.uint8)]).shape == (1, 24)
