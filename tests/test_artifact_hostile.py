"""Hostile artifacts: every path a manifest names goes through one resolver (imgembed/artifact/files.py), and
the bytes that were hashed are the bytes an engine runs. Each case ends in one typed error and runs nothing.
(Checksums, atomic writes and external data of plain model files: test_artifact_integrity.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import imgembed
from imgembed import artifact as A
from imgembed.artifact import ArtifactFiles
from imgembed.errors import ImgembedError, IntegrityError

from .helpers import cli_env, run_cli

MODEL = "test-vit-tiny"
CROP = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)


@pytest.fixture
def art(artifact_dir, tmp_path) -> Path:
    """A private copy of the tiny ViT artifact in ``tmp_path/art``, with ``tmp_path/outside`` beside it."""
    dest = tmp_path / "art"
    shutil.copytree(artifact_dir(MODEL), dest)
    (tmp_path / "outside").mkdir()
    return dest


@pytest.fixture
def no_sessions(monkeypatch):
    """Any ONNX Runtime session creation fails the test: a refused artifact must run nothing."""
    import onnxruntime

    def refuse(*a, **k):
        raise AssertionError("onnxruntime.InferenceSession was created for a refused artifact")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _manifest(art: Path) -> dict:
    return json.loads((art / A.MANIFEST).read_text())


def _write(art: Path, manifest: dict) -> None:
    (art / A.MANIFEST).write_text(json.dumps(manifest))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _point_engine(art: Path, rel: str, *, list_it: bool = False) -> None:
    """What an attacker who rewrites the manifest does: the engine's model file becomes ``rel`` (listed in
    ``files`` with the sha256 of what it resolves to when ``list_it``)."""
    manifest = _manifest(art)
    manifest["engines"][0]["files"]["model"] = rel
    if list_it:
        manifest["files"][rel] = _sha(art / rel)
    _write(art, manifest)


def _evil_model(src: Path, dest: Path) -> Path:
    """A valid ONNX model of the same graph with every float weight negated: other vectors, same shapes."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 1:
            init.CopyFrom(numpy_helper.from_array(-arr, init.name))
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------- engine file paths
def test_engine_file_climbing_out_is_refused(art, no_sessions):
    _evil_model(art / A.MODEL_FILE, art.parent / "outside" / "evil.onnx")
    _point_engine(art, "../outside/evil.onnx")
    with pytest.raises(IntegrityError) as ei:
        imgembed.load(art, workers=0)
    assert "engine 'onnxruntime-fp32' file 'model' '../outside/evil.onnx' points outside the artifact " \
           "(it climbs out with '..')" in _one_line(ei.value)


def test_absolute_engine_file_is_refused(art, no_sessions):
    evil = _evil_model(art / A.MODEL_FILE, art.parent / "outside" / "evil.onnx")
    _point_engine(art, str(evil))
    with pytest.raises(IntegrityError, match=r"file 'model' '/.*evil\.onnx' points outside the artifact "
                                             r"\(an absolute path\)"):
        imgembed.load(art, workers=0)


def test_engine_file_through_a_directory_symlink_is_refused_even_when_listed(art, no_sessions):
    _evil_model(art / A.MODEL_FILE, art.parent / "outside" / "model.onnx")
    (art / "sub").symlink_to(art.parent / "outside", target_is_directory=True)
    _point_engine(art, "sub/model.onnx", list_it=True)
    with pytest.raises(IntegrityError, match=r"file entry 'sub/model\.onnx' points outside the artifact "
                                             r"\(it resolves to .*outside/model\.onnx\)"):
        imgembed.load(art, workers=0)
    with pytest.raises(IntegrityError, match=r"file 'model' 'sub/model\.onnx' points outside the artifact"):
        imgembed.load(art, workers=0, verify_checksums=False)  # the resolver refuses it without the checksums


def test_engine_file_symlinked_to_a_file_outside_is_refused(art, no_sessions):
    evil = _evil_model(art / A.MODEL_FILE, art.parent / "outside" / "evil.onnx")
    (art / "evil.onnx").symlink_to(evil)
    _point_engine(art, "evil.onnx", list_it=True)
    with pytest.raises(IntegrityError, match=r"file entry 'evil\.onnx' points outside the artifact"):
        imgembed.load(art, workers=0)
    with pytest.raises(IntegrityError, match=r"file 'model' 'evil\.onnx' points outside the artifact"):
        imgembed.load(art, workers=0, verify_checksums=False)


