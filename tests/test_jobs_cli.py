"""`imgembed export --uint8-input` and `imgembed embed DIR|GLOB --out x.parquet|x.npy` through subprocesses."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import imgembed
from imgembed.gate.samples import parity_images
from imgembed.jobs.parquet import read_embeddings, read_table

from .helpers import run_cli


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-photos")
    for i, (_, img) in enumerate(parity_images()[:7]):
        img.convert("RGB").save(d / f"{i}.jpg", quality=90)
    (d / "3b-broken.jpg").write_bytes(b"\x00garbage")
    return d


def test_uint8_export_then_resumable_parquet_job(photos, tmp_path):
    art = tmp_path / "art"
    res = run_cli("export", "test-dinov2-tiny", "--random-init", "--uint8-input", "--out", str(art), "--no-speed-check")
    assert res.returncode == 0, res.stderr
    assert "PASS" in res.stdout
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["shape"] == [None, 56, 56, 3]

    out = tmp_path / "e.parquet"
    args = ("embed", str(art), str(photos), "--out", str(out), "--part-rows", "3", "-b", "3", "--decode", "fast")
    res = run_cli(*args, "--max-parts", "1")
    assert res.returncode == 0, res.stderr
    assert "stopped after 1 part(s), 3 rows checkpointed" in res.stdout and not out.exists()
    res = run_cli(*args)
    assert res.returncode == 3, res.stderr  # one unreadable file: recorded, reported, exit code 3
    assert "resumed: 3 of 8 images were already done" in res.stdout
    assert "wrote 7 x 32 embeddings (test-dinov2-tiny, fp32, decode fast)" in res.stdout and "1 failed" in res.stdout
    assert "3b-broken.jpg" in res.stderr
    table = read_embeddings(out)
    assert [p.rsplit("/", 1)[1] for p, _ in table.failures] == ["3b-broken.jpg"]
    assert table.metadata["input_format"] == "uint8" and table.metadata["decode"] == "fast"
    expected = imgembed.load(art, decode="fast").embed(table.paths)
    np.testing.assert_allclose(table.vectors, expected, rtol=0, atol=1e-6)
    assert len(read_table(out).column("path").to_pylist()) == 8


def test_glob_to_npy_with_sidecar_and_usage_errors(photos, artifact_dir, tmp_path):
    art = artifact_dir("test-vit-tiny")
    out = tmp_path / "v.npy"
    res = run_cli("embed", str(art), str(photos / "[0-4].jpg"), "--out", str(out), "--workers", "2")
    assert res.returncode == 0, res.stderr
    paths = (tmp_path / "v.paths.txt").read_text().splitlines()
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"{i}.jpg" for i in range(5)]
    np.testing.assert_allclose(np.load(out), imgembed.load(art).embed(paths), rtol=0, atol=1e-6)
    res = run_cli("embed", str(art), str(photos), "--decode", "quick")
    assert res.returncode == 2 and "'quick'" in res.stderr
    res = run_cli("embed", str(art), str(photos), "--out", str(tmp_path / "v.csv"))
    assert res.returncode == 2 and "v.csv" in res.stderr
    res = run_cli("embed", str(art), str(photos / "*.nothing"))
    assert res.returncode == 2 and "no image files found" in res.stderr


def test_rerun_summary_symlink_notes_and_another_models_output(photos, artifact_dir, tmp_path):
    art = artifact_dir("test-clip-tiny")
    src = tmp_path / "src"
    shutil.copytree(photos, src)
    (src / "loop").symlink_to(".")
    out = tmp_path / "e.parquet"
    res = run_cli("embed", str(art), str(src), "--out", str(out))
    assert res.returncode == 3, res.stderr
    assert f"skipped: {src / 'loop'}: symbolic link to a folder, not followed (use --follow-symlinks)" in res.stderr
    assert "skipped 1 entry while listing the inputs" in res.stderr
    assert "0 reused, 0 re-embedded (changed), 8 new, 0 retried (0 still failing), 0 removed" in res.stdout
    shutil.copyfile(src / "2.jpg", src / "1.jpg")
    st = os.stat(src / "1.jpg")
    os.utime(src / "1.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (src / "3b-broken.jpg").unlink()
    res = run_cli("embed", str(art), str(src), "--out", str(out), "--follow-symlinks")
    assert res.returncode == 0, res.stderr
    assert "folder already walked" in res.stderr
    assert "6 reused, 1 re-embedded (changed), 0 new, 0 retried (0 still failing), 1 removed" in res.stdout
    table = read_embeddings(out)
    assert len(table.paths) == 7 and not table.failures
    np.testing.assert_allclose(table.vectors, imgembed.load(art).embed(table.paths), rtol=0, atol=1e-6)
    other = artifact_dir("test-vit-tiny")
    res = run_cli("embed", str(other), str(src), "--out", str(out))
    assert res.returncode == 1 and "vectors of another model are not comparable" in " ".join(res.stderr.split())
    res = run_cli("embed", str(other), str(src), "--out", str(out), "--overwrite", "--verify", "content")
    assert res.returncode == 0, res.stderr
    assert read_embeddings(out).metadata["model"] == "test-vit-tiny"
