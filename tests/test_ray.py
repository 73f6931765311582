"""Ray Data scale-out on a local Ray instance: same vectors as the local runtime, resumable folder jobs."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import imgembed
from imgembed.gate.samples import parity_images
from imgembed.jobs.folder import FolderJob, job_metadata, list_images, local_batches
from imgembed.jobs.parquet import read_embeddings

from .helpers import run_cli

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'imgembed[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-photos")
    for i, (_, img) in enumerate(parity_images()[:10]):
        img.convert("RGB").save(d / f"{i:02d}.jpg", quality=90)
    (d / "04b-broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return d


def test_ray_vectors_equal_the_local_runtime(local_ray, photos, artifact_dir):
    from imgembed.jobs.ray import embed_with_ray

    art = artifact_dir("test-clip-tiny")  # FP32: vectors do not depend on batch composition
    table = embed_with_ray(art, str(photos), batch_size=3, concurrency=2)
    files = list_images([str(photos)])
    assert table.paths == [f for f in files if "broken" not in f]  # listing order
    assert [p.rsplit("/", 1)[1] for p, _ in table.failures] == ["04b-broken.jpg"]
    assert "04b-broken.jpg" in table.failures[0][1]
    np.testing.assert_allclose(table.vectors, imgembed.load(art).embed(table.paths), rtol=0, atol=1e-6)


def test_ray_engine_runs_a_resumable_folder_job(local_ray, photos, artifact_dir, tmp_path):
    from imgembed.jobs.ray import ray_batches

    art = artifact_dir("test-clip-tiny")
    emb = imgembed.load(art, decode="fast")
    shutil.copytree(photos, tmp_path / "photos")
    files = list_images([str(tmp_path / "photos")])
    out = tmp_path / "e.parquet"
    local = FolderJob(out, files[:4], job_metadata(emb)).run(local_batches(emb))  # 4 done locally
    assert local.rows == 4
    shutil.copyfile(files[6], files[0])  # one of them rewritten since: embedded again on Ray
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    result = FolderJob(out, files, job_metadata(emb)).run(ray_batches(art, batch_size=4, decode="fast"))
    assert result.complete and (result.resumed, result.reembedded, result.new, result.embedded_now) == (3, 1, 7, 8)
    table = read_embeddings(out)
    assert len(table.paths) == 10 and len(table.failures) == 1
    np.testing.assert_allclose(table.vectors, emb.embed(table.paths), rtol=0, atol=1e-6)


def test_cli_ray_flag(photos, artifact_dir, tmp_path):
    """`imgembed embed ARTIFACT DIR --ray` starts a local Ray instance in the subprocess; same vectors."""
    art = artifact_dir("test-clip-tiny")
    out = tmp_path / "r.npy"
    res = run_cli("embed", str(art), str(photos), "--out", str(out), "--ray", "-b", "4")
    assert res.returncode == 3, res.stderr[-2000:]  # the broken file is reported
    assert "04b-broken.jpg" in res.stderr and "wrote 10 x 24 embeddings" in res.stdout
    paths = (tmp_path / "r.paths.txt").read_text().splitlines()
    np.testing.assert_allclose(np.load(out), imgembed.load(art).embed(paths), rtol=0, atol=1e-6)
    res = run_cli("embed", "test-clip-tiny", "--random-init", str(photos), "--out", str(out), "--ray")
    assert res.returncode == 2 and "--ray runs exported artifacts" in res.stderr
