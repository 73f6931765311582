"""The imgembed command line, end to end through subprocesses (as a user runs it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import imgembed
from imgembed.gate.samples import parity_images

from .helpers import run_cli

CMDS = ("models", "export", "parity", "embed")


@pytest.mark.parametrize("cmd", CMDS)
def test_help_for_every_command(cmd):
    res = run_cli(cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and cmd in res.stdout


def test_models_table_and_json():
    res = run_cli("models")
    assert res.returncode == 0
    for name in ("clip-vit-b32", "vit-b16", "dinov2-small", "resnet50", "openai/clip-vit-base-patch32"):
        assert name in res.stdout
    assert "test-clip-tiny" not in res.stdout
    data = json.loads(run_cli("models", "--json", "--all").stdout)
    by_name = {d["name"]: d for d in data}
    assert by_name["clip-vit-b32"]["embedding"]["dim"] == 512 and "test-clip-tiny" in by_name


def test_export_parity_embed_end_to_end(tmp_path):
    out = tmp_path / "art"
    res = run_cli("export", "test-clip-tiny", "--random-init", "--int8", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "parity (int8) over 26 images at batch sizes 1, 3, 8: PASS" in res.stdout
    assert f"artifact {out}" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["status"] == "passed"

    res = run_cli("parity", str(out))
    assert res.returncode == 0, res.stderr
    assert "PASS" in res.stdout and "min_cosine" in res.stdout
    report = json.loads(run_cli("parity", str(out), "--json").stdout)
    assert report["metrics"] == pytest.approx(manifest["parity"]["metrics"], abs=1e-6)  # same original rebuilt

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (_, img) in enumerate(parity_images()[:4]):
        img.convert("RGB").save(imgs / f"{i}.jpg" if i % 2 else imgs / f"{i}.png")
    res = run_cli("embed", str(out), str(imgs / "0.png"), str(imgs / "1.jpg"), "--out", str(tmp_path / "v.npy"))
    assert res.returncode == 0, res.stderr
    vecs = np.load(tmp_path / "v.npy")
    assert vecs.shape == (2, 24)
    expected = imgembed.load(out).embed([imgs / "0.png", imgs / "1.jpg"])
    np.testing.assert_allclose(vecs, expected, atol=1e-6)
    assert (tmp_path / "v.paths.txt").read_text().splitlines() == [str(imgs / "0.png"), str(imgs / "1.jpg")]


def test_embed_directory_with_a_bad_file_keeps_the_good_ones(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (_, img) in enumerate(parity_images()[:3]):
        img.convert("RGB").save(imgs / f"{i}.png")
    (imgs / "1b-broken.jpg").write_bytes(b"\x00garbage")
    res = run_cli("embed", "test-vit-tiny", "--random-init", str(imgs), "--out", str(tmp_path / "o.npy"))
    assert res.returncode == 3
    assert "1b-broken.jpg" in res.stderr and "1 failed" in res.stdout
    assert np.load(tmp_path / "o.npy").shape == (3, 32)
    assert [Path(p).name for p in (tmp_path / "o.paths.txt").read_text().splitlines()] == ["0.png", "1.png", "2.png"]


@pytest.mark.parametrize("args, code, message", [
    (("export", "clip-vit-b23", "--random-init"), 1, "UnknownModelError): unknown model 'clip-vit-b23'. Did you mean"),
    (("parity", "does/not/exist"), 1, "artifact directory does/not/exist does not exist"),
    (("embed", "test-vit-tiny", "--random-init", "missing.jpg"), 3, "missing.jpg"),
    (("embed", "no-such-model", "x.jpg"), 1, "unknown model 'no-such-model'"),
    (("export", "test-vit-tiny", "--random-init", "--weights", "w"), 1, "either weights=DIR or random_init"),
])
def test_errors_exit_nonzero_with_a_message_not_a_traceback(args, code, message, tmp_path):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert message in res.stderr.replace("\n", " ") or message in res.stdout
    assert "Traceback" not in res.stderr


def test_tampered_artifact_parity_exits_1(tmp_path, artifact_dir):
    import shutil

    dst = tmp_path / "a"
    shutil.copytree(artifact_dir("test-vit-tiny", "fp32"), dst)
    (dst / "model.onnx").write_bytes((dst / "model.onnx").read_bytes()[:-10])
    res = run_cli("parity", str(dst))
    assert res.returncode == 1 and "IntegrityError" in res.stderr and "sha256 mismatch" in res.stderr
