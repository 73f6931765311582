"""Folder jobs: listing (symlinks, loops), Parquet rows and metadata, resume after an interruption, incremental
reruns that never keep a stale row (rewritten, repaired, vanished, appeared files; another model)."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imgembed
from imgembed.artifact import sha256_file
from imgembed.gate.samples import parity_images
from imgembed.jobs import JobError
from imgembed.jobs.folder import FolderJob, job_metadata, list_images, local_batches, walk_inputs
from imgembed.jobs.parquet import read_embeddings, read_table

from .helpers import cli_env, cosine, start_cli

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
    kept = FolderJob(out, files, job_metadata(emb), retry_failed=False).run(local_batches(emb))
    assert (kept.resumed, kept.new, kept.retried, kept.embedded_now, kept.rows) == (10, 5, 0, 5, 15)
    assert sorted(read_table(out).column("path").to_pylist()) == sorted(files)
    again = FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))  # the 2 bad files are retried
    assert (again.resumed, again.retried, again.still_failing, again.embedded_now, again.failed) == (13, 2, 2, 2, 2)
    assert sorted(read_table(out).column("path").to_pylist()) == sorted(files)


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


# ------------------------------------------------------------------------------------------ stale rows
def _photos(directory: Path, n: int, ext: str = "jpg") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for i, (_, img) in enumerate(parity_images()[:n]):
        img.convert("RGB").resize((64, 48)).save(directory / f"{i:02d}.{ext}")
    return list_images([str(directory)])


def _rows(out: Path) -> dict[str, np.ndarray | str]:
    """path -> stored vector, or the error message of a failure row."""
    res = read_embeddings(out)
    return {**dict(zip(res.paths, res.vectors, strict=True)), **dict(res.failures)}


def _bump_mtime(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_a_rewritten_photo_is_embedded_again_and_replaces_its_row(emb, tmp_path):
    files = _photos(tmp_path / "p", 4)
    out = tmp_path / "e.parquet"
    FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))
    old = _rows(out)[files[1]]
    shutil.copyfile(files[3], files[1])  # the photo is replaced by another one under the same name
    _bump_mtime(Path(files[1]))
    again = FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))
    assert (again.resumed, again.reembedded, again.new, again.embedded_now, again.rows) == (3, 1, 0, 1, 4)
    assert "3 reused, 1 re-embedded (changed), 0 new" in again.summary()
    assert sorted(read_table(out).column("path").to_pylist()) == sorted(files)  # replaced, not duplicated
    stored = _rows(out)[files[1]]
    np.testing.assert_allclose(stored, emb.embed([files[1]])[0], rtol=0, atol=1e-6)
    assert cosine(old, stored) < 0.999


def test_verify_content_catches_a_change_that_keeps_size_and_mtime(emb, tmp_path):
    files = _photos(tmp_path / "p", 3, "bmp")  # same size in bytes for every photo
    out = tmp_path / "e.parquet"
    FolderJob(out, files, job_metadata(emb), verify="content").run(local_batches(emb))
    st = os.stat(files[0])
    shutil.copyfile(files[2], files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(files[0]).st_size == st.st_size
    by_stat = FolderJob(out, files, job_metadata(emb), verify="stat").run(local_batches(emb))
    assert (by_stat.resumed, by_stat.embedded_now) == (3, 0)  # size + mtime cannot see it
    by_content = FolderJob(out, files, job_metadata(emb), verify="content").run(local_batches(emb))
    assert (by_content.resumed, by_content.reembedded) == (2, 1)
    np.testing.assert_allclose(_rows(out)[files[0]], emb.embed([files[2]])[0], rtol=0, atol=1e-6)
    hashes = read_table(out, ["content_hash"]).column("content_hash").to_pylist()
    assert all(isinstance(h, str) and len(h) == 32 for h in hashes)


def test_failures_are_retried_after_a_repair_and_kept_with_no_retry(emb, tmp_path):
    files = _photos(tmp_path / "p", 3)
    good = Path(files[0]).read_bytes()
    Path(files[0]).write_bytes(good[:300])  # truncated
    late = str(tmp_path / "p" / "late.jpg")  # named, but not there yet
    listed = files + [late]
    out = tmp_path / "e.parquet"
    first = FolderJob(out, listed, job_metadata(emb)).run(local_batches(emb))
    assert first.failed == 2 and "Truncated" in _rows(out)[files[0]] and "not found" in _rows(out)[late]
    kept = FolderJob(out, listed, job_metadata(emb), retry_failed=False).run(local_batches(emb))
    assert (kept.resumed, kept.embedded_now, kept.failed) == (4, 0, 2)
    Path(files[0]).write_bytes(good)  # repaired
    _bump_mtime(Path(files[0]))
    shutil.copyfile(files[1], late)  # appeared
    again = FolderJob(out, listed, job_metadata(emb)).run(local_batches(emb))
    assert (again.retried, again.still_failing, again.failed, again.resumed) == (2, 0, 0, 2)
    assert "2 retried (0 still failing)" in again.summary()
    rows = _rows(out)
    np.testing.assert_allclose(np.stack([rows[p] for p in listed]), emb.embed(listed), rtol=0, atol=1e-6)


def test_a_vanished_file_loses_its_row(emb, tmp_path):
    files = _photos(tmp_path / "p", 4)
    out = tmp_path / "e.parquet"
    FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))
    os.remove(files[2])
    again = FolderJob(out, list_images([str(tmp_path / "p")]), job_metadata(emb)).run(local_batches(emb))
    assert (again.removed, again.resumed, again.rows, again.embedded_now) == (1, 3, 3, 0)
    assert files[2] not in read_table(out).column("path").to_pylist()


def test_an_output_of_another_model_is_refused_unless_overwrite(emb, artifact_dir, tmp_path):
    files = _photos(tmp_path / "p", 2)
    out = tmp_path / "e.parquet"
    FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))
    other = imgembed.load(artifact_dir("test-vit-tiny"))
    with pytest.raises(JobError, match=r"e\.parquet holds vectors made with model='test-clip-tiny' \(this run: "
                                       r"'test-vit-tiny'\).*not comparable.*--overwrite"):
        FolderJob(out, files, job_metadata(other)).run(local_batches(other))
    assert read_embeddings(out).metadata["model"] == MODEL  # untouched
    res = FolderJob(out, files, job_metadata(other), overwrite=True).run(local_batches(other))
    assert (res.resumed, res.new, res.rows) == (0, 2, 2)
    np.testing.assert_allclose(read_embeddings(out).vectors, other.embed(files), rtol=0, atol=1e-6)
    out.write_bytes(b"not parquet")
    with pytest.raises(JobError, match=r"not a Parquet file.*pass --overwrite to replace"):
        FolderJob(out, files, job_metadata(other)).run(local_batches(other))


def test_a_corrupted_job_record_is_a_typed_error(emb, tmp_path):
    files = _photos(tmp_path / "p", 2)
    out = tmp_path / "e.parquet"
    job = FolderJob(out, files, job_metadata(emb), part_rows=1)
    job.run(local_batches(emb, batch_size=1), max_parts=1)
    (job.work / "job.json").write_text('{"model": "test-cl')
    with pytest.raises(JobError, match=r"job\.json: unreadable job record .*delete .*\.e\.parquet\.work or pass "
                                       r"--overwrite"):
        job.run(local_batches(emb))
    res = FolderJob(out, files, job_metadata(emb), overwrite=True).run(local_batches(emb))
    assert res.complete and res.rows == 2
    out.unlink()
    job.run(local_batches(emb, batch_size=1), max_parts=1)
    (job.work / "job.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(JobError, match=r"job\.json: unreadable job record \(JSON nested too deeply\)"):
        job.run(local_batches(emb))
    (job.work / "job.json").unlink()
    (job.work / "job.json").mkdir()
    with pytest.raises(JobError, match=r"job\.json: unreadable job record \(.*Is a directory"):
        job.run(local_batches(emb))
    shutil.rmtree(job.work)
    job.work.write_text("a file where the work directory goes")
    with pytest.raises(JobError, match=r"\.e\.parquet\.work: cannot hold the job's work directory"):
        job.run(local_batches(emb))
    assert FolderJob(out, files, job_metadata(emb), overwrite=True).run(local_batches(emb)).rows == 2


def test_parts_left_by_another_model_are_never_reused(emb, artifact_dir, tmp_path):
    files = _photos(tmp_path / "p", 4)
    out = tmp_path / "e.parquet"
    other = imgembed.load(artifact_dir("test-vit-tiny"))
    stopped = FolderJob(out, files, job_metadata(other), part_rows=2)
    stopped.run(local_batches(other, batch_size=2), max_parts=1)
    (stopped.work / "job.json").unlink()  # the record is gone, the part stays
    with pytest.raises(JobError, match=r"part-000001\.parquet was made with model='test-vit-tiny' \(this run: "
                                       r"'test-clip-tiny'\).*pass --overwrite"):
        FolderJob(out, files, job_metadata(emb)).run(local_batches(emb))
    assert not (stopped.work / "job.json").exists()  # the refused run did not claim the work directory
    resumed = FolderJob(out, files, job_metadata(other)).run(local_batches(other))  # its own model resumes
    assert (resumed.resumed, resumed.new, resumed.rows) == (2, 2, 4)
    rows = _rows(out)
    for f in files:
        assert cosine(rows[f], other.embed([f])[0]) > 0.9999


# ---------------------------------------------------------------------------------------------- walking
def test_symlink_loops_never_multiply_rows(tmp_path):
    files = _photos(tmp_path / "p", 2)
    (tmp_path / "p" / "self").symlink_to(".")
    listing = walk_inputs([str(tmp_path / "p")])
    assert listing.paths == files
    assert listing.skipped == [f"{tmp_path / 'p' / 'self'}: symbolic link to a folder, not followed "
                               "(use --follow-symlinks)"]
    (tmp_path / "p" / "again").symlink_to(tmp_path / "p")
    t0 = time.monotonic()
    for follow in (False, True):
        for pattern in ("**/*.jpg", "**"):
            listing = walk_inputs([str(tmp_path / "p" / pattern)], follow_symlinks=follow)
            assert sorted(listing.paths) == files, (pattern, follow)
        one_level = walk_inputs([str(tmp_path / "p" / "*" / "*.jpg")], follow_symlinks=follow).paths
        assert len(one_level) == (2 if follow else 0)  # through one of the two links to the same folder
        listing = walk_inputs([str(tmp_path / "p")], follow_symlinks=follow)
        assert listing.paths == files
    assert time.monotonic() - t0 < 5
    assert len(listing.skipped) == 2 and all("folder already walked" in s for s in listing.skipped)


def test_symlinked_folders_are_skipped_with_a_note_or_followed_once(tmp_path):
    files = _photos(tmp_path / "p", 2)
    elsewhere = _photos(tmp_path / "elsewhere", 3, "png")
    (tmp_path / "p" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "p" / "linked-twice").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "p" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    skipped = walk_inputs([str(tmp_path / "p")])
    assert skipped.paths == files and len(skipped.skipped) == 3
    assert "dangling.jpg: broken symbolic link" in skipped.skipped[0]
    assert "linked: symbolic link to a folder, not followed" in skipped.skipped[1]
    followed = walk_inputs([str(tmp_path / "p")], follow_symlinks=True)
    via = [str(tmp_path / "p" / "linked" / Path(f).name) for f in elsewhere]
    assert followed.paths == files + via  # the second link to the same folder is not walked again
    assert "linked-twice: folder already walked" in followed.skipped[1]
    assert walk_inputs([str(tmp_path / "p" / "linked")]).paths == via  # a link named as an input is walked
    for pattern in ("**/*.png", "**"):  # a glob whose first component is ** follows the same rule
        globbed = walk_inputs([str(tmp_path / "p" / pattern)])
        assert globbed.paths == ([] if pattern.endswith("png") else files), pattern
        assert f"{tmp_path / 'p' / 'linked'}: symbolic link to a folder, not followed (use --follow-symlinks)" \
            in globbed.skipped
        assert len(globbed.skipped) == len(set(globbed.skipped))  # each note once
        assert walk_inputs([str(tmp_path / "p" / pattern)], follow_symlinks=True).paths == (
            via if pattern.endswith("png") else files + via)


def test_folders_deeper_than_the_recursion_limit_are_walked(tmp_path):
    deep = tmp_path
    for _ in range(300):
        deep = deep / "d"
        deep.mkdir()
    (deep / "x.png").write_bytes(b"")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a walk that recursed per folder would fail here
    try:
        paths = walk_inputs([str(tmp_path)]).paths
    finally:
        sys.setrecursionlimit(limit)
    assert paths == [str(deep / "x.png")]
