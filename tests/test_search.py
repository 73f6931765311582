"""``imgembed search``: text and image queries over the Parquet index of ``imgembed embed``, checked against a
brute-force numpy ranking; the errors (no index, no text tower, another model's artifact) by exit code."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

import imgembed
from imgembed.bench.suite import write_sample_files
from imgembed.jobs.parquet import read_embeddings
from imgembed.jobs.search import nearest

from .helpers import run_cli

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    directory = tmp_path_factory.mktemp("search-photos")
    write_sample_files(directory)
    (directory / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # a failed row: no vector
    return directory


def embed_index(artifact, photos, out):
    r = run_cli("embed", str(artifact), str(photos), "--out", str(out))
    assert r.returncode == 3, r.stdout + r.stderr  # 3: the broken photo is a failed row, the others are written
    return out


@pytest.fixture(scope="module")
def text_index(text_artifact, photos, tmp_path_factory):
    """(artifact with a text tower, its Parquet index of the photos)."""
    art = text_artifact("test-clip-tiny")
    return art, embed_index(art, photos, tmp_path_factory.mktemp("search-index") / "photos.parquet")


def search(*args: str) -> list[dict]:
    r = run_cli("search", *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def brute_force(index, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Paths and cosines of the k nearest rows, by a plain numpy scan."""
    v = index.vectors.astype(np.float64)
    cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    order = np.argsort(-cos, kind="stable")[:k]
    return [index.paths[i] for i in order], cos[order]


def test_text_query_ranks_the_index_like_a_numpy_scan(text_index):
    art, idx = text_index
    hits = search(str(idx), "a red bicycle", "--artifact", str(art), "-k", "7")
    index = read_embeddings(idx)
    assert len(index.vectors) == len(index.paths) == 26 and len(index.failures) == 1
    want_paths, want_scores = brute_force(index, imgembed.load(art).embed_text(["a red bicycle"])[0], 7)
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert [h["path"] for h in hits] == want_paths
    np.testing.assert_allclose([h["score"] for h in hits], want_scores, atol=1e-5)
    assert all("broken.jpg" not in h["path"] for h in hits)


def test_image_query_of_an_indexed_photo_finds_itself_first(text_index, photos):
    art, idx = text_index
    photo = str(photos / "chelsea.jpg")
    hits = search(str(idx), photo, "--artifact", str(art))
    assert len(hits) == 10  # -k defaults to 10
    assert hits[0]["path"] == photo and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    want_paths, want_scores = brute_force(read_embeddings(idx), imgembed.load(art).embed([photo])[0], 10)
    assert [h["path"] for h in hits] == want_paths
    np.testing.assert_allclose([h["score"] for h in hits], want_scores, atol=1e-5)
    # A photo of the index needs no artifact: its stored vector is the query.
    stored = search(str(idx), photo, "-k", "3")
    assert [h["path"] for h in stored] == want_paths[:3]


def test_table_output_and_forced_text_query(text_index, photos):
    art, idx = text_index
    r = run_cli("search", str(idx), str(photos / "coffee.jpg"), "--artifact", str(art), "--text", "-k", "2")
    assert r.returncode == 0, r.stderr
    assert f"text query '{photos / 'coffee.jpg'}': 26 vectors of test-clip-tiny (fp32), 1 failed rows skipped" \
        in " ".join(r.stderr.split())
    assert "rank" in r.stdout and "score" in r.stdout and r.stdout.count(str(photos)) == 2


@pytest.mark.parametrize("args, code, message", [
    (["missing.parquet", "a cat"], 1, "index missing.parquet does not exist; write one with `imgembed embed"),
    (["{idx}", "a cat"], 1, "a text query needs --artifact DIR, the artifact that embedded"),
    (["{idx}", "no-such.jpg", "--image", "--artifact", "{art}"], 1, "image query 'no-such.jpg' is not a file"),
    (["{idx}", "a cat", "--image", "--text"], 2, "give at most one of --image and --text"),
])
def test_bad_searches_say_what_is_wrong(text_index, args, code, message):
    art, idx = text_index
    r = run_cli("search", *(a.format(idx=idx, art=art) for a in args))
    assert r.returncode == code, r.stdout + r.stderr
    assert message in " ".join(r.stderr.split())


def test_text_query_with_an_image_only_artifact_names_export_text(artifact_dir, photos, tmp_path):
    art = artifact_dir("test-clip-tiny")
    idx = embed_index(art, photos, tmp_path / "image-only.parquet")
    r = run_cli("search", str(idx), "a red bicycle", "--artifact", str(art))
    assert r.returncode == 1
    assert (f"{art} has no text tower, so it cannot embed the text query 'a red bicycle': export the model with "
            "`imgembed export test-clip-tiny --text`") in " ".join(r.stderr.split())
    assert len(search(str(idx), str(photos / "astronaut.jpg"), "--artifact", str(art), "-k", "1")) == 1


def test_an_artifact_that_did_not_embed_the_index_is_refused(text_index, text_artifact):
    _, idx = text_index
    other = text_artifact("test-siglip-tiny")
    r = run_cli("search", str(idx), "a cat", "--artifact", str(other))
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "IndexMismatchError" in err and f"{other} did not embed {idx} (manifest sha256" in err
    assert "vectors of another model are not comparable" in err


def test_faiss_is_used_when_installed_and_agrees_with_numpy(monkeypatch):
    rng = np.random.default_rng(0)
    vectors, query = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    by_numpy = nearest(vectors, query, 5, use_faiss=False)
    calls = []

    class IndexFlatIP:  # the two calls the search makes, computed exactly as FAISS does (inner products)
        def __init__(self, dim):
            self.rows = np.zeros((0, dim), np.float32)

        def add(self, x):
            self.rows = np.concatenate([self.rows, x])

        def search(self, q, k):
            calls.append(k)
            scores = q @ self.rows.T
            ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, ids, axis=1), ids

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=IndexFlatIP))
    by_faiss = nearest(vectors, query, 5)
    assert calls == [5]
    np.testing.assert_array_equal(by_faiss.indices, by_numpy.indices)
    np.testing.assert_allclose(by_faiss.scores, by_numpy.scores, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is not None, reason="faiss is installed here")
def test_faiss_required_but_missing_is_a_typed_error(text_index):
    art, idx = text_index
    r = run_cli("search", str(idx), "a cat", "--artifact", str(art), "--faiss")
    assert r.returncode == 1 and "pip install faiss-cpu" in r.stderr