def test_unlisted_engine_file_is_refused(art, no_sessions):
    shutil.copy(art / A.MODEL_FILE, art / "other.onnx")
    _point_engine(art, "other.onnx")
    with pytest.raises(IntegrityError, match=r"files not listed in the manifest: \['other\.onnx'\]"):
        imgembed.load(art, workers=0)
    with pytest.raises(IntegrityError, match=r"file 'model' 'other\.onnx' is not listed in the manifest's 'files' "
                                             r"with a sha256"):
        imgembed.load(art, workers=0, verify_checksums=False)


def test_listed_engine_file_with_a_wrong_sha256_is_refused(art, no_sessions):
    manifest = _manifest(art)
    manifest["files"][A.MODEL_FILE] = "0" * 64
    _write(art, manifest)
    with pytest.raises(IntegrityError) as ei:
        imgembed.load(art, workers=0)
    assert _one_line(ei.value).endswith(
        "sha256 mismatch for ['model.onnx'] (engine 'onnxruntime-fp32' file 'model': the bytes read hash to "
        f"{_sha(art / A.MODEL_FILE)[:16]}..., the manifest lists 0000000000000000...): the artifact was modified or "
        "corrupted after export; re-export it")


@pytest.mark.parametrize("rel", ["", ".", "./model.onnx", "a//model.onnx", "a\\model.onnx", "model.onnx\x00x", 7,
                                 None, ["model.onnx"]])
def test_engine_file_that_is_no_canonical_relative_path_is_refused(art, no_sessions, rel):
    manifest = _manifest(art)
    manifest["engines"][0]["files"]["model"] = rel
    _write(art, manifest)
    with pytest.raises(ImgembedError) as ei:
        imgembed.load(art, workers=0)
    line = _one_line(ei.value)   # refused by the resolver (naming the engine) or by the types (naming the field)
    assert "engine 'onnxruntime-fp32'" in line or "not a valid imgembed manifest (format 2): engines.0.files" in line


# ------------------------------------------------------------------------------------- the bytes that run
def test_engine_file_swapped_after_the_check_runs_the_verified_bytes(art, monkeypatch):
    """The file on disk is replaced by another valid model right after it was read and hashed: the session
    is built from the verified bytes, so the vectors are the artifact's, not the swapped model's."""
    expected = imgembed.load(art, workers=0).embed(CROP)
    evil = _evil_model(art / A.MODEL_FILE, art.parent / "outside" / "evil.onnx")
    evil_art = art.parent / "evil-art"  # the swapped-in model, as an artifact of its own, computes other vectors
    shutil.copytree(art, evil_art)
    shutil.copy(evil, evil_art / A.MODEL_FILE)
    _write(evil_art, {**_manifest(art), "files": A.file_checksums(evil_art)})
    evil_vectors = imgembed.load(evil_art, workers=0).embed(CROP)
    reads, original = [], ArtifactFiles.read

    def read_then_swap(self, rel, field):
        data = original(self, rel, field)
        os.replace(evil, self.directory / rel) if rel == A.MODEL_FILE and not reads else None
        reads.append(rel)
        return data

    monkeypatch.setattr(ArtifactFiles, "read", read_then_swap)
    got = imgembed.load(art, workers=0, verify_checksums=True).embed(CROP)
    assert reads == [A.MODEL_FILE] and _sha(art / A.MODEL_FILE) != _manifest(art)["files"][A.MODEL_FILE]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.abs(got - evil_vectors).max() > 0.1
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['model\.onnx'\]"):  # and the next load sees it
        imgembed.load(art, workers=0)


