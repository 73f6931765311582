"""Artifact signatures: who made an artifact, on OpenSSF ``model-signing`` with offline elliptic-curve key pairs.

    imgembed sign artifacts/mine --key private.pem          # writes artifacts/mine.sig
    imgembed verify artifacts/mine --pub public.pem
    imgembed.load("artifacts/mine", require_signature="public.pem")

The signature is a Sigstore bundle over a manifest of every file in the artifact directory, ``manifest.json``
included, each by path and sha256 (``model_signing`` file serialization; symlinks refused, no path ignored, not
even ``.git*``). It lives beside the directory as ``NAME.sig`` (``signature=`` elsewhere), so the artifact's
own checksums (:func:`imgembed.artifact.verify`) stay as they are. Verification fails on a changed byte, an
added or removed file, an edited manifest, a signature made with another key, or a missing signature, each
with a :class:`~imgembed.errors.SignatureError` naming the artifact and the reason.

The keys are PEM files (ECDSA on P-256, P-384 or P-521); an encrypted private key takes ``password``.
``model-signing`` is the optional ``sign`` extra; without it every function here raises SignatureError
naming the extra.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from imgembed.artifact import atomic_path, verify
from imgembed.errors import SignatureError

EXTRA = "sign"
SUFFIX = ".sig"
_SHOWN = 300


def signature_path(artifact: str | Path) -> Path:
    """Where an artifact's signature lives by default: ``NAME.sig`` beside the directory ``NAME``."""
    artifact = Path(artifact)
    return artifact.parent / (artifact.name + SUFFIX)


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as e:
        raise SignatureError(f"artifact signatures need the '{EXTRA}' extra (model-signing): pip install "
                             f"'imgembed[{EXTRA}]' ({e})") from None
    return model_signing


def _hashing(ms: Any) -> Any:
    """Every file by path and sha256; no symlinks; nothing ignored (the same on both sides)."""
    return ms.hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False).use_file_serialization(
        hashing_algorithm="sha256", allow_symlinks=False)


def _key(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"{what} {path} does not exist; expected a PEM file")
    return path


def _reason(e: Exception) -> str:
    """One line of a model-signing / cryptography failure."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def sign_artifact(artifact: str | Path, private_key: str | Path, signature: str | Path | None = None,
                  password: str | bytes | None = None) -> Path:
    """Sign ``artifact`` with the PEM ``private_key``; returns the signature file (written atomically). The
    artifact's checksums are verified first: a corrupted artifact is not signed."""
    ms = _model_signing()
    artifact = Path(artifact)
    verify(artifact)
    key = _key(private_key, "private key")
    out = Path(signature) if signature is not None else signature_path(artifact)
    if out.resolve() == artifact.resolve() or artifact.resolve() in out.resolve().parents:
        raise SignatureError(f"signature file {out} would lie inside the artifact {artifact}; write it beside it")
    try:
        config = ms.signing.Config().set_hashing_config(_hashing(ms)).use_elliptic_key_signer(
            private_key=key, password=password.encode() if isinstance(password, str) else password)
    except Exception as e:  # not PEM, not an EC key, wrong password
        raise SignatureError(f"private key {key}: cannot sign with it ({_reason(e)}); expected a PEM "
                             "elliptic-curve private key (and its password, if encrypted)") from None
    with atomic_path(out) as tmp:
        try:
            config.sign(artifact, tmp)
        except Exception as e:
            raise SignatureError(f"{artifact}: signing failed ({_reason(e)})") from None
    return out


def verify_signature(artifact: str | Path, public_key: str | Path, signature: str | Path | None = None) -> None:
    """Check that ``signature`` (default ``NAME.sig`` beside the artifact) was made by the private key of the
    PEM ``public_key`` over exactly the files now in ``artifact``; a SignatureError naming the reason otherwise."""
    ms = _model_signing()
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise SignatureError(f"artifact directory {artifact} does not exist")
    sig = Path(signature) if signature is not None else signature_path(artifact)
    if not sig.is_file():
        raise SignatureError(f"{artifact} is not signed: no signature file {sig} (sign it with `imgembed sign "
                             f"{artifact} --key KEY`, or pass the signature's path)")
    key = _key(public_key, "public key")
    try:
        config = ms.verifying.Config().set_hashing_config(_hashing(ms)).use_elliptic_key_verifier(public_key=key)
    except Exception as e:
        raise SignatureError(f"public key {key}: cannot verify with it ({_reason(e)}); expected a PEM "
                             "elliptic-curve public key") from None
    try:
        config.verify(artifact, sig)
    except Exception as e:
        raise SignatureError(f"{artifact}: signature {sig} does not verify with public key {key}: "
                             f"{_reason(e)}") from None

