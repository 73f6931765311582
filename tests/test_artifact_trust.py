"""Artifacts carry no code and run none: hostile module artifacts whose manifest names a factory to import.

One names ``pwn_mod:build`` with a ``pwn_mod.py`` in the working directory; the other names ``pytest:main`` and
ships a ``conftest.py`` inside the artifact (listed with its sha256, so the checksums pass). Each hostile module
writes a marker file when imported. ``parity`` and ``bench`` end in one typed error line saying what to pass;
``load``, ``embed`` and ``serve`` embed as usual; no marker is ever written. A source scan checks that imgembed
imports modules by name in two places only: a user-named factory and its own sub-commands.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import imgembed
from imgembed.gate.samples import parity_images

from .helpers import REPO, cli_env, run_cli

CONV = "tests.byo_models:conv_encoder"
HOSTILE = 'open({marker!r}, "w").write("ran")\n\ndef build():\n    open({marker!r}, "w").write("ran")\n'


@pytest.fixture(scope="module")
def conv_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "conv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imgembed.export_module(CONV, out, name="conv", input_size=64, backend="onnxruntime", speed_check=False)
    return out


def _hostile(conv_artifact: Path, work: Path, kind: str) -> tuple[Path, Path, Path]:
    """(artifact, working directory, marker) of a hostile artifact of ``kind`` ("pwn_mod" or "conftest")."""
    marker = work / "marker"
    art = work / "hostile"
    shutil.copytree(conv_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    code = HOSTILE.format(marker=str(marker))
    if kind == "pwn_mod":
        (work / "pwn_mod.py").write_text(code)
        manifest["source"]["factory"], cwd = "pwn_mod:build", work
    else:
        (art / "conftest.py").write_text(code)
        manifest["files"]["conftest.py"] = hashlib.sha256(code.encode()).hexdigest()
        manifest["source"]["factory"], cwd = "pytest:main", art
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art, cwd, marker


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    text = res.stderr.replace("\n", " ")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and text.count("error (") == 1, res.stderr
    return " ".join(text[text.index("error ("):].split())


@pytest.mark.parametrize("kind", ["pwn_mod", "conftest"])
def test_parity_and_bench_import_nothing_a_manifest_names(conv_artifact, tmp_path, kind):
    art, cwd, marker = _hostile(conv_artifact, tmp_path, kind)
    factory = "pwn_mod:build" if kind == "pwn_mod" else "pytest:main"
    line = _one_error_line(run_cli("parity", str(art), cwd=cwd))
    assert line.startswith("error (ArtifactError): module artifact 'conv': its manifest names the factory "
                           f"'{factory}', and imgembed does not import code named by an artifact; pass --module")
    assert "--trust-manifest-factory" in line
    line = _one_error_line(run_cli("bench", str(art), "--max-seconds", "0.05", "--window-seconds", "0.01",
                                   "--warmup", "0", "-b", "1", "--out", str(tmp_path / "bench"), cwd=cwd))
    assert f"its manifest names the factory '{factory}', and imgembed does not import" in line
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pwn_mod", "conftest"])
def test_load_embed_and_serve_import_nothing_a_manifest_names(conv_artifact, tmp_path, kind, monkeypatch):
    from imgembed.serve.client import EmbeddingClient
    from imgembed.serve.testing import ServerProcess

    art, cwd, marker = _hostile(conv_artifact, tmp_path, kind)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, im in parity_images()[:2]:
        im.save(photos / f"{name}.png")
    script = (f"import imgembed, numpy as np; np.save({str(tmp_path / 'v.npy')!r}, "
              f"imgembed.load({str(art)!r}).embed(sorted(__import__('glob').glob({str(photos / '*.png')!r}))))")
    res = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    expected = imgembed.load(conv_artifact).embed(sorted(photos.glob("*.png")))
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, atol=1e-6)
    res = run_cli("embed", str(art), str(photos), "--out", str(tmp_path / "out.npy"), cwd=cwd)
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)
    monkeypatch.chdir(cwd)   # the server's `python -m` puts its working directory first on sys.path
    with ServerProcess([art]) as server:
        got = EmbeddingClient(server.url).embed(sorted(photos.glob("*.png")))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not marker.exists()


def test_the_cli_names_the_flags_for_module_artifacts(conv_artifact, tmp_path):
    res = run_cli("parity", str(conv_artifact), "--module", CONV, "--json", cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["passed"] is True
    res = run_cli("parity", str(conv_artifact), "--trust-manifest-factory", "--json", cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert f"importing module 'tests.byo_models' (factory '{CONV}')" in res.stderr.replace("\n", " ")


def _module_imports(tree: ast.AST) -> list[str]:
    """Names of the functions of a module that call importlib.import_module or __import__."""
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and (
                        (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                        or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))):
                    found.append(fn.name)
    return found


def test_imgembed_imports_modules_by_name_only_for_user_factories_and_its_commands():
    calls = {f"{p.relative_to(REPO).as_posix()}:{name}"
             for p in (REPO / "imgembed").rglob("*.py") for name in _module_imports(ast.parse(p.read_text()))}
    assert calls == {"imgembed/models/user_module.py:import_factory"}
