"""Artifact signatures (``imgembed sign`` / ``verify``, ``load(require_signature=PUB)``) with key pairs made here.

A signed artifact loads and embeds as the unsigned one does; a changed byte in any file, an added or removed
file, an edited manifest (even one rewritten so that its checksums match again), another signer's key, a
missing signature and a missing ``sign`` extra each end in one SignatureError naming the reason.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import imgembed
from imgembed.artifact.signing import sign_artifact, signature_path, verify_signature
from imgembed.errors import ArtifactError, SignatureError
from imgembed.gate.samples import parity_images

from .helpers import run_cli

pytest.importorskip("model_signing")


def _key_pair(directory: Path, name: str, curve=None, password: bytes | None = None) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(curve or ec.SECP256R1())
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("keys")
    return {"author": _key_pair(d, "author"), "other": _key_pair(d, "other", ec.SECP384R1())}


@pytest.fixture
def signed(artifact_dir, keys, tmp_path) -> Path:
    """A fresh copy of a tiny artifact, signed by ``author``."""
    art = tmp_path / "art"
    shutil.copytree(artifact_dir("test-vit-tiny"), art)
    assert sign_artifact(art, keys["author"][0]) == tmp_path / "art.sig"
    return art


def _images():
    return [im for _, im in parity_images()[:3]]


def test_a_signed_artifact_verifies_and_loads_as_the_unsigned_one(signed, keys, artifact_dir):
    verify_signature(signed, keys["author"][1])
    got = imgembed.load(signed, require_signature=keys["author"][1]).embed(_images())
    np.testing.assert_array_equal(got, imgembed.load(artifact_dir("test-vit-tiny")).embed(_images()))
    bundle = json.loads(signature_path(signed).read_text())   # a Sigstore bundle; its payload lists every file
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    names = {s["name"] for s in statement["predicate"]["resources"]}
    assert names == {p.relative_to(signed).as_posix() for p in signed.rglob("*") if p.is_file()}
    assert "manifest.json" in names and "model.onnx" in names


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_checksums(art: Path) -> None:
    """What an attacker who can write the directory does: make the manifest's checksums match again."""
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = {p.relative_to(art).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(art.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("tamper, reason", [
    (lambda a: _flip_byte(a / "model.onnx"), "Signature mismatch"),
    (lambda a: (_flip_byte(a / "model.onnx"), _rewrite_checksums(a)), "Signature mismatch"),
    (lambda a: (a / "extra.txt").write_text("x"), "Signature mismatch"),
    (lambda a: ((a / ".gitignore").write_text("x"), _rewrite_checksums(a)), "Signature mismatch"),
    (lambda a: ((a / "sub").mkdir(), (a / "sub" / "manifest.json").write_text("{}")), "Signature mismatch"),
    (lambda a: (a / "model.onnx").unlink(), "Signature mismatch"),
    (lambda a: (a / "manifest.json").write_text((a / "manifest.json").read_text() + " "), "Signature mismatch"),
    (lambda a: (a / "link").symlink_to(a / "model.onnx"), "symlink"),
])
def test_tampered_artifacts_are_refused(signed, keys, tamper, reason):
    tamper(signed)
    with pytest.raises(SignatureError, match=f"{signed}: signature .* does not verify with public key .*{reason}"):
        imgembed.load(signed, require_signature=keys["author"][1])
    with pytest.raises(SignatureError, match=reason):
        verify_signature(signed, keys["author"][1])


def test_another_signer_missing_signatures_and_bad_keys_are_refused(signed, keys, tmp_path):
    with pytest.raises(SignatureError, match="does not verify with public key .*other.pub.pem"):
        imgembed.load(signed, require_signature=keys["other"][1])
    resigned = tmp_path / "resigned.sig"   # a valid signature by someone else is still not the author's
    sign_artifact(signed, keys["other"][0], resigned)
    verify_signature(signed, keys["other"][1], resigned)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(signed, keys["author"][1], resigned)
    signature_path(signed).unlink()
    with pytest.raises(SignatureError, match=f"{signed} is not signed: no signature file {signed}.sig"):
        imgembed.load(signed, require_signature=keys["author"][1])
    with pytest.raises(SignatureError, match="public key .*nope.pem does not exist"):
        verify_signature(signed, tmp_path / "nope.pem", resigned)
    with pytest.raises(SignatureError, match="private key .*author.pub.pem: cannot sign with it"):
        sign_artifact(signed, keys["author"][1])
    with pytest.raises(SignatureError, match="would lie inside the artifact"):
        sign_artifact(signed, keys["author"][0], signed / "x.sig")


def test_encrypted_keys_and_a_corrupted_artifact(artifact_dir, tmp_path):
    private, public = _key_pair(tmp_path, "locked", password=b"s3cret")
    art = tmp_path / "art"
    shutil.copytree(artifact_dir("test-vit-tiny"), art)
    with pytest.raises(SignatureError, match="cannot sign with it"):
        sign_artifact(art, private, password="wrong")
    verify_signature(art, public, sign_artifact(art, private, password="s3cret"))
    _flip_byte(art / "model.onnx")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):   # a corrupted artifact is not signed
        sign_artifact(art, private, tmp_path / "new.sig", password="s3cret")
    assert not (tmp_path / "new.sig").exists()


def test_without_the_sign_extra_every_entry_point_names_it(signed, keys, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_signing", None)   # import model_signing -> ImportError
    for call in (lambda: sign_artifact(signed, keys["author"][0]),
                 lambda: verify_signature(signed, keys["author"][1]),
                 lambda: imgembed.load(signed, require_signature=keys["author"][1])):
        with pytest.raises(SignatureError, match=r"need the 'sign' extra \(model-signing\): pip install "
                                                 r"'imgembed\[sign\]'"):
            call()


def test_cli_sign_and_verify(artifact_dir, keys, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact_dir("test-vit-tiny"), art)
    res = run_cli("verify", str(art), "--pub", str(keys["author"][1]))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "error (SignatureError): " in res.stderr and "is not signed" in res.stderr.replace("\n", " ")
    res = run_cli("sign", str(art), "--key", str(keys["author"][0]))
    assert res.returncode == 0, res.stderr
    assert f"signed {art}: {art}.sig" in res.stdout.replace("\n", " ")
    res = run_cli("verify", str(art), "--pub", str(keys["author"][1]))
    assert res.returncode == 0, res.stderr
    _flip_byte(art / "model.onnx")
    res = run_cli("verify", str(art), "--pub", str(keys["author"][1]))
    text = res.stderr.replace("\n", " ")
    assert res.returncode == 1 and text.count("error (SignatureError)") == 1 and "Traceback" not in text
    assert "Signature mismatch" in text
