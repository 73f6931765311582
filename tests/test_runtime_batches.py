"""Batches never lose good items: the Python API (``on_error="report"``) and ``imgembed embed`` on a folder
of mixed good and bad files return every good vector and report every bad input by name."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from imgembed.errors import ImageDecodeError

MODEL = "test-clip-tiny"


def _enc(arr: np.ndarray, fmt: str) -> bytes:
    """Encode a uint8 array with PIL."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels (67 bytes)."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def embedder(artifact_dir):
    """The tiny CLIP artifact on ONNX Runtime."""
    import imgembed

    return imgembed.load(artifact_dir(MODEL))


def test_api_report_keeps_every_good_item(embedder, tmp_path):
    """Bad items in every batch position: the good vectors equal a clean run over the good items alone,
    with their input indices; each bad item is reported once, by index, naming it and the reason."""
    cat, coffee, rocket = skdata.chelsea(), skdata.coffee(), skdata.rocket()
    good_path, text_path = tmp_path / "cat.png", tmp_path / "notes.jpg"
    good_path.write_bytes(_enc(cat, "PNG"))
    text_path.write_text("not a picture\n" * 20)
    jpeg = _enc(coffee, "JPEG")
    items = [good_path, text_path, jpeg, b"", rocket, jpeg[:len(jpeg) // 3], Image.fromarray(cat),
             _bomb_png(), tmp_path / "missing.png"]
    res = embedder.embed(items, on_error="report", batch_size=2)
    good = [0, 2, 4, 6]
    assert res.indices == good
    clean = embedder.embed([items[i] for i in good], batch_size=4)
    np.testing.assert_allclose(res.vectors, clean, rtol=0, atol=1e-6)
    assert res.vectors.shape == (4, embedder.dim) and res.vectors.dtype == np.float32
    assert [i for i, _ in res.errors] == [1, 3, 5, 7, 8]
    patterns = [r"notes\.jpg.*not an image", r"item 3: empty input", r"item 5: truncated",
                r"item 7: too many pixels", r"missing\.png.*file not found"]
    for (_, message), pattern in zip(res.errors, patterns, strict=True):
        assert re.search(pattern, message), (pattern, message)


def test_api_report_all_bad_gives_empty_matrix(embedder):
    res = embedder.embed([b"x", b""], on_error="report")
    assert res.vectors.shape == (0, embedder.dim) and res.indices == [] and len(res.errors) == 2


def test_api_raise_names_first_bad_item(embedder, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(ImageDecodeError, match=r"broken\.png"):
        embedder.embed([skdata.chelsea(), bad, skdata.coffee()])


def test_cli_embed_mixed_folder_writes_good_lists_bad_exit_3(embedder, artifact_dir, tmp_path):
    """``imgembed embed ARTIFACT FOLDER``: exit 3, OUT.npy holds exactly the good images' vectors (equal to
    the API's), OUT.paths.txt lists them in row order, stderr names every bad file."""
    from typer.testing import CliRunner

    from imgembed.cli import app

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    good = {folder / "a_cat.png": _enc(skdata.chelsea(), "PNG"), folder / "c_coffee.jpg": _enc(skdata.coffee(), "JPEG"),
            folder / "sub" / "rocket.webp": _enc(skdata.rocket(), "WEBP")}
    jpeg = _enc(skdata.astronaut(), "JPEG")
    bad = {folder / "b_text.jpg": b"hello\n" * 30, folder / "d_empty.png": b"", folder / "e_cut.jpg": jpeg[:4000],
           folder / "sub" / "bomb.png": _bomb_png()}
    for path, blob in {**good, **bad}.items():
        path.write_bytes(blob)
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "vecs.npy"
    result = CliRunner().invoke(app, ["embed", str(artifact_dir(MODEL)), str(folder), "--out", str(out), "-b", "2"])
    assert result.exit_code == 3, result.output
    paths = out.with_suffix(".paths.txt").read_text().splitlines()
    assert paths == sorted(str(p) for p in good)
    vectors = np.load(out)
    np.testing.assert_allclose(vectors, embedder.embed(paths), rtol=0, atol=1e-6)
    stderr = " ".join(result.stderr.split())
    for path in bad:
        assert f"skipped: '{path}'" in stderr, (path, stderr)
    assert "readme.txt" not in result.output
    assert f"wrote 3 x {embedder.dim} embeddings" in " ".join(result.stdout.split())
    assert "4 failed" in " ".join(result.stdout.split())