def test_external_data_of_an_artifact_engine_is_read_through_the_resolver(art):
    """An engine whose weights live in external data (models over 2 GB): the data file is resolved, listed and
    hashed like the model, and ONNX Runtime gets both as verified bytes (it would refuse a model from bytes
    with external data it has not been handed)."""
    expected = imgembed.load(art, workers=0).embed(CROP)
    model = onnx.load(str(art / A.MODEL_FILE))
    onnx.save(model, str(art / A.MODEL_FILE), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    manifest = _manifest(art)
    manifest["files"] = A.file_checksums(art)
    _write(art, manifest)
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data"}
    np.testing.assert_allclose(imgembed.load(art, workers=0).embed(CROP), expected, rtol=0, atol=1e-6)
    data = art / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['model\.onnx\.data'\]: "):
        imgembed.load(art, workers=0)  # the whole-directory check
    from imgembed.runtime.runners.onnxruntime import OrtRunner

    source = ArtifactFiles(art, manifest["files"]).file(A.MODEL_FILE, "engine 'x' file 'model'")
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['model\.onnx\.data'\] \(engine 'x' file 'model' "
                                             r"\(model\.onnx\) tensor '.+' external data location: the bytes read"):
        OrtRunner(source, expected.shape[1]).activate()  # and the runner's own read


# ----------------------------------------------------------------------------------- text tokenizer file
@pytest.fixture
def text_art(text_artifact, tmp_path) -> Path:
    dest = tmp_path / "text-art"
    shutil.copytree(text_artifact("test-clip-tiny"), dest)
    return dest


def _point_tokenizer(art: Path, rel: str) -> None:
    manifest = _manifest(art)
    manifest["text"]["tokenizer"]["file"] = rel
    _write(art, manifest)


def test_tokenizer_file_dev_zero_is_refused_before_any_read(text_art):
    _point_tokenizer(text_art, "/dev/zero")
    emb = imgembed.load(text_art, workers=0)
    t0 = time.perf_counter()
    with pytest.raises(IntegrityError) as ei:
        emb.embed_text(["a photo of a cat"])
    assert "text tokenizer file '/dev/zero' points outside the artifact (an absolute path)" in _one_line(ei.value)
    assert time.perf_counter() - t0 < 5


def test_tokenizer_symlinked_to_a_device_or_a_fifo_inside_is_refused(text_art, no_sessions):
    rel = _manifest(text_art)["text"]["tokenizer"]["file"]
    (text_art / rel).unlink()
    (text_art / rel).symlink_to("/dev/zero")
    with pytest.raises(IntegrityError, match=rf"text tokenizer file '{rel}' points outside the artifact "
                                             r"\(it resolves to /dev/zero\)"):
        _text(text_art, verify_checksums=False)
    (text_art / rel).unlink()
    os.mkfifo(text_art / rel)
    with pytest.raises(IntegrityError, match=rf"text tokenizer file '{rel}' is a FIFO, not a regular file"):
        _text(text_art, verify_checksums=False)


def test_tokenizer_file_climbing_out_is_refused(text_art):
    (text_art.parent / "tok.json").write_text("{}")
    _point_tokenizer(text_art, "text/../../tok.json")
    with pytest.raises(IntegrityError, match=r"text tokenizer file 'text/\.\./\.\./tok\.json' points outside the "
                                             r"artifact \(it climbs out with '\.\.'\)"):
        imgembed.load(text_art, workers=0).embed_text(["a dog"])


def _text(art: Path, **kw):
    """Open the text tower of ``art`` (its engine is not created before the tokenizer is resolved)."""
    from imgembed.runtime.text import open_text

    manifest = A.read_manifest(art)
    return open_text(art, manifest, files=ArtifactFiles.of(art, manifest, check_sha=kw.get("verify_checksums", True)))


def test_text_tower_through_load_uses_the_verified_tokenizer(text_art):
    """Positive control: the text tower of a clean copy embeds captions, with the tokenizer read once."""
    emb = imgembed.load(text_art, workers=0)
    vectors = emb.embed_text(["a photo of a cat", "a dog"])
    assert vectors.shape == (2, emb.text.runner.output_dim) and np.isfinite(vectors).all()


# ----------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("case", ["climb", "absolute", "wrong-sha"])
def test_cli_embed_of_a_hostile_artifact_prints_one_line(art, tmp_path, case):
    evil = _evil_model(art / A.MODEL_FILE, art.parent / "outside" / "evil.onnx")
    if case == "wrong-sha":
        manifest = _manifest(art)
        manifest["files"][A.MODEL_FILE] = "f" * 64
        _write(art, manifest)
    else:
        _point_engine(art, "../outside/evil.onnx" if case == "climb" else str(evil))
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(CROP[0]).save(img)
    res = run_cli("embed", str(art), str(img), "--out", str(tmp_path / "out.npy"), env=cli_env())
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert ("points outside the artifact" if case != "wrong-sha" else "sha256 mismatch for ['model.onnx']") in lines[0]
    assert not (tmp_path / "out.npy").exists()
