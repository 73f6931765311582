"""``imgembed sign`` / ``imgembed verify``: artifact signatures with offline key pairs
(:mod:`imgembed.artifact.signing`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from imgembed.cli.common import errors, out_console
from imgembed.errors import SignatureError


def sign_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `imgembed export`."),
    key: Path = typer.Option(..., "--key", help="PEM elliptic-curve private key."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Signature file (default: ARTIFACT.sig beside "
                                       "the directory)."),
    password_env: Optional[str] = typer.Option(None, "--password-env", help="Name of an environment variable "
                                               "holding the private key's password (encrypted keys)."),
) -> None:
    """Sign ARTIFACT: a signature over the manifest and every file, by path and sha256."""
    from imgembed.artifact.signing import sign_artifact

    with errors():
        password = None
        if password_env is not None:
            if password_env not in os.environ:
                raise SignatureError(f"--password-env {password_env}: the environment variable is not set")
            password = os.environ[password_env]
        path = sign_artifact(artifact, key, out, password)
    out_console.print(f"signed {artifact}: {path}", highlight=False)


def verify_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    pub: Path = typer.Option(..., "--pub", help="PEM elliptic-curve public key of the signer."),
    signature: Optional[Path] = typer.Option(None, "--signature", help="Signature file (default: ARTIFACT.sig "
                                             "beside the directory)."),
) -> None:
    """Check ARTIFACT's signature with PUB and its files' checksums; exit 1 with the reason otherwise."""
    from imgembed.artifact import verify
    from imgembed.artifact.signing import signature_path, verify_signature

    with errors():
        verify_signature(artifact, pub, signature)
        verify(artifact)
    out_console.print(f"{artifact}: signature {signature or signature_path(artifact)} verified with {pub}",
                      highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``sign`` and ``verify`` to the imgembed CLI."""
    app.command("sign")(sign_cmd)
    app.command("verify")(verify_cmd)
