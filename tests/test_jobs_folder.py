"""Folder jobs: listing, Parquet rows and metadata, resume after an interruption, incremental reruns."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

import imgembed
from imgembed.artifact import sha256_file
from imgembed.jobs import JobError
from imgembed.jobs.folder import FolderJob, job_metadata, list_images, local_batches
from imgembed.jobs.parquet import read_embeddings, read_table
from imgembed.samples import parity_images

from .helpers import cli_env, start_cli

MODEL = "test-clip-tiny"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """13 photos (JPEG/PNG, one nested) and 2 bad files."""
    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    for i, (name, img) in enumerate(parity_images()[:13]):
        target = d / ("sub" if i == 7 else "") / f"{i:02d}-{name}.{'png' if i % 4 == 0 else 'jpg'}"
        img.convert("RGB").save(target)
    data = (d / "05-immunohistochemistry.jpg").read_bytes()
    (d / "05b-truncated.jpg").write_bytes(data[:len(data) // 2])
    (d / "09b-not-an-image.png").write_bytes(b"hello")
    (d / "notes.txt").write_text("not listed")
    return d


@pytest.fixture(scope="module")
def emb(artifact_dir):
    return imgembed.load(artifact_dir(MODEL), batch_size=4)


def test_list_images_expands_dirs_and_globs(folder):
    files = list_images([str(folder)])
    assert len(files) == 15 and files == sorted(files) and str(folder / "sub" / "07-retina.jpg") in files
    jpgs = list_images([str(folder / "*.jpg"), str(folder / "**" / "*.jpg")])
    assert len(jpgs) == len(set(jpgs)) == sum(f.endswith(".jpg") for f in files)
    assert list_images([str(folder / "missing.jpg")]) == [str(folder / "missing.jpg")]  # reported as a failed row


def test_job_resumes_without_duplicates_and_matches_the_embedder(folder, emb, tmp_path):
    files = list_images([str(folder)])
    out = tmp_path / "emb.parquet"
    job = FolderJob(out, files, job_metadata(emb), part_rows=4)
    first = job.run(local_batches(emb, batch_size=4, workers=2), max_parts=2)  # interrupted after 2 parts
    assert not first.complete and not out.exists() and first.rows == first.embedded_now == 9 and first.failed == 1
    assert sorted(p.name for p in job.work.iterdir()) == ["job.json", "part-000001.parquet", "part-000002.parquet"]
    second = job.run(local_batches(emb, batch_size=4, workers=2))
    assert second.complete and second.resumed == 9 and second.embedded_now == 6 and not job.work.exists()
    table = read_table(out)
    assert table.column("path").to_pylist() == files  # one row per file, listing order, no duplicates
    res = read_embeddings(out)
    assert [Path(p).name for p, _ in res.failures] == ["05b-truncated.jpg", "09b-not-an-image.png"]
    assert "truncated or corrupt" in res.failures[0][1] and "09b-not-an-image.png" in res.failures[1][1]
    np.testing.assert_allclose(res.vectors, emb.embed(res.paths), rtol=0, atol=1e-6)
    vtype = table.schema.field("vector").type
    assert (vtype.list_size, str(vtype.value_type), table.column("vector").null_count) == (24, "float", 2)
    meta = res.metadata
    assert (meta["model"], meta["precision"], meta["dim"], meta["rows"], meta["failed"]) == (MODEL, "fp32", 24, 15, 2)
    assert meta["manifest_sha256"] == sha256_file(emb.artifact_path / "manifest.json") and meta["decode"] == "exact"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".emb.parquet.") and p.suffix == ".tmp"]


def test_a_crash_mid_job_keeps_the_checkpoints(folder, emb, tmp_path):
    files = list_images([str(folder)])
    out = tmp_path / "emb.parquet"
    engine = local_batches(emb, batch_size=2, workers=1)

    def crashing(paths):
        for n, rows in enumerate(engine(paths)):
            if n == 3:
                raise KeyboardInterrupt  # Ctrl-C after three batches
            yield rows

    with pytest.raises(KeyboardInterrupt):
        FolderJob(out, files, job_metadata(emb), part_rows=2).run(crashing)
    result = FolderJob(out, files, job_metadata(emb), part_rows=2).run(engine)
    assert result.complete and result.resumed == 6 and result.embedded_now == 9
    assert read_table(out).column("path").to_pylist() == files


def test_rerun_over_a_grown_folder_embeds_only_new_files(folder, emb, tmp_path):
    files = list_images([str(folder)])
    out = tmp_path / "emb.parquet"
    FolderJob(out, files[:10], job_metadata(emb)).run(local_batches(emb))
    again = FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))
    assert again.resumed == 10 and again.embedded_now == 5 and again.rows == 15
    assert read_table(out).column("path").to_pylist() == files


def test_resuming_with_another_model_is_refused(folder, emb, artifact_dir, tmp_path):
    files = list_images([str(folder)])
    out = tmp_path / "emb.parquet"
    FolderJob(out, files, job_metadata(emb), part_rows=4).run(local_batches(emb), max_parts=1)
    other = imgembed.load(artifact_dir(MODEL), decode="fast")
    with pytest.raises(JobError, match=r"made with decode='exact' \(this run: 'fast'\).*delete .*\.emb\.parquet\.work"):
        FolderJob(out, files, job_metadata(other)).run(local_batches(other))


def test_killed_cli_job_resumes(artifact_dir, tmp_path):
    """SIGKILL a running `imgembed embed ... --out x.parquet`, rerun it: every image once, as the API does."""
    src = tmp_path / "big"
    src.mkdir()
    photos = [img.convert("RGB").resize((900, 700)) for _, img in parity_images()[:8]]
    for i in range(240):
        photos[i % 8].save(src / f"{i:03d}.jpg", quality=90)
    out = tmp_path / "emb.parquet"
    work = tmp_path / ".emb.parquet.work"
    args = (str(artifact_dir(MODEL)), str(src), "--out", str(out), "--part-rows", "8", "-b", "4", "--workers", "0")
    proc = start_cli("embed", *args, env=cli_env())
    deadline = time.monotonic() + 120
    while not list(work.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the job finished before it could be killed (machine too fast for 240 images)")
    done = sum(read_table(p).num_rows for p in work.glob("part-*.parquet"))
    assert 0 < done < 240
    proc = start_cli("embed", *args, env=cli_env())
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"resumed: {done} of 240 images were already done" in stdout
    paths = read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 240 and not work.exists()
