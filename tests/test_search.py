"""``imgembed search``: text and image queries over the Parquet index of ``imgembed embed``, checked against a
brute-force numpy ranking; the errors (no index, no text tower, another model's artifact) by exit code; hostile
index files (size bombs, bad schema or metadata, control characters in paths) built with pyarrow."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

import imgembed
from imgembed.bench.suite import write_sample_files
from imgembed.jobs.parquet import IndexFormatError, Limits, read_embeddings
from imgembed.jobs.search import load_index, nearest

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


# ------------------------------------------------------------------------------------- hostile index files
def write_index(path, paths, vectors, meta=None, *, raw_meta: bytes | None = None, columns=None, **write_kw):
    """A Parquet file laid out like a job output (or with ``columns`` replacing its columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if columns is None:
        vectors = np.asarray(vectors, np.float32)
        vector = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        columns = {"path": pa.array(paths, pa.string()), "vector": vector, "error": pa.nulls(len(paths), pa.string())}
        meta = meta or {"model": "m", "dim": vectors.shape[1]}
    table = pa.table(columns)
    metadata = raw_meta if raw_meta is not None else json.dumps(meta or {"model": "m"})
    table = table.replace_schema_metadata({b"imgembed": metadata})
    pq.write_table(table, str(path), **write_kw)
    return path


def refused_before_reading(path, message: str) -> None:
    """``load_index(path)`` is an IndexFormatError matching ``message``, and Arrow allocated under 1 MiB."""
    import pyarrow as pa

    before = pa.total_allocated_bytes()
    with pytest.raises(IndexFormatError, match=message):
        load_index(path)
    assert pa.total_allocated_bytes() - before < 1 << 20


def test_a_size_bomb_is_refused_before_anything_is_allocated(tmp_path):

    n, dim = 80_000, 256  # 82 MB of zero vectors, compressed to a couple of kilobytes
    bomb = write_index(tmp_path / "bomb.parquet", ["x.jpg"] * n, np.zeros((n, dim)), compression="zstd",
                       data_page_size=1 << 30, row_group_size=n)
    assert bomb.stat().st_size < 4096
    refused_before_reading(bomb, rf"bomb\.parquet: a {bomb.stat().st_size}-byte file declaring 81920000 bytes of "
                                 r"data \(80000 rows of 256 floats\): refused")
    with pytest.raises(IndexFormatError, match="declares 80000 rows, more than the limit of 1000"):
        load_index(bomb, Limits(rows=1000))
    small = write_index(tmp_path / "ok.parquet", ["a.jpg", "b.jpg"], np.eye(2, 8))
    with pytest.raises(IndexFormatError, match=r"declaring \d+ bytes of data \(2 rows of 8 floats\).*limits: 10 b"):
        load_index(small, Limits(bytes=10))
    np.testing.assert_array_equal(load_index(small).vectors, np.eye(2, 8))


def test_a_string_column_repeating_one_long_value_is_refused_before_it_is_decoded(tmp_path):
    import pyarrow as pa

    n = 2000  # one 100 kB path repeated: dictionary-encoded, a 2.5 kB file that decodes to 200 MB of strings
    path = pa.array(["p" * 100_000]).take(pa.array(np.zeros(n, np.int32)))
    cols = {"path": path, "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n, np.float32)), 1),
            "error": pa.nulls(n, pa.string())}
    bomb = write_index(tmp_path / "dict.parquet", None, None, {"model": "m", "dim": 1}, columns=cols,
                       compression="zstd")
    assert bomb.stat().st_size < 8192
    refused_before_reading(bomb, r"dict\.parquet: a \d+-byte file declaring 200008000 bytes of data \(2000 rows of "
                                 r"1 floats and 200000000 bytes of strings\): refused")
    few = write_index(tmp_path / "few.parquet", None, None, {"model": "m", "dim": 1}, columns={
        k: v[:20] for k, v in cols.items()})  # 2 MB of paths in a small file: within the 64 MB floor
    assert load_index(few).paths == ["p" * 100_000] * 20


@pytest.mark.parametrize("case, message", [
    ("not parquet", r"not a Parquet file \(expected PAR1 magic at both ends"),
    ("truncated", r"not a Parquet file \(expected PAR1 magic"),
    ("footer", r"corrupt Parquet footer \(declares 4294967295 bytes"),
    ("meta json", r"the imgembed metadata is not JSON"),
    ("meta list", r"the imgembed metadata is a JSON list, expected an object"),
    ("meta types", r"metadata 'manifest_sha256' is 12, expected str or null"),
    ("meta dim", r"metadata says dim 5, the vector column has 8"),
    ("no vector", r"no 'vector' column \(columns: path, vectors\\x1b, error\)"),
    ("float64", r"column 'vector' is fixed_size_list<element: double>\[8\], expected fixed_size_list<float>"),
    ("size type", r"column 'size' is string, expected int64"),
    ("null path", r"rows without a path, or without both a vector and an error"),
    ("meta deep", r"the imgembed metadata is JSON nested too deeply"),
    ("nan", r"1 vectors hold non-finite values \(NaN or inf\), the first that of 'b\.jpg\\x1b'; expected finite"),
])
def test_malformed_index_files_are_one_line_typed_errors(tmp_path, case, message):
    import pyarrow as pa

    path, good = tmp_path / "idx.parquet", np.eye(2, 8)
    cols = {"path": pa.array(["a.jpg", "b.jpg"]), "vector": pa.FixedSizeListArray.from_arrays(
        pa.array(good.reshape(-1), pa.float32()), 8), "error": pa.nulls(2, pa.string())}
    if case in ("not parquet", "truncated", "footer"):
        write_index(path, ["a.jpg", "b.jpg"], good)
        data = path.read_bytes()
        path.write_bytes({"not parquet": b"hello, world, not a parquet file",
                          "truncated": data[:len(data) // 2],
                          "footer": data[:-8] + b"\xff\xff\xff\xffPAR1"}[case])
    elif case.startswith("meta"):
        raw = {"meta json": b"{not json", "meta list": b"[1, 2]", "meta types": b'{"manifest_sha256": 12}',
               "meta dim": b'{"dim": 5}', "meta deep": b"[" * 100_000 + b"]" * 100_000}[case]
        write_index(path, ["a.jpg", "b.jpg"], good, raw_meta=raw)
    else:
        if case == "no vector":
            cols = {"path": cols["path"], "vectors\x1b": cols["vector"], "error": cols["error"]}
        elif case == "float64":
            cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(good.reshape(-1), pa.float64()), 8)
        elif case == "size type":
            cols["size"] = pa.array(["1", "2"])
        elif case == "null path":
            cols["path"] = pa.array([None, "b.jpg"], pa.string())
        elif case == "nan":
            cols["path"] = pa.array(["a.jpg", "b.jpg\x1b"])
            cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(np.r_[good[0], np.full(8, np.nan)],
                                                                        pa.float32()), 8)
        write_index(path, None, None, columns=cols)
    with pytest.raises(IndexFormatError, match=message) as info:
        load_index(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_search_cli_refuses_a_bomb_and_escapes_control_characters(tmp_path):
    n, dim = 80_000, 256
    bomb = write_index(tmp_path / "bomb.parquet", ["x.jpg"] * n, np.zeros((n, dim)), compression="zstd",
                       data_page_size=1 << 30, row_group_size=n)
    r = run_cli("search", str(bomb), "a cat")
    assert r.returncode == 1 and "IndexFormatError" in r.stderr and "refused" in r.stderr
    assert "Traceback" not in r.stderr
    photo = tmp_path / "query.jpg"
    photo.write_bytes(b"\xff\xd8 an indexed photo: its stored vector is the query")
    evil = "evil\x1b]0;pwned\x07\x1b[2J\u202egpj.exe\nname.jpg"
    idx = write_index(tmp_path / "idx.parquet", [str(photo), evil], [[1, 0, 0, 0], [0.9, 0.1, 0, 0]],
                      {"model": "m\x1b[31m", "precision": "fp32", "dim": 4})
    r = run_cli("search", str(idx), str(photo), "-k", "2")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout and "\u202e" not in r.stdout
    flat = "".join(r.stdout.split())
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\u202egpj.exe\\x0aname.jpg" in flat
    assert "vectors of m\\x1b[31m (fp32)" in " ".join(r.stderr.split())


def test_error_messages_print_paths_as_they_are(tmp_path):
    """A typed error naming a path that holds Rich markup or terminal escapes prints it literally."""
    for name in ("dir[/x]", "[red]x[/red]", "e\x1b]0;t\x07"):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        r = run_cli("search", str(folder / "idx.parquet"), "a cat")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        shown = "".join(r.stderr.split())
        assert "SearchError" in shown and "\x1b" not in r.stderr and "\x07" not in r.stderr
        assert "".join(f"index {folder}/idx.parquet does not exist".encode("unicode_escape").decode()
                       .replace("\\\\", "\\").split()) in shown
